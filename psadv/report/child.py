"""A child command of a long benchmark script (``scripts/``), stopped with its script.

``subprocess.run`` leaves its child running when the script is killed: ``kill PID`` or a batch
system's time limit would orphan a ``psadv train`` that goes on using the cores. :func:`run_child`
passes such a signal on to the child instead (``psadv train`` then saves a checkpoint and stops),
waits for it, and ends the script with the signal's exit status (128 + its number).
"""

from __future__ import annotations

import signal
import subprocess

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
