"""A child command of a long benchmark script (``scripts/``), stopped with its script.

``subprocess.run`` leaves its child running when the script is killed: ``kill PID`` or a batch
system's time limit would orphan a ``psadv train`` that goes on using the cores. :func:`run_child`
passes such a signal on to the child instead (``psadv train`` then saves a checkpoint and stops),
waits for it, and ends the script with the signal's exit status (128 + its number).
:func:`run_children` does the same for several children at a time.
"""

from __future__ import annotations

import signal
import subprocess
import time

# SIGINT too: a terminal's Ctrl-C reaches the child anyway, but a SIGINT sent to the script alone does not
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class _Forwarding:
    """While entered: FORWARDED signals are recorded and passed on to every live child."""

    def __init__(self):
        self.caught: list[int] = []
        self.live: list[subprocess.Popen] = []
        self._signalled: set[subprocess.Popen] = set()  # children the handler reached

    def __enter__(self) -> "_Forwarding":
        self._previous = {sig: signal.signal(sig, self._forward) for sig in FORWARDED}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum, _frame) -> None:
        self.caught.append(signum)
        for proc in self.live:
            proc.send_signal(signum)
            self._signalled.add(proc)

    def start(self, cmd: list[str], popen_kwargs: dict) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, **popen_kwargs)
        self.live.append(proc)
        if self.caught and proc not in self._signalled:  # the signal came while it was starting
            proc.send_signal(self.caught[0])
        return proc

    def done(self, proc: subprocess.Popen) -> None:
        """``proc`` has exited: no signal goes to it any more."""
        self.live.remove(proc)
        self._signalled.discard(proc)

    def exit_if_caught(self) -> None:
        if self.caught:
            raise SystemExit(128 + self.caught[0])


def run_child(cmd: list[str], **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, **popen_kwargs)`` that forwards FORWARDED signals to the child, then exits."""
    with _Forwarding() as forwarding:
        with forwarding.start(cmd, popen_kwargs) as proc:
            stdout, stderr = proc.communicate()
    forwarding.exit_if_caught()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_children(cmds: list[tuple[list[str], dict]], jobs: int) -> list[int]:
    """Run each (cmd, popen_kwargs) with at most ``jobs`` at once; their exit codes, in order.

    FORWARDED signals go to every running child, no new one starts, and the script exits with
    128 + the signal's number once the running ones have stopped.
    """
    codes: list[int | None] = [None] * len(cmds)
    with _Forwarding() as forwarding:
        running: dict[int, subprocess.Popen] = {}
        pending = list(range(len(cmds)))
        try:
            while (pending and not forwarding.caught) or running:
                while pending and len(running) < jobs and not forwarding.caught:
                    index = pending.pop(0)
                    running[index] = forwarding.start(*cmds[index])
                for index, proc in list(running.items()):
                    if proc.poll() is not None:
                        codes[index] = proc.returncode
                        forwarding.done(proc)
                        del running[index]
                if running:
                    time.sleep(0.2)  # a poll, not a spin: the children hold the cores
        finally:
            for proc in running.values():
                proc.wait()
    forwarding.exit_if_caught()
    return codes
