"""Trackers: every metrics row, besides metrics.jsonl, also to TensorBoard, CSV files or W&B.

``--log tensorboard,csv`` picks them. Only the process that writes metrics.jsonl (the single
process, or the parameter server) opens trackers: :class:`psadv.metrics.MetricsLog` hands each row,
once it is in metrics.jsonl, to every sink. When a run is resumed, metrics.jsonl is the record: the
CSV files are rewritten from it, TensorBoard drops the events from the resumed version on
(``purge_step``), so neither shows a future that the resume abandoned.

- ``csv``: ``RUN_DIR/csv/<kind>.csv``, one file per row kind (the kinds have different fields),
  its columns the kind's fields in :data:`psadv.metrics.SCHEMA`; a dict or list cell is JSON.
- ``tensorboard``: ``RUN_DIR/tensorboard/``; each numeric field is a scalar ``<kind>/<field>``
  (``attacker<rank>/<field>`` for attacker rows, nested fields joined by ``/``) at global step =
  the row's version and wall time = the row's ``wall``, so TensorBoard plots it against versions
  (STEP) and wall-clock time (WALL, RELATIVE).
- ``wandb``: the same scalars, logged with step = version, into a W&B run in ``RUN_DIR``.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
from pathlib import Path

from .errors import ConfigError, StorageError, io_error_text
from .metrics import COMMON, SCHEMA

# name -> (modules it needs, what to install)
TRACKERS = {
    "tensorboard": (("tensorboard", "torch.utils.tensorboard"), "pip install tensorboard (or psadv[tensorboard])"),
    "csv": ((), ""),
    "wandb": (("wandb",), "pip install wandb"),
}
CSV_DIR, TENSORBOARD_DIR = "csv", "tensorboard"


def parse_trackers(text: str) -> tuple[str, ...]:
    """'tensorboard, csv' -> ('tensorboard', 'csv'); '' -> (); an unknown name is a ConfigError."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip().lower()
        if not name:
            continue
        if name not in TRACKERS:
            raise ConfigError(f"--log: unknown tracker {part.strip()!r}; choose from: {', '.join(TRACKERS)}")
        if name not in names:
            names.append(name)
    return tuple(names)


def check_installed(text: str) -> None:
    """Refuse, before a run starts, a tracker whose package cannot be imported."""
    for name in parse_trackers(text):
        modules, hint = TRACKERS[name]
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(f"--log {name}: the {module.split('.')[0]} package is not installed; "
                                  f"{hint}, or leave {name} out of --log") from None


def scalars(row: dict) -> dict[str, float]:
    """The numeric fields of a metrics row as ``tag -> value``: ``<kind>/<field>`` (``attacker<rank>/…``
    for attacker rows), nested dicts flattened with ``/``; strings, lists, None and booleans dropped."""
    kind = row["kind"]
    prefix = f"attacker{row['rank']}" if kind == "attacker" else kind
    out: dict[str, float] = {}

    def walk(tag: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{tag}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)

    for key, value in row.items():
        if key not in COMMON and key not in ("version", "rank"):
            walk(f"{prefix}/{key}", value)
    return out


def csv_columns(kind: str) -> list[str]:
    """A kind's CSV columns: wall, version and time first where the kind has them, then the rest by name."""
    spec = SCHEMA[kind]
    rest = sorted((spec.required | spec.optional) - {"version", "time"})
    return ["wall", *[c for c in ("version", "time") if c in spec.required], *rest]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


class CsvSink:
    """``RUN_DIR/csv/<kind>.csv``, rewritten from the rows already in metrics.jsonl, then appended to."""

    def __init__(self, run_dir: Path, existing: list[dict]):
        self.dir = Path(run_dir) / CSV_DIR
        self._files: dict[str, object] = {}
        try:
            self.dir.mkdir(exist_ok=True)
            for old in self.dir.glob("*.csv"):
                old.unlink()
            by_kind: dict[str, list[dict]] = {}
            for row in existing:
                if row.get("kind") in SCHEMA:
                    by_kind.setdefault(row["kind"], []).append(row)
            for kind, rows in by_kind.items():
                path = self.dir / f"{kind}.csv"
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                with open(tmp, "w", newline="") as handle:
                    writer = csv.writer(handle)
                    writer.writerow(csv_columns(kind))
                    writer.writerows([_cell(r.get(c)) for c in csv_columns(kind)] for r in rows)
                os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {self.dir}: {io_error_text(exc)}") from None

    def write(self, row: dict) -> None:
        kind = row["kind"]
        if kind not in self._files:
            path = self.dir / f"{kind}.csv"
            new = not path.exists()
            self._files[kind] = open(path, "a", newline="", buffering=1)
            if new:
                csv.writer(self._files[kind]).writerow(csv_columns(kind))
        csv.writer(self._files[kind]).writerow([_cell(row.get(c)) for c in csv_columns(kind)])

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


class TensorBoardSink:
    """Scalars in ``RUN_DIR/tensorboard/``, at step = version and wall time = the row's ``wall``."""

    def __init__(self, run_dir: Path, start_version: int):
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events of the versions it trains again (metrics.jsonl keeps the
        # rows of its checkpoint's version, and so does TensorBoard)
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                                    purge_step=start_version + 1 if start_version > 0 else None)

    def write(self, row: dict) -> None:
        step = row.get("version", 0)
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=row["wall"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """The same scalars in a W&B run kept in ``RUN_DIR/wandb`` (its mode, project and entity come
    from the usual WANDB_* environment variables)."""

    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(dir=str(run_dir), name=Path(run_dir).name, config=config,
                              project=os.environ.get("WANDB_PROJECT", "psadv"))

    def write(self, row: dict) -> None:
        values = scalars(row)
        if values:
            self.run.log(values, step=row.get("version", 0))

    def close(self) -> None:
        self.run.finish()


def open_sinks(text: str, run_dir: Path, *, existing: list[dict], start_version: int, config: dict) -> list:
    """The sinks ``--log`` asks for; ``existing`` are the rows metrics.jsonl already holds."""
    sinks = []
    for name in parse_trackers(text):
        if name == "csv":
            sinks.append(CsvSink(run_dir, existing))
        elif name == "tensorboard":
            sinks.append(TensorBoardSink(run_dir, start_version))
        else:
            sinks.append(WandbSink(run_dir, config))
    return sinks
