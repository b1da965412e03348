"""Cancelling long work within seconds: a stop request reaches every attack's inner loop.

An evaluation batch of the strong cascade (APGD-CE, APGD-T's 9 targets × 100 iterations, Square's
5,000 queries) takes minutes on a CPU; a SIGTERM that waited for the batch to end outlived SLURM's
grace period and lost the run's newest versions (docs/design/failure-model.md). So every long
loop of psadv calls :func:`check` once per iteration (an attack step, a Square query, a FAB step,
a restart, a target), and a runner that can act on a stop request wraps the work that may be cut
short in :func:`stoppable`::

    with stop.stoppable(lambda: signals.signum is not None):
        ...  # an attack iteration raises Stopped once a signal arrived

Outside any :func:`stoppable` block :func:`check` does nothing, so code that must finish what it
started (an MPI attacker's batch, which the server expects whole) is never cut short by accident.
Nothing here catches a signal itself: :class:`psadv.mpi.SignalFlag` does, and its owner decides
what a stop means (checkpoint first, then end).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

_requests: list[Callable[[], bool]] = []


class Stopped(Exception):
    """Raised by :func:`check` inside :func:`stoppable` once its stop request is true.

    Not a :class:`psadv.errors.PsadvError`: the code that opened the block catches it and decides
    what the interrupted work leaves behind (nothing recorded, a checkpoint, a one-line error)."""


@contextlib.contextmanager
def stoppable(requested: Callable[[], bool] | None) -> Iterator[None]:
    """Within this block, :func:`check` raises :class:`Stopped` as soon as ``requested()`` is true
    (``None``: no request of its own; outer blocks still count). Blocks nest."""
    if requested is None:
        yield
        return
    _requests.append(requested)
    try:
        yield
    finally:
        _requests.remove(requested)


def requested() -> bool:
    """Whether a stop was requested in any open :func:`stoppable` block."""
    return any(request() for request in _requests)


def check() -> None:
    """Raise :class:`Stopped` if a stop was requested; called once per iteration of long loops
    (a handful of Python calls: nothing next to a forward pass)."""
    if _requests and requested():
        raise Stopped
