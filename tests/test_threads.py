"""Threads on a shared machine: the automatic count, cgroup quotas, OpenMP's wait policy, the warning."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import psadv
import psadv.threads
from cli_helpers import invoke
from conftest import REQUIRE_ALL, require, require_program
from psadv.threads import choose_threads, cpu_quota, other_work, quiet_openmp, runnable_tasks

ROOT = Path(__file__).resolve().parents[1]


# --- the choice: a pure function ------------------------------------------------------------------

def test_automatic_threads_take_the_usable_cores_and_warn_when_other_work_fills_them():
    idle = choose_threads(0, cores=2)
    assert (idle.threads, idle.why, idle.warning) == (2, "automatic: 2 usable cores", None)
    assert choose_threads(0, cores=2, load=0.4).warning is None  # a shell or two
    # other work does not lower the count (passive threads took more of a busy machine than one:
    # results/threads-busy-machine.toml); it makes the warning
    busy = choose_threads(0, cores=2, load=2.0)
    assert busy.threads == 2
    assert busy.warning == ("psadv: warning: the machine is oversubscribed (other work on 2.0 cores before psadv, and 2 "
                            "psadv threads on 2 usable cores): expect it to run slower than on an idle machine; "
                            "--threads N sets the count")
    assert choose_threads(0, cores=16, load=4.2).threads == 16


def test_other_work_counts_only_load_that_lasted_and_still_runs():
    # a run that ended seconds ago: the load average still says 1.5, only this process runs now
    assert other_work(1.5, 1) == 0.0
    assert choose_threads(0, cores=2, load=other_work(1.5, 1)).warning is None
    # a busy loop on each core for a minute: both agree
    assert other_work(2.1, 3) == 2.0
    assert "oversubscribed (other work on 2.0 cores" in choose_threads(0, cores=2, load=other_work(2.1, 3)).warning
    # a burst of short-lived processes at this instant: the load average has not seen them for long
    assert other_work(0.3, 9) == 0.3
    assert other_work(None, 4) is None and other_work(0.7, None) == 0.7  # what is not known


def test_runnable_tasks_reads_the_fourth_field_of_proc_loadavg(tmp_path):
    _write(tmp_path / "loadavg", "1.26 1.03 0.52 3/115 3583\n")
    assert runnable_tasks(tmp_path / "loadavg") == 3
    _write(tmp_path / "short", "1.26 1.03\n")
    assert runnable_tasks(tmp_path / "short") is None
    assert runnable_tasks(tmp_path / "absent") is None
    if Path("/proc/loadavg").exists():
        assert runnable_tasks() >= 1  # this test runs


def test_quota_and_ranks_per_node_bound_the_automatic_count():
    quota = choose_threads(0, cores=8, quota=1.5)  # rounded down: a thread past the quota is throttled
    assert quota.threads == 1 and quota.why == "automatic: 1 usable core (a CPU quota of 1.5 on 8 cores)"
    assert choose_threads(0, cores=8, quota=4.0).threads == 4
    assert choose_threads(0, cores=8, quota=16.0).threads == 8  # a quota above the cores changes nothing
    assert choose_threads(0, cores=8, quota=0.2).threads == 1  # at least one
    ranks = choose_threads(0, cores=8, ranks_per_node=3)
    assert ranks.threads == 2 and ranks.why == "automatic: 8 usable cores for 3 ranks" and ranks.warning is None
    crowded = choose_threads(0, cores=2, ranks_per_node=3)  # more ranks than cores: at least one each
    assert crowded.threads == 1 and "3 psadv threads in 3 ranks on 2 usable cores" in crowded.warning


def test_a_requested_count_is_kept_and_warned_about_only_beyond_the_cores():
    mine = choose_threads(1, cores=2, load=30.0)  # the user's choice: the load is theirs to judge
    assert (mine.threads, mine.why, mine.warning) == (1, "--threads", None)
    many = choose_threads(4, cores=2)
    assert many.threads == 4 and many.warning.startswith("psadv: warning: --threads 4 x 1 rank on 2 usable cores")


# --- the edge: what the operating system says -----------------------------------------------------

def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_smallest_on_the_way_to_the_root(tmp_path):
    root = tmp_path / "cgroup"
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "jobs" / "cpu.max", "300000 100000\n")
    _write(root / "jobs" / "job7" / "cpu.max", "150000 100000\n")
    _write(tmp_path / "self", "0::/jobs/job7\n")
    assert cpu_quota(root, tmp_path / "self") == 1.5
    _write(tmp_path / "free", "0::/\n")
    assert cpu_quota(root, tmp_path / "free") is None  # "max": no quota
    assert cpu_quota(root, tmp_path / "no-such-file") is None  # not Linux


def test_cgroup_v1_quota(tmp_path):
    cpu = tmp_path / "cgroup" / "cpu,cpuacct"
    _write(cpu / "cpu.cfs_quota_us", "-1\n")
    _write(cpu / "cpu.cfs_period_us", "100000\n")
    _write(cpu / "slurm" / "cpu.cfs_quota_us", "200000\n")
    _write(cpu / "slurm" / "cpu.cfs_period_us", "100000\n")
    _write(tmp_path / "self", "4:memory:/slurm\n2:cpu,cpuacct:/slurm\n")
    assert cpu_quota(tmp_path / "cgroup", tmp_path / "self") == 2.0
    _write(tmp_path / "top", "2:cpu,cpuacct:/\n")
    assert cpu_quota(tmp_path / "cgroup", tmp_path / "top") is None  # -1: no quota


def test_quiet_openmp_sets_a_short_spin_unless_the_user_chose():
    env = {"KMP_BLOCKTIME": "200"}
    assert quiet_openmp(env) == {"GOMP_SPINCOUNT": "10000"}
    assert env == {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "200"}
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": ""}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(chosen)  # a wait policy or spin count of the user's own gets no spin count added
        assert quiet_openmp(env) == {"KMP_BLOCKTIME": "0"} and env == {**chosen, "KMP_BLOCKTIME": "0"}


def test_the_command_line_sets_the_wait_policy_before_torch_loads_openmp():
    """libgomp reads its settings once, when ``import torch`` loads it: the CLI module must set them first."""
    probe = ("import os, sys\n"
             "class Probe:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch':\n"
             "            print('at torch import:', os.environ.get('GOMP_SPINCOUNT'), flush=True)\n"
             "        return None\n"
             "sys.meta_path.insert(0, Probe())\n"
             "import psadv.cli\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "at torch import: 10000"


# --- CLI and API ----------------------------------------------------------------------------------

@pytest.fixture
def machine(monkeypatch):
    """A 2-core machine without a quota whose load average the test sets (``machine(7.5)``); torch's
    thread count is put back after."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(psadv.threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(psadv.threads, "cpu_quota", lambda: None)
    monkeypatch.setattr(psadv.threads, "runnable_tasks", lambda: None)  # the load average alone
    yield lambda load: monkeypatch.setattr(psadv.threads, "load_average", lambda: load)
    torch.set_num_threads(threads)


