"""A stop request (a signal) ends any evaluation within seconds: every attack loop checks it.

Before psadv/stop.py a SIGTERM during a strong evaluation waited for the current 500-example batch
(minutes of APGD-T and Square): past SLURM's grace period, so the SIGKILL that followed lost every
version since the last checkpoint. The process tests below send real signals to real processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from psadv import stop
from psadv.attacks.suite import EvalSettings, build_cascade
from psadv.checkpoint import CheckpointManager, find_checkpoint, load_checkpoint
from psadv.grading import AccuracyJob, measure_accuracy
from psadv.rundir import prepare
from test_mpi import _cmd, _env, needs_mpi, rows, summary, wait_for

# A signal must end the work within this many seconds (the bound; SLURM's default grace
# period, KillWait, is 30 s).
WITHIN_S = 5.0


class Counting(nn.Module):
    """A linear classifier of 1x8x8 images that counts its forward passes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(64, 10)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x.flatten(1)) * 10


def _images(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g)


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce", "apgd-t", "square", "fab-t"])
def test_every_attack_loop_stops_within_an_iteration(attack):
    model = Counting()
    x = _images()
    y = model(x).argmax(1)  # every example correct: nothing ends the attack early
    # ε so small nothing flips: every loop would run to its end (100 iterations x 9 targets, 5,000 queries)
    settings = EvalSettings(eps=1e-4, steps=200, restarts=5, apgd_steps=100, targets=9, queries=5000)
    (cascade,) = build_cascade(attack, settings)
    model.calls = 0
    with pytest.raises(stop.Stopped), stop.stoppable(lambda: model.calls >= 3):
        cascade.run(model, x, y, torch.Generator().manual_seed(0))
    assert model.calls <= 6, model.calls  # the request was seen within an iteration or two


def test_outside_a_stoppable_block_a_caught_signal_cuts_nothing_short():
    """An MPI attacker's training batch runs whole (the server expects every push complete): a
    signal its flag caught stops it between batches, never inside an attack."""
    from psadv.stop import SignalFlag

    model = Counting()
    x = _images()
    y = model(x).argmax(1)
    (pgd,) = build_cascade("pgd", EvalSettings(eps=1e-4, steps=7, restarts=1))
    model.calls = 0
    pgd.run(model, x, y)
    whole = model.calls
    flag = SignalFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.stop_requested()
        model.calls = 0
        pgd.run(model, x, y)
    finally:
        flag.restore()
    assert model.calls == whole and not stop.requested()


def test_a_stopped_job_is_done_and_records_nothing():
    model = Counting()
    x = _images(12)
    y = model(x).argmax(1)
    requested = []
    job = AccuracyJob(model, x, y, build_cascade("strong", EvalSettings(eps=1e-4, apgd_steps=5, targets=2, queries=50)), batch_size=4,
                      seed=0, stop=lambda: bool(requested))
    job.step()  # one batch runs to its end
    requested.append(True)
    assert job.step() == 0 and job.done and job.stopped and job.result() is None
    assert model.training  # the evaluation's eval mode is undone even when cut short
    with pytest.raises(stop.Stopped):
        measure_accuracy(model, x, y, build_cascade("square", EvalSettings(eps=1e-4)), stop=lambda: True)


