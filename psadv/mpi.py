"""MPI plumbing: is this an MPI job, who am I, back-off, failures.

``mpi4py`` is imported only when the environment says the process was started by an MPI launcher
(``mpiexec``/``mpirun``/``srun``), so a plain ``psadv train`` never initialises MPI.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, PsadvError

# Variables MPI launchers set in every rank's environment.
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                  "MPI_LOCALNRANKS")


def launched_by_mpi() -> bool:
    """True when a launcher started this process (``PSADV_MPI=0`` forces False, ``=1`` True)."""
    forced = os.environ.get("PSADV_MPI")
    if forced in ("0", "1"):
        return forced == "1"
    if any(v in os.environ for v in _LAUNCHER_VARS):
        return True
    return "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def launcher_mismatch(world_size: int, env) -> str | None:
    """Why this job is broken when the launcher started more processes than MPI sees, else None.

    An ``mpiexec`` of one MPI with an mpi4py built for another (MPICH's launcher, Open MPI's
    library, say) starts N processes that each see a world of one: N servers, no attackers."""
    sizes = [env.get(v, "") for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")]
    if "SLURM_STEP_ID" in env:
        sizes.append(env.get("SLURM_STEP_NUM_TASKS", ""))
    launched = max((int(v) for v in sizes if v.isdigit()), default=0)
    if launched > world_size:
        return (f"the MPI launcher started {launched} processes but MPI sees {world_size}: mpiexec and mpi4py "
                "belong to different MPI libraries; use the mpiexec of mpi4py's MPI (mpi4py's wheels: set "
                "MPI4PY_MPIABI to the launcher's, e.g. mpich)")
    return None


@dataclass
class World:
    """This rank's place in the job."""

    comm: object  # MPI.COMM_WORLD
    rank: int
    size: int
    local_rank: int  # rank among the processes on this host (MPI shared-memory split)
    local_size: int
    host: str

    @property
    def n_attackers(self) -> int:
        return self.size - 1

    def where(self) -> str:
        return f"rank {self.rank} of {self.size} on {self.host}"


def world() -> World | None:
    """The MPI world when launched by MPI with 2 or more ranks; None for a single process."""
    if not launched_by_mpi():
        return None
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ConfigError(f"started by an MPI launcher but mpi4py cannot be imported: {exc}") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        mismatch = launcher_mismatch(comm.Get_size(), os.environ)
        if mismatch:
            raise ConfigError(f"{mismatch} (mpi4py uses {MPI.Get_library_version().splitlines()[0].strip()})")
        return None
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    w = World(comm, comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size(), socket.gethostname())
    node.Free()
    return w


class Backoff:
    """Sleep between polls: from ``start`` seconds, doubling up to ``cap``; :meth:`reset` on activity.

    Idle ranks poll with ``Iprobe``/``Test`` and sleep here, so waiting costs well under 1% of a core.
    """

    def __init__(self, start: float = 50e-6, cap: float = 0.01):
        self.start, self.cap = start, cap
        self.delay = start

    def reset(self) -> None:
        self.delay = self.start

    def wait(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, self.cap)


# --- failures ---------------------------------------------------------------------------------
ABORT_GRACE = 1.0  # seconds


def fail_job(w: World, exc: BaseException) -> None:
    """Report ``exc`` as one line naming this rank and host (with a traceback for bugs) and abort
    the whole job: MPI_Abort makes the launcher kill every rank, so nothing hangs."""
    if isinstance(exc, PsadvError):
        message = str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        message = "interrupted"
    elif type(exc).__module__.startswith("mpi4py"):
        # A peer died (kill -9, a lost node) or the network failed: not a bug of this rank, and
        # MPI's error stack says which link broke in its last line.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        message = f"MPI communication failed (did another rank die?): {lines[-1] if lines else exc}"
    else:
        message = f"{type(exc).__name__}: {exc}"
        traceback.print_exception(exc, file=sys.stderr)
    print(f"psadv: error: {w.where()}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Give the launcher's output forwarding a moment: MPI_Abort kills the job at once and lines
    # still in the pipe could be lost.
    time.sleep(ABORT_GRACE)
    w.comm.Abort(1)


def agree_on_errors(w: World, error: PsadvError | None, cleanup=None) -> None:
    """A collective check after a setup phase: when any rank hit a user error, every rank leaves.

    Rank 0 re-raises its own error (the CLI prints it once, without rank); if only other ranks
    failed, the lowest of them prints its message with its rank and host. Every rank then exits
    with the same code, and no rank is left waiting for a peer that is gone. ``cleanup`` runs
    first on every rank that has to leave.
    """
    code = np.array([error.exit_code if error is not None else 0], dtype=np.int64)
    worst = np.zeros(1, dtype=np.int64)
    w.comm.Allreduce(code, worst, op=_op("MAX"))
    if worst[0] == 0:
        return
    if cleanup is not None:
        cleanup()
    mine = np.array([w.rank if error is not None else w.size], dtype=np.int64)
    first = np.zeros(1, dtype=np.int64)
    w.comm.Allreduce(mine, first, op=_op("MIN"))
    if error is not None and w.rank == 0:
        raise error
    if error is not None and w.rank == first[0]:
        print(f"psadv: error: {w.where()}: {error}", file=sys.stderr, flush=True)
    sys.exit(int(worst[0]))


def _op(name: str):
    from mpi4py import MPI

    return getattr(MPI, name)


def gather_strings(w: World, text: str, width: int = 96) -> list[str] | None:
    """Gather one short string per rank at rank 0 (fixed-width bytes, no pickle)."""
    send = np.zeros(width, dtype=np.uint8)
    raw = text.encode()[:width]
    send[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    recv = np.zeros((w.size, width), dtype=np.uint8) if w.rank == 0 else None
    w.comm.Gather(send, recv, root=0)
    if w.rank != 0:
        return None
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in recv]
