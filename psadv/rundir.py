"""A run directory: resolved config, metrics log, checkpoints and summary.

Layout::

    RUN_DIR/config.json       the resolved configuration (plus model name and arguments)
    RUN_DIR/metrics.jsonl     one JSON object per line, its kinds and fields in psadv.metrics.SCHEMA
    RUN_DIR/checkpoints/      ckpt-<version>.h5, the newest --keep-checkpoints of them (psadv.checkpoint.rotation)
    RUN_DIR/checkpoints/superseded-<time>/  a line of the run that a resume from an older checkpoint set
                              aside: its newer checkpoints, summary, final evaluation and metrics log
    RUN_DIR/summary.json      final numbers, written when the run ends
    RUN_DIR/final_eval.json   the strong final evaluation, written by ``psadv eval RUN --save`` (of the
                              newest checkpoint, not while a process trains the run; a resume in place
                              sets it aside, as the model it grades is no longer the final one)
    RUN_DIR/csv/, tensorboard/  the metrics rows again, for the trackers of ``--log`` (psadv.trackers)
    RUN_DIR/.lock             held (flock) by the process that writes the run, for the whole run: the
                              run's one lock, which its checkpoints are written under too

An existing run directory is never clobbered: starting a run there is an error unless the user
resumes it (``--resume``) or asks for ``--overwrite``, which removes only the files above. The
lock is taken *before* anything is checked or removed, so ``--overwrite`` or ``--resume`` of a run
that is still training is refused instead of racing it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from .errors import StorageError, UsageError, io_error_text
from .metrics import finite_json, well_typed

# The names of the layout above: every module that reads or writes a run's files takes them from here.
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
FINAL_EVAL = "final_eval.json"  # psadv eval --save's grade of the run's final model
CHECKPOINTS = "checkpoints"
SUPERSEDED = "superseded-"  # CHECKPOINTS/superseded-<time>/: a line of the run set aside by a resume
OWNED = (CONFIG, METRICS, SUMMARY, FINAL_EVAL, CHECKPOINTS, "csv", "tensorboard")
LOCK_NAME = ".lock"


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def holds_run(path: Path) -> bool:
    """Does ``path`` hold (part of) a run?"""
    return any((Path(path) / name).exists() for name in OWNED)


def checkpoints_dir(run: Path) -> Path:
    """Where the run in ``run`` keeps its checkpoints (the line being trained)."""
    return Path(run) / CHECKPOINTS


def run_of(checkpoint: Path, *, superseded: bool = False) -> Path | None:
    """The run directory a checkpoint file belongs to: RUN for RUN/checkpoints/<file>, and with
    ``superseded`` also for a set-aside line's RUN/checkpoints/superseded-*/<file>; None for a file
    outside a run (or of a set-aside line, when not asked).

    A resume asks for both, as resuming a set-aside checkpoint continues its run (and sets the line
    after it aside in turn). Readers of the run's records do not: its final_eval.json and newest
    checkpoint are those of the line being trained, never of one set aside."""
    parent = Path(checkpoint).parent
    if parent.name == CHECKPOINTS:
        return parent.parent
    if superseded and parent.name.startswith(SUPERSEDED) and parent.parent.name == CHECKPOINTS:
        return parent.parent.parent
    return None


class RunDir:
    """A prepared run directory and the lock that makes this process its only writer.

    ``fresh`` says that no run was there before (or ``--overwrite`` removed it): a run that fails
    while starting up can then :meth:`abandon` the directory without losing anything.
    """

    def __init__(self, path: Path, fd: int, *, fresh: bool, created: bool):
        self.path, self._fd, self.fresh, self.created = path, fd, fresh, created
        self.moved: list[tuple[Path, Path]] = []  # (from, to) of a supersede, undone by abandon

    @property
    def held(self) -> bool:
        """Whether this process still holds the run's lock (until :meth:`release`)."""
        return self._fd is not None

    @property
    def checkpoints(self) -> Path:
        """The run's checkpoints directory (:func:`checkpoints_dir`)."""
        return checkpoints_dir(self.path)

    def supersede(self, version: int, checkpoints: list[Path]) -> Path:
        """Set the run's future beyond ``version`` aside (a resume from an older checkpoint):
        ``checkpoints`` (the newer ones), the summary and final evaluation of the abandoned line
        and the whole metrics log as it was go into ``checkpoints/superseded-<time>/``; the live
        log keeps only rows of versions up to ``version``. Nothing is deleted."""
        aside = self._aside()
        metrics = self.path / METRICS
        try:
            aside.mkdir(exist_ok=True)
            for source in [*checkpoints, self.path / SUMMARY, self.path / FINAL_EVAL, metrics]:
                if source.exists():
                    os.replace(source, aside / source.name)
                    self.moved.append((source, aside / source.name))
            if (aside / metrics.name).exists():
                kept = [line for line in (aside / metrics.name).read_bytes().splitlines(keepends=True)
                        if _row_version(line) <= version]
                tmp = metrics.with_name(f".{metrics.name}.tmp-{os.getpid()}")
                tmp.write_bytes(b"".join(kept))
                os.replace(tmp, metrics)
        except OSError as exc:
            raise StorageError(f"cannot set the newer part of {self.path} aside: {io_error_text(exc)}") from None
        return aside

    def set_aside(self, name: str) -> Path | None:
        """Move the run's file ``name`` into ``checkpoints/superseded-<time>/`` as :meth:`supersede`
        does (and :meth:`abandon` undoes): the folder it went to, or None if there was no such file."""
        source, aside = self.path / name, self._aside()
        if not source.exists():
            return None
        try:
            aside.mkdir(exist_ok=True)
            os.replace(source, aside / name)
        except OSError as exc:
            raise StorageError(f"cannot set {source} aside: {io_error_text(exc)}") from None
        self.moved.append((source, aside / name))
        return aside

    def _aside(self) -> Path:
        return self.checkpoints / f"{SUPERSEDED}{time.strftime('%Y%m%d-%H%M%S')}"

    def _undo_supersede(self) -> None:
        for source, target in reversed(self.moved):
            os.replace(target, source)
        if self.moved:
            self.moved[0][1].parent.rmdir()
        self.moved.clear()

    def release(self) -> None:
        """Give up the lock (idempotent); closing the descriptor releases the flock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """Undo :func:`prepare` (and :meth:`supersede`) for a run that never started: remove what
        it created, put back what it set aside, release."""
        self._undo_supersede()
        if self.fresh and not any(self.checkpoints.glob("*.h5")):
            for name in (*OWNED, LOCK_NAME):
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                elif target.exists():
                    target.unlink(missing_ok=True)
            if self.created:
                try:
                    self.path.rmdir()
                except OSError:  # something else appeared there meanwhile: leave it
                    pass
        self.release()


def _row_version(line: bytes) -> int:
    """The version of a metrics row (rows without one, and unreadable lines, belong to every line)."""
    try:
        version = json.loads(line).get("version")
    except (ValueError, AttributeError):
        return -1
    return version if isinstance(version, int) else -1


def _lock(path: Path) -> int:
    lock_path = path / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise UsageError(f"run directory {path} is in use by another psadv process (pid {holder}); "
                         "wait for it to finish or stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def lock_existing(path: Path) -> RunDir:
    """Lock the existing run in ``path`` for a process that adds to it without training it
    (``psadv eval --save``): UsageError while another process, a trainer, holds it."""
    try:
        return RunDir(Path(path), _lock(Path(path)), fresh=False, created=False)
    except OSError as exc:
        raise UsageError(f"cannot use run directory {path}: {exc.strerror or exc}") from None


def prepare(path: Path, *, resume: bool = False, overwrite: bool = False) -> RunDir:
    """Make ``path`` ready for a run and lock it; refuse to touch an existing run unless asked."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"run directory {path} exists and is not a directory")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = _lock(path)
    except OSError as exc:
        raise UsageError(f"cannot use run directory {path}: {exc.strerror or exc}") from None
    run = RunDir(path, fd, fresh=False, created=created)
    try:
        existing = [name for name in OWNED if (path / name).exists()]
        if existing and not (resume or overwrite):
            raise UsageError(f"run directory {path} already holds a run; pass --resume {path} to continue it, "
                             "--overwrite to replace it, or choose another --run-dir")
        if overwrite and not resume:
            for name in existing:
                target = path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        run.fresh = not resume
        checkpoints_dir(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        run.release()
        raise UsageError(f"cannot prepare run directory {path}: {exc.strerror or exc}") from None
    except BaseException:
        run.release()
        raise
    return run


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(finite_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {io_error_text(exc)}") from None


def read_metrics(path: Path, *, count_skipped: bool = False):
    """Rows of a metrics.jsonl. A line that is not a JSON object with values of the right types (the
    truncated last line of a killed run, bytes that are not UTF-8, a stray value, a number turned to
    text: :func:`psadv.metrics.well_typed`) is skipped; with ``count_skipped`` the result is
    ``(rows, number of lines skipped)``, so a reader can say how much it left out."""
    rows, skipped = [], 0
    # bytes, split on ASCII line ends only: one bad line must not make the whole file unreadable
    for line in Path(path).read_bytes().splitlines():
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict) and well_typed(row):
            rows.append(row)
        else:
            skipped += 1
    return (rows, skipped) if count_skipped else rows
