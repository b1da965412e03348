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


def run_child(cmd: list[str], **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, **popen_kwargs)`` that forwards FORWARDED signals to the child, then exits."""
    caught: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum, _frame):
        caught.append(signum)
        if proc is not None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        with subprocess.Popen(cmd, **popen_kwargs) as proc:
            if caught:  # the signal came while the child was starting
                proc.send_signal(caught[0])
            stdout, stderr = proc.communicate()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise SystemExit(128 + caught[0])
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_children(cmds: list[tuple[list[str], dict]], jobs: int) -> list[int]:
    """Run each (cmd, popen_kwargs) with at most ``jobs`` at once; their exit codes, in order.

    FORWARDED signals go to every running child, no new one starts, and the script exits with
    128 + the signal's number once the running ones have stopped.
    """
    caught: list[int] = []
    running: dict[int, subprocess.Popen] = {}

    def forward(signum, _frame):
        caught.append(signum)
        for proc in running.values():
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    codes: list[int | None] = [None] * len(cmds)
    try:
        pending = list(range(len(cmds)))
        while (pending and not caught) or running:
            while pending and len(running) < jobs and not caught:
                index = pending.pop(0)
                cmd, kwargs = cmds[index]
                running[index] = subprocess.Popen(cmd, **kwargs)
                if caught:  # the signal came while this child was starting
                    running[index].send_signal(caught[0])
            for index, proc in list(running.items()):
                if proc.poll() is not None:
                    codes[index] = proc.returncode
                    del running[index]
            if running:
                time.sleep(0.2)  # a poll, not a spin: the children hold the cores
    finally:
        for proc in running.values():
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise SystemExit(128 + caught[0])
    return codes
