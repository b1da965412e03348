"""A run directory: resolved config, metrics log, checkpoints and summary.

Layout::

    RUN_DIR/config.json       the resolved configuration (plus model name and arguments)
    RUN_DIR/metrics.jsonl     one JSON object per line: kind "train", "eval", "attacker", "end"
    RUN_DIR/checkpoints/      ckpt-<version>.h5, the newest --keep-checkpoints of them
    RUN_DIR/summary.json      final numbers, written when the run ends
    RUN_DIR/final_eval.json   the strong final evaluation, written by ``psadv eval RUN --save``

An existing run directory is never clobbered: starting a run there is an error unless the user
resumes it (``--resume``) or asks for ``--overwrite``, which removes only the files above.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .errors import UsageError

OWNED = ("config.json", "metrics.jsonl", "summary.json", "checkpoints")


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def prepare(path: Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``path`` ready for a run; refuse to touch an existing run unless asked."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"run directory {path} exists and is not a directory")
    existing = [name for name in OWNED if (path / name).exists()]
    if existing and not (resume or overwrite):
        raise UsageError(f"run directory {path} already holds a run; pass --resume {path} to continue it, "
                         "--overwrite to replace it, or choose another --run-dir")
    if overwrite and not resume:
        for name in existing:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """Append-only JSON-lines log; each row is flushed so a crash loses at most one row."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "a", buffering=1)

    def write(self, kind: str, **row) -> dict:
        row = {"kind": kind, "wall": round(time.time(), 3), **row}
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        return row

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path, *, count_skipped: bool = False):
    """Rows of a metrics.jsonl. A line that is not a JSON object (the truncated last line of a killed
    run, bytes that are not UTF-8, a stray value) is skipped; with ``count_skipped`` the result is
    ``(rows, number of lines skipped)``, so a reader can say how much it left out."""
    rows, skipped = [], 0
    # bytes, split on ASCII line ends only: one bad line must not make the whole file unreadable
    for line in Path(path).read_bytes().splitlines():
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            skipped += 1
    return (rows, skipped) if count_skipped else rows
