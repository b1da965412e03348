"""How many torch threads a process takes, and OpenMP's behaviour while they wait.

The decision is :func:`choose_threads`, a pure function of what the operating system says (the
cores this process may run on, its cgroup CPU quota, the other work (:func:`other_work`), the ranks
per host); the readers of those facts (:func:`usable_cores`, :func:`cpu_quota`, :func:`load_average`,
:func:`runnable_tasks`) are the edge.
On a machine that other jobs share, OpenMP threads that spin long while they wait for each other
take the cores from those jobs and from each other: next to other work, 2 threads spinning as
libgomp does by default trained 3-9 versions in a 15 s budget where 2 passively waiting ones trained
50-61 (results/threads-busy-machine.toml); sleeping at once costs a third of the speed on an idle
machine, where a short spin keeps it (results/openmp-wait.toml). So the command line sets a short
spin before torch starts (:func:`quiet_openmp`), and the automatic count takes the usable cores; a
busy machine gets a warning. Nothing here imports torch: :func:`quiet_openmp` must run before it does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

# Set only where the user has not: a user's own OpenMP settings win. libgomp (torch's OpenMP on
# Linux) reads them once, when the library loads, that is at ``import torch``. A thread that waits
# for the others spins GOMP_SPINCOUNT times, then sleeps: a short spin (10,000, tens of
# microseconds) catches the next of a version's ~1,300 small parallel ops without burning a busy
# machine's cores. Measured with `psadv train` against OMP_WAIT_POLICY=PASSIVE (sleep at once, the
# default before): 1.4-1.6x its examples/s on an idle machine and 2.6-5.4x beside a busy loop per
# core (results/openmp-wait.toml); libgomp's own 300,000 collapsed training next to other work
# (results/threads-busy-machine.toml). KMP_BLOCKTIME is Intel OpenMP's (and MKL's under it) time
# a thread spins after its work before it sleeps, in milliseconds.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "0"}
# A user who set either has chosen how threads wait: no spin count is added to their choice.
WAIT_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

# How far the load average may exceed the usable cores before the start-up line warns: the load
# average is a one-minute mean of every runnable task, and one short-lived process (a shell, a
# compiler) should not raise a warning.
OVERSUBSCRIBED_SLACK = 0.5


def other_work(load: float | None, runnable: int | None) -> float | None:
    """Cores that other work keeps busy as psadv starts: the one-minute ``load`` average, at most the
    ``runnable`` tasks of this instant less this process. Either alone misleads: the load average
    lags, so a job that ended seconds ago still counts (one psadv run right after another warned
    with a load of 0.9-1.5 on an idle 2-core machine: results/time-to-target-edge.toml), and the
    instant's count sees a short-lived shell as busy; the smaller of the two counts only work that
    has run for a while and still runs.
    None where neither is known."""
    if load is None or runnable is None:
        return load
    return min(load, float(max(0, runnable - 1)))


def quiet_openmp(environ=os.environ) -> dict[str, str]:
    """Set :data:`OPENMP_DEFAULTS` in ``environ`` where unset; returns what it set. Effective only
    before torch (and with it the OpenMP runtime) is first imported."""
    chose_waiting = any(key in environ for key in WAIT_CHOICES)
    added = {key: value for key, value in OPENMP_DEFAULTS.items()
             if key not in environ and not (key == "GOMP_SPINCOUNT" and chose_waiting)}
    environ.update(added)
    return added


@dataclass(frozen=True)
class ThreadChoice:
    """The threads one process takes, and why (for the start-up line and the world row)."""

    threads: int
    why: str
    warning: str | None = None


def choose_threads(requested: int, cores: int, quota: float | None = None, load: float | None = None,
                   ranks_per_node: int = 1) -> ThreadChoice:
    """Threads for one of ``ranks_per_node`` processes on a host.

    ``requested`` > 0 is the user's (``--threads N``) and is taken as it is. 0 (automatic) takes the
    cores this process may use (``cores``, its CPU affinity), at most the cgroup ``quota`` in cores
    (rounded down: threads beyond the quota are throttled for the rest of each period), split between
    the ranks on the host, and at least 1. The ``load`` of other work, in cores (:func:`other_work`,
    read at start-up, before this job adds to it), does not lower the count: with OpenMP's threads
    waiting passively, all the usable cores trained 1.6-2x the versions of one thread next to other
    work, while a count lowered by the load ran 2.3x fewer (results/threads-busy-machine.toml); it
    only makes the warning, when the load plus this job's threads exceed the usable cores (psadv will
    run, slower than on an idle machine), or when the user's count alone does.
    """
    cores = max(1, int(cores))
    ranks = max(1, int(ranks_per_node))
    usable = cores if quota is None else max(1, min(cores, math.floor(quota)))
    limit = f"{usable} usable core{'s' if usable != 1 else ''}"
    if quota is not None and usable < cores:
        limit += f" (a CPU quota of {quota:g} on {cores} cores)"
    if requested > 0:
        threads, why = int(requested), "--threads"
    else:
        threads = max(1, usable // ranks)
        why = f"automatic: {limit}" + (f" for {ranks} ranks" if ranks > 1 else "")
    warning = None
    ours = threads * ranks
    if requested > 0 and ours > usable:  # the user's own count: the load is theirs to judge
        warning = (f"psadv: warning: --threads {requested} x {ranks} rank{'s' if ranks != 1 else ''} on {limit} "
                   "oversubscribes them: expect it to run slower than with fewer threads")
    elif requested == 0 and (load or 0.0) + ours > usable + OVERSUBSCRIBED_SLACK:
        busy = f"other work on {load:.1f} cores before psadv, and " if load else ""
        warning = (f"psadv: warning: the machine is oversubscribed ({busy}{ours} psadv thread{'s' if ours != 1 else ''}"
                   f"{f' in {ranks} ranks' if ranks > 1 else ''} on {limit}): expect it to run slower than on an "
                   "idle machine; --threads N sets the count")
    return ThreadChoice(threads, why, warning)


# --- the edge: what the operating system says ---------------------------------------------------

def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which taskset, cpusets and Slurm set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_quota(root: str | os.PathLike = "/sys/fs/cgroup", self_cgroup: str | os.PathLike = "/proc/self/cgroup"
              ) -> float | None:
    """The CPU quota of this process's cgroup and its ancestors, in cores (the smallest), or None
    where there is none (or no cgroup file system: not Linux). cgroup v2's ``cpu.max`` ("QUOTA
    PERIOD" or "max PERIOD") and v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none)."""
    root = Path(root)
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2, the unified hierarchy
            for d in _ancestors(root, path):
                quotas.append(_read_v2(d / "cpu.max"))
        elif "cpu" in controllers.split(","):
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    for d in _ancestors(mount, path):
                        quotas.append(_read_v1(d))
                    break
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    parts = [p for p in path.strip("/").split("/") if p and p not in (".", "..")]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read_v2(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _read_v1(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def load_average() -> float | None:
    """The one-minute load average (runnable tasks, host-wide), or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def runnable_tasks(path: str | os.PathLike = "/proc/loadavg") -> int | None:
    """The tasks (threads, host-wide) runnable at this instant, this one included: the fourth field
    of Linux's ``/proc/loadavg`` ("RUNNABLE/TOTAL"); None where there is no such file."""
    try:
        return int(Path(path).read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def pick_threads(requested: int = 0, ranks_per_node: int = 1) -> ThreadChoice:
    """:func:`choose_threads` with this machine's facts."""
    load = other_work(load_average(), runnable_tasks())
    return choose_threads(requested, usable_cores(), cpu_quota(), load, ranks_per_node)
