"""The SLURM batch scripts under a real SLURM: submission, USR1 requeue-and-resume, preemption, kill -9, sweep.

The ``slurm`` fixture (tests/slurm_cluster.py) runs munged, slurmctld and slurmd on localhost; the
jobs are submitted with ``sbatch`` as a cluster user would, their resources overridden for this
machine's CPUs (``-n 3 -O``: three tasks overcommitted on two cores, no GPUs). Progress is read from
the run's own records, never from log lines: with ``--log-every 1`` the metrics hold one train row per
version, each session of the run (one per job start) begins with a ``world`` row, and a session that
stopped in order ends with an ``end`` row; the checkpoints carry their version.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import find, slurm  # noqa: F401 - slurm is the session fixture

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "slurm"
# three tasks on this machine's cores (-O: overcommit), no GPUs; the script's own directives otherwise
CPU_JOB = ["-O", "--cpus-per-task=1", "--gres=none"]
TINY = ["--batch-size", "20", "--attack-steps", "1", "--eval-examples", "20", "--eval-steps", "1", "--eval-every", "0",
        "--log-every", "1", "--keep-checkpoints", "1000"]  # every checkpoint a start resumed from stays to be checked


def job_env(slurm, **extra) -> dict:
    env = {k: v for k, v in slurm.env.items() if not k.startswith("PSADV_")}
    env.update(PYTHONPATH=str(ROOT), PSADV=f"{sys.executable} -m psadv.cli", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", **extra)
    return env


def sbatch(slurm, cwd: Path, args: list, **env) -> str:
    res = subprocess.run([find("sbatch"), "--parsable", f"--chdir={cwd}", *map(str, args)], env=job_env(slurm, **env),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def job(slurm, job_id: str) -> dict:
    """JobState, Restarts and ExitCode of a job, as ``scontrol show job`` says."""
    res = subprocess.run([find("scontrol"), "-o", "show", "job", job_id], env=slurm.env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return {key: re.search(rf"\b{key}=(\S+)", res.stdout).group(1) for key in ("JobState", "Restarts", "ExitCode")}


def wait_for(what: str, ready, slurm, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := ready()):
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s\n{slurm.logs()}"
        time.sleep(0.2)
    return value


def wait_done(slurm, job_id: str, out: Path, timeout: float = 600) -> dict:
    info = wait_for(f"job {job_id} done", lambda: (i := job(slurm, job_id))["JobState"] in
                    ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") and i, slurm, timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, read(out))
    return info


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def rows(run_dir: Path) -> list[dict]:
    from psadv.rundir import read_metrics  # skips a row a killed rank left half-written

    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.exists() else []


def sessions(run_dir: Path) -> list[list[dict]]:
    """The metrics split at each ``world`` row: one list per start of the job."""
    out = []
    for row in rows(run_dir):
        if row["kind"] == "world":
            out.append([])
        if out:
            out[-1].append(row)
    return out


def versions(session: list[dict]) -> list[int]:
    return [row["version"] for row in session if row["kind"] == "train"]


def checkpoint_versions(run_dir: Path) -> list[int]:
    from psadv.checkpoint import load_checkpoint

    return sorted(load_checkpoint(p).state["version"] for p in (run_dir / "checkpoints").glob("ckpt-*.h5"))


def trained_past(run_dir: Path, version: int, since: int = 0) -> bool:
    """Session ``since`` (0 = the first) of the run has trained beyond ``version``."""
    s = sessions(run_dir)
    return len(s) > since and any(v > version for v in versions(s[since]))


def step_pids(slurm, job_id: str) -> list[int]:
    """The processes of the job's step 0 (the psadv ranks), from ``scontrol listpids``."""
    res = subprocess.run([find("scontrol"), "listpids", job_id], env=slurm.env, capture_output=True, text=True,
                         timeout=30)
    return [int(line.split()[0]) for line in res.stdout.splitlines()[1:] if line.split()[2:3] == ["0"]]


def measured(test: str, **values) -> None:
    """One line of what a test measured (``pytest -s`` shows it; results/slurm-requeue.toml holds a run's)."""
    print(f"slurm-measured {test}: {json.dumps(values)}")


def start_seconds(start: list[dict]) -> float:
    """Seconds from a start's world row (every rank up) to its last row."""
    return round(start[-1]["wall"] - start[0]["wall"], 1)


