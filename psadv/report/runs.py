"""Reading run directories for the report: what each holds, and what is missing from it.

A run without summary.json (killed, still running) is *partial*, one stopped by a signal before
its budget *stopped* (``psadv train --resume`` continues it), a sweep run whose launcher exited
non-zero *failed*; none is dropped. Whatever could not be read is listed in ``Run.problems``,
so the report can say so next to the run's numbers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..rundir import CHECKPOINTS, CONFIG, FINAL_EVAL, METRICS, SUMMARY, checkpoints_dir, read_metrics

# The fields the report needs in each row kind: required fields of psadv.metrics.SCHEMA (tested).
ROW_FIELDS = {"train": ("version", "time", "examples_seen"), "eval": ("version", "time", "clean_acc", "robust_acc"),
              "world": ("size",), "end": ("version",)}


@dataclass
class Run:
    """What one run directory holds, and what is missing from it."""

    name: str
    path: Path
    status: str = "complete"  # complete | stopped (by a signal, resumable) | partial | failed
    problems: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict | None = None
    rows: list[dict] = field(default_factory=list)
    skipped_lines: int = 0  # metrics.jsonl lines that are not a JSON object
    final_eval: dict | None = None
    # why a final_eval.json was left out: it grades another version than the run's final one
    stale_final_eval: str | None = None
    launch: dict | None = None

    @property
    def is_mpi(self) -> bool:
        return self.attackers > 0

    @property
    def attackers(self) -> int:
        if self.summary and "attackers" in self.summary:
            return int(self.summary["attackers"])
        worlds = self.of_kind("world")
        if worlds:
            return int(worlds[-1]["size"]) - 1
        if self.launch is not None:
            return int(self.launch["attackers"])
        return 0

    @property
    def push(self) -> str | None:
        if not self.is_mpi:
            return None
        return self.config.get("push") or (self.launch or {}).get("push")

    @property
    def batch_size(self) -> int | None:
        return self.config.get("batch_size")

    def of_kind(self, kind: str) -> list[dict]:
        """Rows of one kind that carry the fields the report reads (others are counted as problems)."""
        need = ROW_FIELDS.get(kind, ())
        return [r for r in self.rows if r.get("kind") == kind and all(r.get(f) is not None for f in need)]


def _read_json(path: Path, problems: list[str]) -> dict | None:
    """The JSON object in ``path``; None (and a problem) when it is unreadable or not an object."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name} is unreadable ({type(exc).__name__})")
        return None
    if not isinstance(obj, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return obj


def load_run(path: Path, name: str | None = None, launch: dict | None = None) -> Run:
    """The run in ``path``; ``launch`` is the sweep's record of the command that made it, if any."""
    path = Path(path)
    run = Run(name or path.name, path, launch=launch)
    if launch is not None and not path.is_dir():
        run.status = "failed"
        run.problems = [f"launcher exited with code {launch.get('returncode')}", "no run directory was created"]
        return run
    config = _read_json(path / CONFIG, run.problems)
    if config is None:
        run.problems.append(f"no {CONFIG}")
    else:
        run.config = config.get("config", {})
    if (path / METRICS).exists():
        run.rows, run.skipped_lines = read_metrics(path / METRICS, count_skipped=True)
        if run.skipped_lines:
            run.problems.append(f"{run.skipped_lines} {METRICS} lines are not metrics rows (cut off, not "
                                "UTF-8, or values of the wrong type) and were skipped")
    else:
        run.problems.append(f"no {METRICS}")
    run.summary = _read_json(path / SUMMARY, run.problems)
    run.final_eval = _read_json(path / FINAL_EVAL, run.problems)
    if run.final_eval is not None:
        run.stale_final_eval = final_eval_mismatch(run.final_eval, final_version(path, run.summary))
        if run.stale_final_eval:
            run.problems.append(run.stale_final_eval)
            run.final_eval = None
    if run.summary is None:
        run.status = "partial"
        run.problems.append(f"no {SUMMARY}: the run did not finish (killed, failed or still running)")
    elif str(run.summary.get("stop_reason", "")).startswith("signal"):
        run.status = "stopped"
        run.problems.append(f"stopped by a {run.summary['stop_reason']} before its budget; psadv train --resume "
                            "continues it")
    unusable = sum(1 for r in run.rows if r.get("kind") in ROW_FIELDS) - sum(len(run.of_kind(k)) for k in ROW_FIELDS)
    if unusable:
        run.problems.append(f"{unusable} metrics rows lack fields the report needs and were left out")
    if launch is not None and launch.get("returncode") != 0:
        run.status = "failed"
        run.problems.insert(0, f"launcher exited with code {launch.get('returncode')}")
    if not run.of_kind("eval"):
        run.problems.append("no evaluation rows")
    return run


def final_version(path: Path, summary: dict | None) -> int | None:
    """The version of a run's final model: the newer of its summary's and its newest checkpoint's
    (a resume killed before its own summary leaves the old one behind); None if it has neither."""
    from ..checkpoint.rotation import checkpoint_version, list_checkpoints  # imports torch: only for a final_eval.json

    versions = [checkpoint_version(c) for c in list_checkpoints(checkpoints_dir(path))]
    if summary is not None and isinstance(summary.get("version"), int):
        versions.append(summary["version"])
    return max(versions) if versions else None


def final_eval_mismatch(final_eval: dict, version: int | None) -> str | None:
    """Why ``final_eval`` (a final_eval.json) does not grade the final model of version ``version``
    (written before a resume trained on, or while the run was training), or None when it does."""
    graded = final_eval.get("version")
    if graded is not None and graded == version:
        return None
    return (f"{FINAL_EVAL} grades version {graded}, not the final model (version {version}), and was left out; "
            "psadv eval RUN_DIR --save grades the final model")


def natural_key(path: Path) -> list:
    """pgd-2 before pgd-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def is_run_dir(path: Path) -> bool:
    """Anything psadv train writes marks a run directory (checkpoints/ comes first)."""
    return any((path / name).exists() for name in (CONFIG, METRICS, SUMMARY, CHECKPOINTS))


def find_runs(paths: list[str]) -> list[Run]:
    """Each path is a run directory or a directory of them (one level); anything else is an error."""
    runs: list[Run] = []
    for text in paths:
        path = Path(text)
        if not path.is_dir():
            raise UsageError(f"{path} is not a directory")
        if is_run_dir(path):
            runs.append(load_run(path))
            continue
        inner = sorted((p for p in path.iterdir() if p.is_dir() and is_run_dir(p)), key=natural_key)
        if not inner:
            raise UsageError(f"{path} is not a run directory (no {CONFIG}, {METRICS} or {CHECKPOINTS}/) "
                             "and holds none")
        runs.extend(load_run(p, f"{path.name}/{p.name}") for p in inner)
    names = [r.name for r in runs]
    for r in runs:  # two inputs with the same name: use the full path to tell them apart
        if names.count(r.name) > 1:
            r.name = str(r.path)
    return runs