def test_eval_warns_once_on_a_busy_machine_and_reports_its_threads(tiny_run, mnist_dir, machine):
    machine(7.5)
    args = ["eval", tiny_run, "--data-dir", mnist_dir, "--attack", "pgd", "--steps", 1, "--restarts", 1,
            "--examples", 4, "--json", "--no-progress"]
    busy = invoke(*args)
    assert busy.exit_code == 0, busy.stderr
    warnings = [line for line in busy.stderr.splitlines() if "oversubscribed" in line]
    assert warnings == ["psadv: warning: the machine is oversubscribed (other work on 7.5 cores before psadv, and 2 "
                        "psadv threads on 2 usable cores): expect it to run slower than on an idle machine; "
                        "--threads N sets the count"]
    assert json.loads(busy.stdout)["threads"] == 2
    chosen = invoke(*args, "--threads", 1)  # the user's count: no warning, the count as given
    assert chosen.exit_code == 0 and "oversubscribed" not in chosen.stderr
    assert json.loads(chosen.stdout)["threads"] == 1


def test_train_start_up_line_names_the_threads_and_why(tmp_path, mnist_dir, machine):
    machine(0.2)
    result = invoke("train", "--data-dir", mnist_dir, "--run-dir", tmp_path / "r", "--steps", 1, "--batch-size", 20,
                    "--attack-steps", 1, "--eval-examples", 4, "--eval-steps", 1, "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert "; 2 threads (automatic: 2 usable cores)\n" in result.stderr and "warning" not in result.stderr


def test_api_evaluate_takes_threads_and_restores_the_callers(tiny_run, mnist_dir):
    before = torch.get_num_threads()
    seen = []

    class Spy(torch.nn.Module):  # records the thread count it runs under
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            seen.append(torch.get_num_threads())
            return self.model(x)

    model = Spy(psadv.load_model(tiny_run))
    result = psadv.evaluate(model, data_dir=mnist_dir, attack="none", examples=3, threads=before + 1)
    assert result["examples"] == 3 and set(seen) == {before + 1} and torch.get_num_threads() == before
    with pytest.raises(psadv.ConfigError, match="threads must be an integer from 0"):
        psadv.evaluate(model, data_dir=mnist_dir, attack="none", threads=-1)


# --- tests that need an optional dependency fail in CI ----------------------------------------------

def test_require_skips_where_a_dependency_is_missing_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv(REQUIRE_ALL, raising=False)
    with pytest.raises(pytest.skip.Exception, match="cannot import psadv_no_such_module"):
        require("psadv_no_such_module", "pip install it")
    with pytest.raises(pytest.skip.Exception, match="psadv-no-such-program is not on PATH"):
        require_program("psadv-no-such-program")
    monkeypatch.setenv(REQUIRE_ALL, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_ALL}=1 requires"):
        require("psadv_no_such_module")
    with pytest.raises(pytest.fail.Exception):
        require_program("psadv-no-such-program")
    assert require("json") is json


def test_ci_requires_every_test_and_installs_the_extras_they_need():
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"export {REQUIRE_ALL}=1" in ci
    install = next(line for line in ci.splitlines() if "pip install" in line and "-e" in line)
    assert all(extra in install for extra in ("test", "onnx", "crosscheck", "mpich"))
    assert "--no-deps torchattacks==3.5.1" in ci
    # no test skips quietly on a missing package or program (missing hardware, a GPU, may still skip);
    # the patterns are spelled apart so that this file does not match them
    quiet = re.compile("importor" + "skip|skip" + r"if\([^)]*(which|MPIEXEC|find_spec|import)")
    for path in (ROOT / "tests").glob("test_*.py"):
        assert not quiet.search(path.read_text()), path.name


# --- the measurement script ----------------------------------------------------------------------------

def test_threads_bench_compares_the_default_with_the_best_setting():
    import importlib.util

    spec = importlib.util.spec_from_file_location("threads_bench", ROOT / "scripts" / "threads_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.settings_args("default") == ([], {})
    assert bench.settings_args("spin") == (["--threads", "2"], {"OMP_WAIT_POLICY": "", "KMP_BLOCKTIME": ""})
    assert bench.threads_of("psadv: run directory r; adversary: PGD-5 linf eps=0.3; 2 threads (automatic: 2 "
                            "usable cores)") == 2
    rows = [{"condition": "busy", "command": "train", "setting": "default", "versions": 100},
            {"condition": "busy", "command": "train", "setting": "1", "versions": 160},
            {"condition": "busy", "command": "train", "setting": "spin", "failed": "timed out"},
            {"condition": "busy", "command": "eval", "setting": "default", "seconds": 12.0, "wall_s": 30.0},
            {"condition": "busy", "command": "eval", "setting": "2", "seconds": 10.0, "wall_s": 40.0}]
    assert bench.slowdowns(rows) == [
        {"condition": "busy", "command": "train", "best": "1", "default_slowdown": 1.6},
        {"condition": "busy", "command": "eval", "best": "2", "default_slowdown": 1.2}]