def test_9gpu_script_trains_checkpoints_and_finishes_with_its_default_launcher(slurm, tmp_path, mnist_dir):
    job_id = sbatch(slurm, tmp_path, ["-n", "3", *CPU_JOB, SCRIPTS / "psadv-9gpu.sbatch", "--data-dir", mnist_dir,
                                      "--steps", "30", "--checkpoint-every", "10", *TINY])
    out = tmp_path / f"psadv-9gpu-{job_id}.out"  # the script's --output=%x-%j.out
    info = wait_done(slurm, job_id, out)
    run_dir = tmp_path / "runs" / f"psadv-9gpu-{job_id}"  # its default run directory
    assert info["Restarts"] == "0"
    [session] = sessions(run_dir)
    assert session[0]["size"] == 3  # srun --mpi=pmi2 gave the pip MPICH a world of three: server + 2 attackers
    assert versions(session) == list(range(1, 31))
    assert session[-1]["kind"] == "end" and session[-1]["stop_reason"] == "version budget"
    assert checkpoint_versions(run_dir) == [10, 20, 30]
    measured("submission", ranks=3, versions=30, checkpoints=[10, 20, 30], seconds=start_seconds(session))


def run_seconds(slurm, job_id: str) -> int:
    """How long the job's current start has run (scontrol's RunTime, [D-]HH:MM:SS)."""
    res = subprocess.run([find("scontrol"), "-o", "show", "job", job_id], env=slurm.env, capture_output=True,
                         text=True, timeout=30)
    days, _, clock = re.search(r"\bRunTime=(\S+)", res.stdout).group(1).rpartition("-")
    h, m, sec = map(int, clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def set_time_limit(slurm, job_id: str, minutes: int) -> None:
    subprocess.run([find("scontrol"), "update", f"JobId={job_id}", f"TimeLimit={minutes}"], env=slurm.env, check=True,
                   timeout=30)


def test_usr1_from_scancel_and_from_the_time_limit_checkpoint_requeue_and_resume_to_the_end(slurm, tmp_path,
                                                                                                mnist_dir):
    """USR1 to the batch shell, first from ``scancel --signal=USR1 --batch``, then from the time limit
    with the script's own ``--signal=B:USR1@120``: each time psadv checkpoints, the script requeues
    the job, and the next start resumes from that checkpoint; the third start trains to the end of
    the 45 s budget (training seconds across starts). Two processes (server + 1 attacker) keep the
    load down.

    The time limit is brought near once the second start trains: it is set to the next whole minute
    at least 60 s away, so that its warning is due at once and comes at SLURM's next time-limit check
    (every 30 s), at least 30 s before the limit; the third start gets 10 minutes again."""
    run_dir = tmp_path / "run"
    job_id = sbatch(slurm, tmp_path, ["-n", "2", *CPU_JOB, "--time=10", SCRIPTS / "psadv-9gpu.sbatch",
                                      "--data-dir", mnist_dir, "--time-budget", "45", "--checkpoint-every", "100",
                                      *TINY], PSADV_RUN_DIR=str(run_dir))
    out = tmp_path / f"psadv-9gpu-{job_id}.out"
    wait_for("a first train row", lambda: trained_past(run_dir, 0), slurm, 300)
    subprocess.run([find("scancel"), "--signal=USR1", "--batch", job_id], env=slurm.env, check=True, timeout=30)
    wait_for("the second start to train", lambda: trained_past(run_dir, 0, since=1), slurm, 300)
    set_time_limit(slurm, job_id, -(-(run_seconds(slurm, job_id) + 60) // 60))
    wait_for("the time limit's requeue", lambda: job(slurm, job_id)["Restarts"] == "2", slurm, 300)
    set_time_limit(slurm, job_id, 10)
    info = wait_done(slurm, job_id, out)

    starts = sessions(run_dir)
    assert info["Restarts"] == "2" and len(starts) == 3, read(out)
    assert read(out).count("requeueing job") == 2
    saved = checkpoint_versions(run_dir)
    for before, after in zip(starts, starts[1:]):
        end = before[-1]
        assert end["kind"] == "end" and end["stop_reason"] == "signal SIGUSR1", end
        assert end["version"] in saved  # its checkpoint, which the next start resumed from:
        assert versions(after)[0] == end["version"] + 1 == versions(before)[-1] + 1
    # no version trained twice, none skipped: 1..N once each across the three starts
    trained = [v for start in starts for v in versions(start)]
    assert trained == list(range(1, len(trained) + 1))
    last = starts[-1][-1]
    assert last["stop_reason"] == "time budget" and last["version"] == trained[-1]
    assert last["examples_seen"] == 20 * last["version"] and last["applied"] == last["version"]
    assert last["elapsed"] >= 45
    measured("usr1", stopped_at=[start[-1]["version"] for start in starts], resumed_at=[versions(start)[0] for start in
             starts], trained_twice=len(trained) - len(set(trained)), final_version=last["version"],
             restarts=int(info["Restarts"]), seconds=[start_seconds(start) for start in starts])


def test_preemption_and_kill_9_lose_at_most_the_work_since_the_last_checkpoint(slurm, tmp_path, mnist_dir):
    """``scontrol requeue`` (what preemption with PreemptMode=REQUEUE does: TERM, then KILL after
    KillWait) makes psadv checkpoint and the job start again from there: nothing lost. ``kill -9``
    of the job step's processes fails the job; requeued, it resumes from the last periodic
    checkpoint and retrains only the versions after it."""
    run_dir = tmp_path / "run"
    every, budget = 20, 200
    job_id = sbatch(slurm, tmp_path, ["-n", "2", *CPU_JOB, SCRIPTS / "psadv-9gpu.sbatch", "--data-dir", mnist_dir,
                                      "--steps", budget, "--checkpoint-every", every, *TINY],
                    PSADV_RUN_DIR=str(run_dir))
    out = tmp_path / f"psadv-9gpu-{job_id}.out"
    scontrol = find("scontrol")

    wait_for("version 5", lambda: trained_past(run_dir, 5), slurm, 300)
    subprocess.run([scontrol, "requeue", job_id], env=slurm.env, check=True, timeout=30)
    # the second start: 5 versions past a periodic checkpoint, then every rank killed at once
    wait_for("the second start past a checkpoint",
             lambda: len(sessions(run_dir)) == 2 and any(v % every == 5 for v in versions(sessions(run_dir)[1])),
             slurm, 300)
    pids = wait_for("the step's processes", lambda: step_pids(slurm, job_id), slurm, 120)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for("the job to fail", lambda: job(slurm, job_id)["JobState"] == "FAILED", slurm, 300)
    killed = versions(sessions(run_dir)[1])[-1]
    last_checkpoint = max(checkpoint_versions(run_dir))
    subprocess.run([scontrol, "requeue", job_id], env=slurm.env, check=True, timeout=30)
    wait_done(slurm, job_id, out)

    first, second, third = sessions(run_dir)
    preempted = first[-1]
    assert preempted["kind"] == "end" and preempted["stop_reason"] == "signal SIGTERM"
    assert versions(second)[0] == preempted["version"] + 1  # preemption lost nothing
    assert not [row for row in second if row["kind"] == "end"]  # killed: no end row
    # at most one checkpoint interval lost: a kill that lands while version `last + every` is being
    # saved (its train row written, its checkpoint not yet renamed into place) loses exactly `every`
    assert versions(third)[0] == last_checkpoint + 1 and killed - last_checkpoint <= every
    assert versions(third) == list(range(last_checkpoint + 1, budget + 1))
    assert third[-1]["stop_reason"] == "version budget" and third[-1]["examples_seen"] == 20 * budget
    measured("preemption", preempted_at=preempted["version"], resumed_at=versions(second)[0],
             lost=versions(first)[-1] - (versions(second)[0] - 1))
    measured("kill-9", killed_at=killed, last_checkpoint=last_checkpoint, resumed_at=versions(third)[0],
             lost=killed - last_checkpoint, checkpoint_every=every)


def test_sweep_script_runs_two_points_and_renders_its_scaling_report(slurm, tmp_path, mnist_dir):
    sweep = tmp_path / "sweep"
    job_id = sbatch(slurm, tmp_path, ["-n", "3", *CPU_JOB, SCRIPTS / "psadv-sweep.sbatch", "--data-dir", mnist_dir,
                                      *TINY], PSADV_SWEEP_DIR=str(sweep), PSADV_WORKERS="1 2", PSADV_TIME_BUDGET="3")
    wait_done(slurm, job_id, tmp_path / f"psadv-sweep-{job_id}.out")
    report = json.loads((sweep / "report.json").read_text())
    assert sorted(r["name"] for r in report["runs"]) == ["sync-w1", "sync-w2"]
    for name, attackers in (("sync-w1", 1), ("sync-w2", 2)):
        [start] = sessions(sweep / "runs" / name)
        assert start[0]["size"] == attackers + 1 and start[-1]["stop_reason"] == "time budget"
    assert [p["run"] for p in report["scaling"][0]["points"]] == ["sync-w1", "sync-w2"]
    md = (sweep / "report.md").read_text()
    assert "sync-w2" in md and all((sweep / plot).stat().st_size > 0 for plot in report["plots"])
    measured("sweep", runs=2, plots=len(report["plots"]))
