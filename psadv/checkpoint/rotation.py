"""A run's numbered checkpoints: their names (``ckpt-<version>.h5`` in ``RUN_DIR/checkpoints/``),
the newest ones kept, and a run directory resolved to its newest checkpoint.

Writing takes the run directory's lock (:class:`psadv.rundir.RunDir`): a :class:`CheckpointManager`
is made from the RunDir that holds it, so the one process that writes a run is the one that writes
its checkpoints, and there is no second lock to take or to lose.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from .. import rundir
from ..errors import CheckpointError
from .codec import save_checkpoint

_PATTERN = re.compile(r"^ckpt-(\d+)\.h5$")


def checkpoint_name(version: int) -> str:
    """The file name of the checkpoint of ``version``: zero-padded, so names below 10^8 sort as
    their versions do (:func:`list_checkpoints` orders by the number, beyond that too)."""
    return f"ckpt-{version:08d}.h5"


def checkpoint_version(path: Path) -> int | None:
    """The version in a checkpoint's file name (``ckpt-00000150.h5`` -> 150), or None."""
    match = _PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files directly in ``directory``, oldest to newest by the version in their names."""
    found = []
    for candidate in directory.glob("ckpt-*.h5"):
        version = checkpoint_version(candidate)
        if version is not None and candidate.is_file():
            found.append((version, candidate))
    return [p for _, p in sorted(found)]


class CheckpointManager:
    """Writes a run's numbered checkpoints into its ``checkpoints/`` directory, keeping the newest ``keep``.

    ``run`` is the run directory this process holds the lock of (:func:`psadv.rundir.prepare`); the
    manager writes only while that lock is held, so two processes never write the same run's
    checkpoints. Whoever holds the RunDir releases it; the manager holds nothing of its own.
    """

    def __init__(self, run: rundir.RunDir, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        if not run.held:
            raise ValueError(f"the lock of run directory {run.path} is released: a checkpoint manager writes "
                             "only under it")
        self.run = run
        self.directory = run.checkpoints
        self.keep = keep
        self.stale_removed = self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of checkpoint writes that a kill (SIGKILL, a lost node) cut
        short: each can be a checkpoint's size, and nothing else removes them. Safe only under the
        run's lock: no other process is writing one now."""
        removed = []
        for tmp in self.directory.glob(".ckpt-*.h5.tmp-*"):
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to delete: leave it
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink()
                    removed.append(tmp)
        return removed

    def path_for(self, version: int) -> Path:
        """The file name a checkpoint of ``version`` gets in this directory."""
        return self.directory / checkpoint_name(version)

    def save(self, version: int, **kwargs: Any) -> Path:
        """Write ``ckpt-<version>.h5`` with :func:`psadv.checkpoint.codec.save_checkpoint` (same
        keyword arguments), then delete all but the newest ``keep`` checkpoints. ``state["version"]``
        is set to ``version``."""
        if not self.run.held:
            raise CheckpointError(f"cannot save a checkpoint in {self.directory}: this process no longer holds "
                                  f"the lock of run directory {self.run.path}")
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"checkpoint version must be a non-negative int, not {version!r}")
        state = dict(kwargs.pop("state"))
        if state.setdefault("version", version) != version:
            raise ValueError(f"state['version'] = {state['version']!r} disagrees with the checkpoint version {version}")
        path = save_checkpoint(self.path_for(version), state=state, **kwargs)
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> Path | None:
        """The newest checkpoint in the directory, or None."""
        paths = self.list()
        return paths[-1] if paths else None

    def list(self) -> list[Path]:
        """Checkpoints in the directory, oldest to newest by the version in their names."""
        return list_checkpoints(self.directory)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve a checkpoint file, or a run directory to its newest checkpoint.

    For a directory, looks in ``path/checkpoints/`` and then in ``path`` itself.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    for directory in (rundir.checkpoints_dir(path), path):
        found = list_checkpoints(directory) if directory.is_dir() else []
        if found:
            return found[-1]
    hint = (f": the run there stopped before its first checkpoint (see its {rundir.METRICS}); train it again with "
            f"--overwrite --run-dir {path}") if (path / rundir.CONFIG).is_file() else ""
    raise CheckpointError(f"no checkpoint (ckpt-*.h5) found in {path}/{rundir.CHECKPOINTS} or {path}{hint}")
