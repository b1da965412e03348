"""Stop requests: the signals that ask a run to stop, and cancelling long work within seconds.

:class:`SignalFlag` catches SIGTERM, SIGUSR1 and SIGINT and only records them; the loop that owns
the work (the single-process loop, the server, an attacker, ``psadv eval``) decides what a stop
means (checkpoint first, then end); a request reaches every attack's inner loop.

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
"""

from __future__ import annotations

import contextlib
import signal
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


# --- signals: what asks a run to stop ---------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class SignalFlag:
    """Catches SIGTERM/SIGUSR1/SIGINT (what SLURM and mpiexec send) and remembers the first one.

    The roles poll :attr:`signum` between batches: the server checkpoints and stops the job cleanly.
    A second SIGINT interrupts at once. The server also records a signal an attacker caught and
    forwarded (:attr:`forwarded`), apart from its own: only a second SIGINT *here* interrupts.
    """

    def __init__(self):
        self.signum: int | None = None
        self.forwarded: int | None = None
        self._previous = {}

    def install(self) -> SignalFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def stop_requested(self) -> bool:
        """Whether this rank must stop: a signal caught here, or one an attacker forwarded."""
        return (self.signum or self.forwarded) is not None

    def name(self) -> str:
        """The signal that stops this rank (caught here, else forwarded), or "" if none."""
        signum = self.signum or self.forwarded
        return signal.Signals(signum).name if signum else ""

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
