"""scripts/dilate.py: time dilation of the MPI roles (issue 39; results/attackers-dilated-scaling.toml).

The padding logic runs on fake clocks; one short real ``mpiexec -n 2`` job checks that the
wrapped psadv reports k× the compute it did (c_a from the pushes' COMPUTE_US, c_s from the
server's busy time) and that the ranks spent the padding asleep.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("dilate", ROOT / "scripts" / "dilate.py")
dilate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dilate)


class FakeClock:
    """CPU and wall clocks that advance only when told; sleeping advances the wall clock."""

    def __init__(self, overshoot: float = 0.0):
        self.cpu_t = self.wall_t = 0.0
        self.overshoot = overshoot
        self.sleeps = []

    def work(self, cpu: float, wall: float | None = None):
        self.cpu_t += cpu
        self.wall_t += cpu if wall is None else wall

    def sleep(self, s: float):
        self.sleeps.append(s)
        self.wall_t += s + self.overshoot

    def dilator(self, k: float, **kw):
        return dilate.Dilator(k, cpu=lambda: self.cpu_t, wall=lambda: self.wall_t, sleep=self.sleep, **kw)


def test_a_unit_is_padded_to_k_times_its_cpu_time_and_nested_units_count_once():
    clock = FakeClock()
    dil = clock.dilator(3)
    inner = dil.unit(lambda: clock.work(0.010), "inner")
    outer = dil.unit(lambda: (clock.work(0.020), inner()), "outer")
    outer()
    assert clock.sleeps == [pytest.approx(0.060)]  # (3 - 1) × 30 ms, once, after the outer unit
    assert clock.wall_t == pytest.approx(0.090)
    assert dil.stats["by_unit"] == {"outer": {"calls": 1, "cpu_s": pytest.approx(0.030)}}


def test_contention_is_not_padded_again_and_is_credited_to_later_units():
    clock = FakeClock()
    dil = clock.dilator(2)
    unit = dil.unit(lambda cpu, wall: clock.work(cpu, wall), "u")
    unit(0.010, 0.050)  # descheduled: took 5× its CPU time, more than k = 2
    assert clock.sleeps == []
    assert dil.stats["overrun_s"] == pytest.approx(0.030)
    unit(0.040, 0.040)  # owes 40 ms, less the 30 ms credit
    assert clock.sleeps == [pytest.approx(0.010)]
    assert clock.wall_t == pytest.approx(2 * 0.050)  # on average k × the CPU time


def test_short_debts_carry_over_and_a_send_pays_everything_owed_first():
    clock = FakeClock()
    dil = clock.dilator(2, min_sleep=0.001)
    unit = dil.unit(lambda: clock.work(0.0004), "u")
    unit()
    unit()
    assert clock.sleeps == []  # 0.4 ms each: carried
    unit()  # 1.2 ms owed
    assert clock.sleeps == [pytest.approx(0.0012)]
    clock.sleeps.clear()
    unit()
    assert dil.before_send() == pytest.approx(0.0004)  # outside a unit, the 0.4 ms carried


def test_a_push_leaves_after_its_padding_and_its_compute_stamp_includes_it():
    from psadv import wire

    clock = FakeClock()
    dil = clock.dilator(4)
    sent = []

    class Comm:
        def Issend(self, buf, dest, tag):
            sent.append((clock.wall_t, int(np.asarray(buf[0])[:wire.HEADER_BYTES].view(np.int64)[wire.COMPUTE_US])))

        def Get_rank(self):
            return 1

    comm = dilate.DilatedComm(Comm(), dil, wire)
    msg = wire.Message(64)

    def push():  # like Attacker.push: compute, stamp the compute time, send
        start = clock.wall_t
        clock.work(0.025)
        msg.header[wire.COMPUTE_US] = int((clock.wall_t - start) * 1e6)
        comm.Issend([msg.buf[:wire.HEADER_BYTES], None], dest=0, tag=wire.TAG_PUSH)

    dil.unit(push, "push")()
    assert sent == [(pytest.approx(0.100), 100_000)]  # sent at 4 × 25 ms, stamped 100 ms
    assert clock.sleeps == [pytest.approx(0.075)]  # nothing owed after the send
    assert comm.Get_rank() == 1  # everything else passes through


def test_a_missing_method_is_named_and_nothing_is_wrapped(monkeypatch):
    from psadv import mpi, server

    monkeypatch.delattr(server.Server, "eval_step")
    before = server.Server.use
    with pytest.raises(dilate.DilationError, match=r"psadv.server.Server has no method 'eval_step'"):
        dilate.install(dilate.Dilator(2))
    assert server.Server.use is before and mpi.world.__module__ == "psadv.mpi"


def test_install_wraps_and_undo_restores():
    from psadv import attacker, mpi, server

    before = (server.Server.use, attacker.Attacker.push, mpi.world)
    undo = dilate.install(dilate.Dilator(2))
    try:
        assert server.Server.use.__wrapped__ is before[0] and attacker.Attacker.push.__wrapped__ is before[1]
        assert mpi.world is not before[2]
    finally:
        undo()
    assert (server.Server.use, attacker.Attacker.push, mpi.world) == before


def test_bad_command_lines_are_one_line_errors():
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "scripts" / "dilate.py"), *args], capture_output=True,
                              text=True, env={**os.environ, "PSADV_MPI": "0"}, timeout=60)

    for args, fragment in ((["--factor", "0.5", "--", "train"], "--factor must be >= 1"),
                           (["--factor", "2", "train"], "after --")):
        r = run(*args)
        assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr


def test_a_dilated_mpi_job_reports_k_times_its_compute(tmp_path, mnist_dir):
    """mpiexec -n 2 with k = 12: c_a (COMPUTE_US) and c_s (busy) come out about k × the CPU time the
    ranks' units took, and the attacker's padded time is k × its CPU time, the rest asleep. (Undilated,
    the ratios are the machine's contention, 1 to ~5 here: far below k.)"""
    assert shutil.which("mpiexec"), "mpiexec (pip MPICH) must be on PATH"
    k = 12
    run_dir, stats = tmp_path / "run", tmp_path / "stats"
    cmd = ["mpiexec", "-n", "2", sys.executable, str(ROOT / "scripts" / "dilate.py"), "--factor", str(k),
           "--stats", str(stats), "--", "train", "--data-dir", str(mnist_dir.parent), "--threads", "1",
           "--steps", "10", "--eval-examples", "20", "--eval-steps", "1", "--log-every", "4", "--no-progress",
           "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    server, attacker = (json.loads((stats / f"dilation-rank{i}.json").read_text()) for i in (0, 1))
    push_cpu = attacker["by_unit"]["Attacker.push"]["cpu_s"]
    stamped = summary["attacker_compute_seconds"]["1"]
    # upper bounds loose: a machine slowing the work by more than k cannot be padded back
    assert 0.75 * k < stamped / push_cpu < 2 * k, (stamped, push_cpu)
    use_cpu = server["by_unit"]["Server.use"]["cpu_s"]
    assert summary["server_seconds"]["busy"] > 0.75 * k * use_cpu, (summary["server_seconds"], use_cpu)
    padded = attacker["wall_s"] + attacker["slept_s"]
    assert 0.9 * k < padded / attacker["cpu_s"] < 2 * k and attacker["slept_s"] > 0, attacker


sweep_spec = importlib.util.spec_from_file_location("dilation_sweep", ROOT / "scripts" / "dilation_sweep.py")
sweep = importlib.util.module_from_spec(sweep_spec)
sweep_spec.loader.exec_module(sweep)


def test_the_sweep_keeps_cpu_demand_within_the_cores_and_compares_rates_times_k():
    assert [sweep.factor_for(n, 1.5, 6) for n in (1, 2, 4, 8, 16, 32)] == [6, 6, 6, 6, 12, 22]
    assert sweep.factor_for(2, 1.5, 1) == 2
    # N = 2 at k = 12 producing half the dilated rate of N = 1 at k = 6 is the same equivalent rate: speedup 2
    rec = {"dilated": [{"attackers": 1, "examples_per_s_equiv": 100.0 * 6},
                       {"attackers": 2, "examples_per_s_equiv": 100.0 * 12}],
           "undilated": [{"attackers": 1, "examples_per_s": 300.0, "c_s": 0.01, "c_a": 0.02, "staleness_mean": 2.0}],
           "model": {"predicted_speedup": {"1": 1.0, "2": 2.0}}}
    rec["dilated"][0].update(c_s_equiv=0.01, c_a_equiv=0.03, staleness_mean=2.2)
    sweep.speedups(rec)
    assert [r["speedup"] for r in rec["dilated"]] == [1.0, 2.0]
    assert rec["undilated"][0]["dilated_vs_undilated"]["examples_per_s"] == 2.0
    assert rec["undilated"][0]["dilated_vs_undilated"]["c_a"] == 1.5


def test_the_record_is_valid_toml_with_the_schema_keys(tmp_path):
    import tomllib

    result = {"recipes": [{"name": "examples", "dilated": [{"attackers": 1, "k": 6.0, "command": "mpiexec -n 2 x",
                                                            "examples_per_s": 10.0, "dilation": None}],
                           "undilated": [], "model": {"command": "psadv scaling-report 'a\"b'"}}]}
    fields = {"id": "r", "title": "t", "question": "q", "status": "current", "date": "2026-12-06", "commit": "abc",
              "page": "scaling", "seeds": [5], "summary": "s", "commands": ["python scripts/dilation_sweep.py"]}
    sweep.write_record(result, tmp_path / "r.toml", fields, 'notes with """ and \\ inside')
    d = tomllib.loads((tmp_path / "r.toml").read_text())
    assert d["commands"] == ["python scripts/dilation_sweep.py", "mpiexec -n 2 x", "psadv scaling-report 'a\"b'"]
    assert d["notes"].startswith('notes with """ and \\ inside')
    assert d["table"]["rows"][0][:4] == ["examples", 1, 6.0, 10.0] and d["table"]["rows"][0][5] == ""
    assert {"machine", "evaluation", "seeds", "page"} <= d.keys()
