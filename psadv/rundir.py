"""A run directory: resolved config, metrics log, checkpoints and summary.

Layout::

    RUN_DIR/config.json       the resolved configuration (plus model name and arguments)
    RUN_DIR/metrics.jsonl     one JSON object per line, its kinds and fields in psadv.metrics.SCHEMA
    RUN_DIR/checkpoints/      ckpt-<version>.h5, the newest --keep-checkpoints of them
    RUN_DIR/summary.json      final numbers, written when the run ends

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


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a truncated last line (a killed run) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