def test_stale_checkpoint_temporaries_are_removed_under_the_lock(tmp_path):
    """Each SIGKILL during a checkpoint write used to leave a .ckpt-*.tmp-* file forever. (The run's
    lock, held by whoever prepared it, is what makes them stale: no other process writes there.)"""
    run = prepare(tmp_path / "run")
    directory = run.checkpoints
    stale = [directory / ".ckpt-00000010.h5.tmp-4242-abcd", directory / ".ckpt-00000020.h5.tmp-17-x"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    other = directory / "notes.txt"
    other.write_text("mine")
    assert sorted(CheckpointManager(run).stale_removed) == sorted(stale)
    run.release()
    assert not any(p.exists() for p in stale) and other.read_text() == "mine"


# --- real processes, real signals ----------------------------------------------------------------
# A strong evaluation that runs for minutes: ε = 0.001 flips almost nothing, so APGD-CE, APGD-T (9
# targets x 100 iterations) and Square (5,000 queries) each run to their ends on 500 examples.
SLOW_STRONG = ["--attack", "none", "--eps", "0.001", "--eval-attack", "strong", "--eval-examples", "500",
               "--batch-size", "50", "--log-every", "5", "--threads", "1", "--no-progress"]


def _psadv(*args) -> list[str]:
    return [sys.executable, "-m", "psadv.cli", *map(str, args)]


def _signal_and_time(proc, sig) -> tuple[str, str, float]:
    proc.send_signal(sig)
    start = time.monotonic()
    out, err = proc.communicate(timeout=60)
    return out, err, time.monotonic() - start


def _kill(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_a_signal_during_a_periodic_strong_evaluation_ends_the_run_within_seconds(tmp_path, mnist_dir):
    run_dir = tmp_path / "periodic"
    proc = subprocess.Popen(_psadv("train", "--data-dir", mnist_dir, "--run-dir", run_dir, "--steps", "1000",
                                   "--eval-every", "5", "--checkpoint-every", "0", *SLOW_STRONG),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        wait_for(lambda: rows(run_dir, "train"), 60, proc, "the train row of version 5")
        time.sleep(1.5)  # inside the evaluation of version 5 (minutes long)
        out, err, took = _signal_and_time(proc, signal.SIGTERM)
    finally:
        _kill(proc)
    assert proc.returncode == 0 and took < WITHIN_S and "Traceback" not in err, (took, err)
    s = summary(run_dir)
    assert s["stop_reason"] == "signal SIGTERM" and s["version"] == 5 and s["last_eval"] is None
    assert load_checkpoint(find_checkpoint(run_dir)).state["version"] == 5  # saved before it ended
    assert not rows(run_dir, "eval")  # a part of an evaluation records nothing


def test_a_signal_during_the_final_strong_evaluation_ends_it_within_seconds(tmp_path, mnist_dir):
    run_dir = tmp_path / "final"
    proc = subprocess.Popen(_psadv("train", "--data-dir", mnist_dir, "--run-dir", run_dir, "--steps", "5",
                                   "--eval-every", "0", *SLOW_STRONG),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        wait_for(lambda: list((run_dir / "checkpoints").glob("ckpt-*.h5")), 60, proc, "the final checkpoint")
        time.sleep(1.5)
        out, err, took = _signal_and_time(proc, signal.SIGUSR1)
    finally:
        _kill(proc)
    assert proc.returncode == 0 and took < WITHIN_S and "Traceback" not in err, (took, err)
    s = summary(run_dir)
    assert s["final_evaluation"] == "interrupted (signal SIGUSR1)" and s["version"] == 5


def test_psadv_eval_ends_on_a_signal_with_one_line_and_its_exit_code(tmp_run_copy):
    proc = subprocess.Popen(_psadv("eval", tmp_run_copy, "--examples", "500", "--eps", "0.001", "--threads", "1",
                                   "--no-progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        time.sleep(6)  # loaded, and well inside the first batch
        assert proc.poll() is None, proc.communicate()
        out, err, took = _signal_and_time(proc, signal.SIGTERM)
    finally:
        _kill(proc)
    assert took < WITHIN_S, took
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("psadv: error: evaluation of "), err
    assert "interrupted by SIGTERM" in lines[0] and out == ""


@pytest.fixture
def tmp_run_copy(tmp_path, tiny_run) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


@needs_mpi
def test_the_server_ends_a_periodic_strong_evaluation_within_seconds(tmp_path, mnist_dir):
    """The server evaluates in pieces of 50 examples between pushes; one piece of the strong cascade
    still took longer than SLURM's grace period before its attacks checked the signal."""
    run_dir = tmp_path / "mpi"
    proc = subprocess.Popen(_cmd(2, mnist_dir, run_dir, "--steps", "100000", "--eval-every", "5",
                                 "--checkpoint-every", "0", *SLOW_STRONG),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        wait_for(lambda: rows(run_dir, "train"), 60, proc, "the first train row")
        time.sleep(2)  # the evaluation of version 5 runs (minutes long)
        out, err, took = _signal_and_time(proc, signal.SIGTERM)
    finally:
        _kill(proc)
    assert proc.returncode == 0 and took < WITHIN_S and "Traceback" not in err, (took, err)
    s = summary(run_dir)
    assert s["stop_reason"] == "signal SIGTERM" and not rows(run_dir, "eval")
    assert load_checkpoint(find_checkpoint(run_dir)).state["version"] == s["version"] >= 5
