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
    """mpiexec -n 2 with k = 6: c_a (COMPUTE_US) and c_s (busy) come out about k × the CPU time the
    ranks' units took, and the attacker spent most of its time asleep."""
    assert shutil.which("mpiexec"), "mpiexec (pip MPICH) must be on PATH"
    k = 6
    run_dir, stats = tmp_path / "run", tmp_path / "stats"
    cmd = ["mpiexec", "-n", "2", sys.executable, str(ROOT / "scripts" / "dilate.py"), "--factor", str(k),
           "--stats", str(stats), "--", "train", "--data-dir", str(mnist_dir.parent), "--threads", "1",
           "--steps", "12", "--eval-examples", "20", "--eval-steps", "1", "--log-every", "4", "--no-progress",
           "--run-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    server, attacker = (json.loads((stats / f"dilation-rank{i}.json").read_text()) for i in (0, 1))
    push_cpu = attacker["by_unit"]["Attacker.push"]["cpu_s"]
    stamped = summary["attacker_compute_seconds"]["1"]
    # the overrun credit evens timings out over units: allow the first and last pushes' slack
    assert 0.75 * k < stamped / push_cpu < 1.3 * k, (stamped, push_cpu)
    use_cpu = server["by_unit"]["Server.use"]["cpu_s"]
    assert summary["server_seconds"]["busy"] > 0.75 * k * use_cpu, (summary["server_seconds"], use_cpu)
    asleep = attacker["slept_s"] / (attacker["wall_s"] + attacker["slept_s"])
    assert asleep > 0.5, attacker  # ideally (k - 1) / k = 0.83; less where the machine is busy
