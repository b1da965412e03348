"""A real one-node SLURM on localhost for the tests marked ``slurm``: munged, slurmctld, slurmd.

Nothing is installed here: the daemons come from the system (Debian: ``apt-get install slurmctld
slurmd slurm-client munge``, which ``.ci/run`` does). :class:`SlurmCluster` writes a munge key and a
``slurm.conf`` into a temporary directory, starts the three daemons in the foreground as children of
the test process (so that they are stopped by their own pids and nothing outlives the session), waits
for the node to be idle and gives the clients (``sbatch``, ``scontrol``, ``scancel``) an environment
that points at that configuration (``SLURM_CONF``). Every port is picked free at start-up, so a
SLURM or a second test session on the same machine does not collide with it.

Run as root (CI runs as root): SlurmUser and SlurmdUser are root, and the jobs run as the submitter.

``python tests/slurm_cluster.py DIR`` starts one by hand and prints the environment to use it with;
Ctrl-C stops it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
NODE = "localhost"


def missing_binaries() -> list[str]:
    """The SLURM and munge programs this cluster needs that are not on PATH (or in /usr/sbin)."""
    return [name for name in (*DAEMONS, *CLIENTS) if find(name) is None]


def find(name: str) -> str | None:
    # the daemons live in /usr/sbin, which a non-login root shell may not have on PATH
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def _die_with_parent() -> None:
    """In the child before exec: TERM when the test process dies, even by KILL, so that no daemon
    outlives a test session that could not tear down (prctl PR_SET_PDEATHSIG, Linux)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_memory_mb() -> int:
    """What the node may offer jobs: 90% of MemTotal (slurmd drains a node that claims more than it has)."""
    kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    return int(kb / 1024 * 0.9)


def slurm_conf(root: Path, *, cpus: int, memory_mb: int, ctld_port: int, slurmd_port: int, first_job_id: int) -> str:
    """The configuration of a one-node cluster in ``root``; the why of each timer beside it."""
    return f"""\
ClusterName=psadvtest
# MPICH names its shared memory after the job step (job id.step id): a session whose job ids start
# where another's did would meet that one's segments of a killed step in /dev/shm
FirstJobId={first_job_id}
SlurmctldHost={NODE}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s)
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in a container: processes are tracked by parentage, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
# a requeued job starts once it is eligible again, not at the next minute's scheduling pass
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# requeue (scontrol requeue, the scripts' own requeue after USR1) must be allowed
JobRequeue=1
PreemptType=preempt/none
PreemptMode=OFF
ReturnToService=2
# finished jobs stay queryable (scontrol show job) for the rest of the test session: there is no
# accounting database to ask afterwards
MinJobAge=600
# TERM, then KILL this long after: psadv checkpoints on TERM within seconds
KillWait=15
SlurmdTimeout=10
SlurmctldTimeout=10
MessageTimeout=10
InactiveLimit=0
Waittime=0
NodeName={NODE} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost, configured in ``root``."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict:
        """The environment of a client command: this cluster's configuration, no job's variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin"
        return env

    def start(self, timeout: float = 60) -> SlurmCluster:
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"SLURM is not installed (missing {', '.join(missing)})")
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        for sub in ("munge", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket directory others can write to, and a key others can read
        (self.root / "munge").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        munge = self.root / "munge"
        self._spawn("munged", [find("munged"), "--foreground", "--force", f"--socket={munge}/munge.socket",
                               f"--key-file={key}", f"--pid-file={munge}/munged.pid",
                               f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"])
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged did not create its socket")
        self.conf.write_text(slurm_conf(self.root, cpus=self.cpus, memory_mb=real_memory_mb(),
                                        ctld_port=free_port(), slurmd_port=free_port(),
                                        first_job_id=secrets.randbelow(60_000_000) + 1_000_000))
        # -i: ignore any state of an earlier session (there is none in a fresh directory anyway)
        self._spawn("slurmctld", [find("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [find("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait(lambda: self.node_state() == "idle", timeout, "the node did not become idle")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")  # noqa: SIM115 - the daemon holds it
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, env=self.env, preexec_fn=_die_with_parent)
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} ({', '.join(dead) + ' exited; ' if dead else ''}logs in {self.root}):\n"
                                   + self.logs())
            time.sleep(0.2)

    def node_state(self) -> str:
        res = subprocess.run([find("sinfo"), "-h", "-n", NODE, "-o", "%t"], env=self.env, capture_output=True,
                             text=True, timeout=30)
        return res.stdout.strip() if res.returncode == 0 else ""

    def active_jobs(self) -> list[str]:
        """Ids of jobs that are pending, running or being killed (empty if slurmctld does not answer)."""
        res = subprocess.run([find("squeue"), "-h", "-o", "%i %t"], env=self.env, capture_output=True, text=True,
                             timeout=30)
        return [line.split()[0] for line in res.stdout.splitlines()] if res.returncode == 0 else []

    def logs(self, tail: int = 20) -> str:
        out = []
        for log in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")) + \
                sorted((self.root / "munge").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job and wait for it to go (a job's processes are not slurmd's children and
        would outlive it), then TERM each daemon, slurmd first, and KILL any still there 10 s later."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run([find("scancel"), "--full", "--user=root"], env=self.env, capture_output=True,
                           timeout=30)
            deadline = time.monotonic() + 30
            while self.active_jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-node SLURM for the session. Without SLURM (or without root) the tests skip,
    unless PSADV_REQUIRE_ALL=1 (CI), where that is a failure."""
    why = None
    if missing := missing_binaries():
        why = (f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
               "slurm-client munge")
    elif os.geteuid() != 0:
        why = "the SLURM tests run slurmctld and slurmd as root"
    if why:
        if os.environ.get("PSADV_REQUIRE_ALL") == "1":
            pytest.fail(f"{why} (PSADV_REQUIRE_ALL=1)", pytrace=False)
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


if __name__ == "__main__":
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the daemons on TERM as on Ctrl-C
    cluster = SlurmCluster(Path(sys.argv[1]).resolve()).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
