"""The asynchronous parameter server under ``mpiexec -n 3`` (PyPI MPICH wheel), plus its wire protocol.

Each MPI test starts a real job (``mpiexec -n N python -m psadv.cli train ...``) with a hard
timeout and a tiny budget, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import without

from psadv import wire
from psadv.checkpoint import find_checkpoint, load_checkpoint
from psadv.config import STALENESS_LR, make_config
from psadv.errors import ConfigError
from psadv.launch import check_mpi_options
from psadv.metrics import row_problems, well_typed
from psadv.mpi import Backoff, launched_by_mpi, launcher_mismatch

MPIEXEC = shutil.which("mpiexec")
needs_mpi = pytest.mark.usefixtures("mpiexec")  # skipped without it, failed in CI (conftest.require_program)

SMALL = ["--eval-every", "0", "--eval-examples", "100", "--eval-steps", "2", "--batch-size", "50",
         "--attack-steps", "2", "--log-every", "10", "--no-progress"]


FAULT_ENTRY = Path(__file__).with_name("fault_entry.py")


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _cmd(n: int, mnist_dir: Path, run_dir: Path, *args: str, fault: str | None = None) -> list[str]:
    """``mpiexec -n N psadv train …``; with ``fault``, through the test-only fault entry point."""
    program = [str(FAULT_ENTRY), fault] if fault else ["-m", "psadv.cli"]
    return [MPIEXEC, "-n", str(n), sys.executable, *program, "train", "--data-dir", str(mnist_dir),
            "--run-dir", str(run_dir), *args]


def run_job(n: int, mnist_dir: Path, run_dir: Path, *args: str, timeout: float = 90, fault: str | None = None,
            **env):
    return subprocess.run(_cmd(n, mnist_dir, run_dir, *args, fault=fault), capture_output=True, text=True,
                          timeout=timeout, env=_env(**env))


def rows(run_dir: Path, kind: str | None = None) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or row["kind"] == kind:
            out.append(row)
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"job ended (rc {proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def signal_at_version(cmd: list[str], run_dir: Path, version: int, sig, timeout: float = 60) -> tuple:
    """Start ``cmd``, send ``sig`` once ``run_dir`` has a train row at ``version`` or later, and wait:
    (return code, stdout, stderr). The process never outlives the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        wait_for(lambda: [r for r in rows(run_dir, "train") if r["version"] >= version], 60, proc,
                 f"version {version}")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- wire protocol (no MPI needed) ------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_examples_roundtrip_and_validation(dtype):
    layout = wire.ExampleLayout((1, 28, 28), batch_size=8, wire_dtype=dtype)
    msg = wire.Message(layout.max_bytes)
    rng = np.random.default_rng(0)
    x = rng.random((5, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 5)
    nbytes = layout.pack(msg, x.astype(layout.dtype), y)
    msg.set_header(wire.EXAMPLES, version=3, count=5, sender=2, progress=0.25, dtype=layout.dtype_code, nbytes=nbytes)
    assert wire.progress_of(msg.header) == pytest.approx(0.25)
    check = dict(batch_size=8, version=7, layout=layout, num_classes=10)
    assert wire.validate_push(msg, msg.message_bytes(), 2, **check) is None
    xs, ys = layout.views(msg, 5)
    np.testing.assert_allclose(xs.astype(np.float32), x, atol=1e-3 if dtype == "float16" else 0)
    np.testing.assert_array_equal(ys, y)
    # bytes on the wire: header + pixels + int32 labels
    assert msg.message_bytes() == wire.HEADER_BYTES + layout.nbytes(5)
    assert "sender" in wire.validate_push(msg, msg.message_bytes(), 1, **check)
    assert "version" in wire.validate_push(msg, msg.message_bytes(), 2, **{**check, "version": 2})
    assert "bytes" in wire.validate_push(msg, msg.message_bytes() - 8, 2, **check)
    xs[0, 0, 0, 0] = np.nan
    assert "non-finite" in wire.validate_push(msg, msg.message_bytes(), 2, **check)
    xs[0, 0, 0, 0] = 1.5
    assert "outside [0, 1]" in wire.validate_push(msg, msg.message_bytes(), 2, **check)
    xs[0, 0, 0, 0] = 0.5
    ys[0] = 10
    assert "labels" in wire.validate_push(msg, msg.message_bytes(), 2, **check)


def test_gradient_validation():
    layout = wire.GradientLayout([(2, 3)], [(4,)])
    msg = wire.Message(layout.max_bytes)
    nbytes = layout.pack(msg, [np.ones((2, 3), np.float32)], [np.ones(4, np.float32)])
    assert nbytes == 40
    msg.set_header(wire.GRADIENTS, version=0, count=4, sender=1, nbytes=nbytes)
    # the batch's statistics ride in the int64 header as float64 bit patterns
    for field, value in ((wire.LOSS, 0.6931), (wire.ACCURACY, 0.75), (wire.PENALTY, float("nan"))):
        wire.set_float(msg.header, field, value)
    assert (wire.get_float(msg.header, wire.LOSS), wire.get_float(msg.header, wire.ACCURACY)) == (0.6931, 0.75)
    assert np.isnan(wire.get_float(msg.header, wire.PENALTY)) and int(msg.header[wire.COUNT]) == 4
    check = dict(batch_size=4, version=0, layout=layout, num_classes=10)
    assert wire.validate_push(msg, msg.message_bytes(), 1, **check) is None
    for field, bad, good in ((wire.LOSS, float("inf"), 0.5), (wire.LOSS, float("nan"), 0.5), (wire.LOSS, -1.0, 0.5),
                             (wire.ACCURACY, 1.5, 0.5), (wire.ACCURACY, float("nan"), 0.5),
                             (wire.PENALTY, 3.0, 0.1), (wire.PENALTY, float("-inf"), float("nan"))):
        wire.set_float(msg.header, field, bad)
        assert "batch statistics out of range" in wire.validate_push(msg, msg.message_bytes(), 1, **check)
        wire.set_float(msg.header, field, good)
        assert wire.validate_push(msg, msg.message_bytes(), 1, **check) is None
    wire.set_float(msg.header, wire.LOSS, float("nan"))  # a NaN gradient is named first
    layout.values(msg)[3] = np.inf
    assert "non-finite" in wire.validate_push(msg, msg.message_bytes(), 1, **check)
    examples = wire.ExampleLayout((1, 28, 28), batch_size=4, wire_dtype="float32")
    assert "kind" in wire.validate_push(msg, msg.message_bytes(), 1, **{**check, "layout": examples})


def test_gradient_payload_is_parameter_gradients_then_float_buffers():
    import torch

    from psadv.models import build_model

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    layout = wire.GradientLayout.of(model)
    assert layout.size == 6 + 2 + 2 + 2 + 2 + 2  # weight, bias, BN weight, bias; then BN mean and var
    grads = [np.full(p.shape, i, np.float32) for i, p in enumerate(model.parameters())]
    buffers = [np.full(2, 10 + i, np.float32) for i in range(2)]
    msg = wire.Message(layout.max_bytes)
    assert layout.pack(msg, grads, buffers) == layout.max_bytes == 16 * 4
    got_grads, got_buffers = layout.split(torch.from_numpy(layout.values(msg)))
    for want, got in zip(grads + buffers, got_grads + got_buffers):
        np.testing.assert_array_equal(got.numpy(), want)
    assert [tuple(g.shape) for g in got_grads] == [(2, 3), (2,), (2,), (2,)]
    small = build_model("mnist-small", in_channels=1, num_classes=10)
    assert wire.GradientLayout.of(small).size == sum(p.numel() for p in small.parameters())  # no buffers


def test_examples_carry_their_training_set_indices_for_refinement():
    layout = wire.ExampleLayout((1, 28, 28), batch_size=4, wire_dtype="float32", train_size=100)
    plain = wire.ExampleLayout((1, 28, 28), batch_size=4, wire_dtype="float32")
    assert layout.nbytes(3) == plain.nbytes(3) + 16  # three int32 indices (12 bytes), 8-byte aligned
    msg = wire.Message(layout.max_bytes)
    x, y, idx = np.full((3, 1, 28, 28), 0.5, np.float32), np.array([1, 2, 3]), np.array([7, 99, 0])
    nbytes = layout.pack(msg, x, y, idx)
    msg.set_header(wire.EXAMPLES, version=0, count=3, sender=1, dtype=layout.dtype_code, nbytes=nbytes)
    check = dict(layout=layout, batch_size=4, version=0, num_classes=10)
    assert wire.validate_push(msg, msg.message_bytes(), 1, **check) is None
    np.testing.assert_array_equal(layout.indices(msg, 3), idx)
    np.testing.assert_array_equal(layout.views(msg, 3)[1], y)
    layout.indices(msg, 3)[1] = 100
    assert "indices outside 0..99" in wire.validate_push(msg, msg.message_bytes(), 1, **check)


def test_backoff_doubles_to_cap_and_resets():
    b = Backoff(start=1e-5, cap=4e-5)
    for _ in range(4):
        b.wait()
    assert b.delay == 4e-5
    b.reset()
    assert b.delay == 1e-5


def test_fault_injection_lives_in_the_tests_only():
    root = Path(__file__).resolve().parents[1] / "psadv"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "PSADV_FAULT" not in text and "fault_entry" not in text and "injected fault" not in text, path


def test_plain_process_is_not_mpi(monkeypatch):
    for var in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PSADV_MPI",
                "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    assert not launched_by_mpi()


def test_a_launcher_of_another_mpi_is_named_not_run_as_n_single_processes():
    """mpiexec of MPICH with an mpi4py of Open MPI: three processes that each see a world of one."""
    why = launcher_mismatch(1, {"PMI_SIZE": "3"})
    assert why and "started 3 processes but MPI sees 1" in why and "MPI4PY_MPIABI" in why
    assert "started 4" in launcher_mismatch(1, {"OMPI_COMM_WORLD_SIZE": "4"})
    assert "started 2" in launcher_mismatch(1, {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    assert launcher_mismatch(3, {"PMI_SIZE": "3"}) is None  # the same MPI: fine
    assert launcher_mismatch(1, {"PMI_SIZE": "1"}) is None  # mpiexec -n 1 is one process
    assert launcher_mismatch(1, {"SLURM_STEP_NUM_TASKS": "2"}) is None  # a job's variable, not a step's
    assert launcher_mismatch(1, {}) is None


# --- whole jobs ------------------------------------------------------------------------------
@needs_mpi
def test_examples_mode_trains_checkpoints_rejects_a_nan_push_and_nothing_stale(tmp_path, mnist_dir):
    run = tmp_path / "run"
    res = run_job(3, mnist_dir, run, "--steps", "30", "--push", "examples", "--max-staleness", "1000", "--wire-dtype", "float16", *SMALL,
                  fault="nan-push,rank=1,after=2")
    assert res.returncode == 0, res.stderr
    s = summary(run)
    assert s["stop_reason"] == "version budget" and s["version"] == 30 and s["examples_seen"] == 1500
    assert s["push"] == "examples" and s["attackers"] == 2
    # a large S rejects nothing stale; the one NaN push is rejected as invalid and never used
    assert s["rejected_stale"] == 0 and s["rejected_invalid"] == 1
    assert "rejected a push from rank 1: non-finite values" in res.stderr
    assert rows(run, "rejected")[0]["sender"] == 1
    assert sum(s["staleness_histogram"].values()) == s["applied"] == 30
    assert s["staleness_max"] >= 0 and s["staleness_mean"] is not None
    assert set(s["produced_examples"]) == {"1", "2"} and all(v > 0 for v in s["produced_examples"].values())
    # float16 pixels: 2 bytes each, plus labels and header
    assert 28 * 28 * 2 < s["push_bytes_per_example"] < 28 * 28 * 2 + 10 + wire.HEADER_BYTES
    ckpt = load_checkpoint(find_checkpoint(run))
    assert ckpt.state["version"] == 30 and ckpt.state["mpi"]["applied"] == 30
    assert ckpt.extra["staleness_hist"].sum() == 30
    assert ckpt.config["push"] == "examples" and ckpt.config["lr"] == STALENESS_LR  # attackers: the lower peak
    assert all(np.isfinite(t.numpy()).all() for t in ckpt.model_state.values())
    train = rows(run, "train")
    assert [r["version"] for r in train] == [10, 20, 30]
    assert all({"examples_per_s", "produced_per_s", "utilization", "staleness_mean"} <= set(r) for r in train)
    assert {r["rank"] for r in rows(run, "attacker")} == {1, 2}
    assert rows(run, "world")[0]["size"] == 3
    assert [row_problems(r) for r in rows(run)] == [[]] * len(rows(run))  # every row as psadv.metrics declares
    assert all(map(well_typed, rows(run)))  # which the reports' reader keeps
    assert "stopped (version budget) at version 30" in res.stdout


@needs_mpi
@pytest.mark.parametrize("push", ["gradients", "sync"])
def test_gradients_and_sync_modes_train_and_checkpoint(tmp_path, mnist_dir, push):
    run = tmp_path / push
    res = run_job(3, mnist_dir, run, "--steps", "20", "--push", push, "--ema-decay", "0.9", *SMALL,
                  *(["--lr-damping"] if push == "gradients" else []),  # sync has no staleness to damp
                  fault="nan-push,rank=2,after=2")
    assert res.returncode == 0, res.stderr
    s = summary(run)
    assert s["version"] == 20 and s["push"] == push
    assert s["rejected_invalid"] == 1 and "non-finite values in the gradient" in res.stderr
    ckpt = load_checkpoint(find_checkpoint(run))
    assert ckpt.state["version"] == 20
    assert all(np.isfinite(t.numpy()).all() for t in ckpt.model_state.values())
    # --ema-decay on the server: model/ holds the weight average, the live weights lie apart
    average = np.concatenate([t.numpy().ravel() for t in ckpt.model_state.values()])
    live = ckpt.extra["live_weights"]
    assert live.shape == average.shape and not np.allclose(live, average, atol=1e-4)
    # the attackers' batch statistics reach the server's train rows, as with pushes of examples
    train = rows(run, "train")
    assert train and all(np.isfinite(r["loss"]) and r["loss"] > 0 and 0 <= r["adv_acc"] <= 1 for r in train)
    assert not any("grad_align" in r for r in train)  # no penalty without --grad-align
    if push == "sync":
        # every version averages one gradient from each of the two attackers, all at staleness 0
        assert s["examples_seen"] == 20 * 2 * 50
        assert s["staleness_histogram"] == {"0": 40} and s["staleness_max"] == 0
    else:
        assert s["examples_seen"] == 20 * 50


@needs_mpi
def test_gradient_pushes_accumulate_k_per_version_with_delay_compensation(tmp_path, mnist_dir):
    run = tmp_path / "acc"
    res = run_job(3, mnist_dir, run, "--steps", "10", "--push", "gradients", "--accumulate", "2",
                  "--delay-compensation", "1", "--refresh-every", "1", *SMALL)
    assert res.returncode == 0, res.stderr
    s = summary(run)
    # two attackers' pushes, two to a version: every version steps on 2 × 50 examples
    assert s["version"] == 10 and s["examples_seen"] == 10 * 2 * 50
    assert s["applied"] >= 20 and s["rejected_stale"] == 0 and s["staleness_max"] >= 1
    ckpt = load_checkpoint(find_checkpoint(run))
    assert ckpt.state["version"] == 10
    assert all(np.isfinite(t.numpy()).all() for t in ckpt.model_state.values())


@needs_mpi
def test_attackers_refine_their_own_pushes_and_send_no_indices(tmp_path, mnist_dir):
    run = tmp_path / "ra"
    res = run_job(3, mnist_dir, run, "--steps", "20", "--push", "examples", "--refine-on", "attackers", "--refresh-every", "1",
                  *SMALL)
    assert res.returncode == 0, res.stderr
    s = summary(run)
    # the payload has no indices (the server refines nothing): a push of the server-refining layout
    # would be refused as invalid
    assert s["version"] == 20 and s["rejected_invalid"] == 0 and "rejected a push" not in res.stderr
    assert s["staleness_mean"] is not None


@needs_mpi
def test_the_server_refines_stale_pushes(tmp_path, mnist_dir):
    run = tmp_path / "refine"
    res = run_job(3, mnist_dir, run, "--steps", "20", "--push", "examples", "--refine-steps", "2", *SMALL,
                  fault="count-refines,rank=0")
    assert res.returncode == 0, res.stderr
    s = summary(run)
    refined = int(re.search(r"refined (\d+) pushes", res.stderr).group(1))
    stale = sum(n for tau, n in s["staleness_histogram"].items() if tau not in ("0",) and not tau.startswith(">"))
    assert refined == stale > 0  # every applied push with τ > 0, and nothing else
    # float32 pixels, an int32 label and an int32 index per example, and the header per push of 50
    assert s["push_bytes_per_example"] == pytest.approx(28 * 28 * 4 + 4 + 4 + wire.HEADER_BYTES / 50, abs=0.1)


@needs_mpi
@pytest.mark.parametrize("push,rank", [("examples", 0), ("gradients", 1)])
def test_bf16_reaches_the_server_step_and_the_attackers_but_not_evaluation(tmp_path, mnist_dir, push, rank):
    """--precision bf16 under MPI: the server's steps (pushes of examples) and the attackers'
    attacks and gradients run in bfloat16; the server's evaluation in float32."""
    run = tmp_path / push
    res = run_job(3, mnist_dir, run, "--steps", "10", "--push", push, "--precision", "bf16", "--refine-steps", "0",
                  *SMALL, fault=f"count-precision,rank={rank}")
    assert res.returncode == 0, res.stderr
    counts = dict((f"{phase} {dtype}", int(n)) for phase, dtype, n in
                  re.findall(r"(\w+) (\w+) (\d+)", re.search(rf"rank {rank}: conv outputs (.*)", res.stderr).group(1)))
    assert counts.get("train bfloat16", 0) > 0 and "train float32" not in counts
    if rank == 0:
        assert counts.get("eval float32", 0) > 0 and "eval bfloat16" not in counts
    assert summary(run)["version"] == 10


@needs_mpi
@pytest.mark.parametrize("push,rank", [("examples", 0), ("gradients", 1)])
def test_grad_align_is_computed_where_the_clean_batch_is(tmp_path, mnist_dir, push, rank):
    """Pushes of examples: the server regularises around the clean examples the indices name;
    pushes of gradients: each attacker adds the penalty to the loss it differentiates."""
    run = tmp_path / push
    res = run_job(3, mnist_dir, run, "--steps", "10", "--push", push, "--attack", "fgsm", "--grad-align", "0.5",
                  "--eps-ramp", "0", "--refine-steps", "0", *without(SMALL, "--attack-steps"),
                  fault=f"count-grad-align,rank={rank}")
    assert res.returncode == 0, res.stderr
    assert "GradAlign λ=0.5" in res.stderr or "GradAlign λ=0.5" in res.stdout
    penalties = int(re.search(rf"rank {rank}: GradAlign penalties (\d+)", res.stderr).group(1))
    s = summary(run)
    if push == "examples":
        assert penalties == s["version"] == 10  # one per optimizer step, on the server
    else:
        assert 0 < penalties <= s["version"] + 2  # one per push of attacker 1 (in flight at the end too)
    train = rows(run, "train")
    assert train and all(0 < r["grad_align"] < 2 for r in train)  # the window's mean, in every train row


@pytest.mark.parametrize("values,message", [
    ({"refine_steps": 1, "push": "gradients"}, "--refine-steps continues stale adversarial examples: it needs --push examples"),
    ({"refine_steps": 1, "augment": "crop-flip", "push": "examples"}, "--refine-steps under MPI needs --augment none"),
    ({"grad_align": 0.5, "augment": "crop-flip", "push": "examples"},
     "--grad-align with --push examples needs --augment none"),
    ({"emulate_attackers": 8}, "--emulate-attackers and --emulate-staleness are for one process"),
])
def test_options_that_cannot_work_under_mpi_are_refused_on_every_rank(values, message):
    """Every rank runs this check in the first collective phase, so the job ends at once with the
    message printed once (test_user_error_on_rank0_ends_every_rank: an error on every rank)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_mpi_options(make_config(values))
    check_mpi_options(make_config({**values, "augment": "none", "push": "examples", "refine_steps": 0,
                                   "emulate_attackers": 0}))
    check_mpi_options(make_config({"grad_align": 0.5, "augment": "crop-flip", "push": "gradients"}))


@needs_mpi
def test_attackers_reuse_their_shards_perturbations(tmp_path, mnist_dir):
    run = tmp_path / "reuse"
    res = run_job(3, mnist_dir, run, "--steps", "12", "--push", "examples", "--reuse-perturbations", "--checkpoint-every", "0",
                  *SMALL)
    assert res.returncode == 0, res.stderr
    assert summary(run)["version"] == 12
    assert "perturbations" not in load_checkpoint(find_checkpoint(run)).extra  # the attackers keep theirs


@needs_mpi
def test_zero_staleness_forces_rejections(tmp_path, mnist_dir):
    run = tmp_path / "s0"
    res = run_job(3, mnist_dir, run, "--steps", "12", "--push", "examples", "--max-staleness", "0", *SMALL)
    assert res.returncode == 0, res.stderr
    s = summary(run)
    assert s["version"] == 12
    assert s["rejected_stale"] > 0 and s["rejected_fraction"] > 0
    assert s["staleness_max"] == 0 and s["staleness_histogram"]["0"] == 12
    assert s["staleness_histogram"][">0"] == s["rejected_stale"]


@needs_mpi
def test_one_push_in_flight_keeps_staleness_low(tmp_path, mnist_dir):
    """One attacker with one push in flight and fresh parameters every version: pushes are one or two
    versions old (with 3 in flight the same run measured a mean of 3.5 and a max of 6). One where the
    attack costs more than a server step (a quiet CPU: mean ≤ 1.5), two where it costs less (a GPU,
    or a loaded CPU): the server takes pushes into a queue of two buffers while it trains on the
    oldest (results/gpu-h200-session.toml). At most 4 (one in flight, two queued, the parameters a message
    behind; at most 3 measured). Without refinement: with this 2-step attack one refinement step
    costs the server as much as the attacker's batch, so the server, not the pushes in flight, would
    set the staleness."""
    run = tmp_path / "inflight"
    res = run_job(2, mnist_dir, run, "--steps", "40", "--push", "examples", "--max-in-flight", "1", "--refresh-every", "1",
                  "--refine-steps", "0", *SMALL)
    assert res.returncode == 0, res.stderr
    s = summary(run)
    assert s["version"] == 40 and s["rejected_stale"] == 0
    assert s["staleness_mean"] <= 2 and s["staleness_max"] <= 4, s["staleness_histogram"]


@needs_mpi
@pytest.mark.parametrize("rank", [2, 0])
def test_an_exception_on_any_rank_ends_the_job_nonzero(tmp_path, mnist_dir, rank):
    run = tmp_path / "raise"
    start = time.monotonic()
    res = run_job(3, mnist_dir, run, "--steps", "100000", *SMALL, timeout=60,
                  fault=f"raise,rank={rank},after=3")
    assert time.monotonic() - start < 30
    assert res.returncode != 0
    assert f"psadv: error: rank {rank} of 3 on " in res.stderr and "injected fault" in res.stderr
    assert "Traceback" in res.stderr  # a bug, not a user error: the traceback is shown


@needs_mpi
def test_user_error_on_rank0_ends_every_rank(tmp_path, mnist_dir):
    run = tmp_path / "exists"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    res = run_job(3, mnist_dir, run, "--steps", "5", *SMALL, timeout=60)
    assert res.returncode == 2
    assert res.stderr.count("already holds a run") == 1
    bad = run_job(3, tmp_path / "nowhere", tmp_path / "r2", "--steps", "5", *SMALL, timeout=60)
    assert bad.returncode == 1 and bad.stderr.count("psadv: error:") == 1
    assert not (tmp_path / "r2").exists()


@needs_mpi
def test_idle_attackers_sleep_while_the_server_stalls_and_kill_9_ends_the_job(tmp_path, mnist_dir):
    run = tmp_path / "idle"
    # The server stops working at version 20 (test-only fault): the attackers fill their
    # in-flight slots and the server queue, then wait (Iprobe + back-off).
    args = ["--steps", "100000", "--eval-every", "0", "--batch-size", "50", "--attack-steps", "2",
            "--log-every", "20", "--no-progress"]
    proc = subprocess.Popen(_cmd(3, mnist_dir, run, *args, fault="stall,rank=0,after=20"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        world = wait_for(lambda: rows(run, "world"), 60, proc, "the world row")[0]
        pids = {r["rank"]: int(r["pid"]) for r in world["ranks"]}
        wait_for(lambda: rows(run, "train"), 60, proc, "version 20")
        time.sleep(1.0)  # let them fill the bounded queue
        before = {r: cpu_seconds(pids[r]) for r in (1, 2)}
        t0 = time.monotonic()
        time.sleep(2.0)
        used = {r: (cpu_seconds(pids[r]) - before[r]) / (time.monotonic() - t0) for r in (1, 2)}
        assert [r["version"] for r in rows(run, "train")] == [20], "the server should be stalled at version 20"
        assert all(u < 0.10 for u in used.values()), f"idle attackers used {used} of a core"
        os.kill(pids[2], signal.SIGKILL)
        start = time.monotonic()
        proc.wait(timeout=30)
        assert proc.returncode != 0
        assert time.monotonic() - start < 20
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@needs_mpi
def test_evaluation_does_not_stall_training(tmp_path, mnist_dir):
    """The server evaluates a snapshot in pieces while it keeps training on the attackers' pushes."""
    run = tmp_path / "evalrun"
    result = run_job(3, mnist_dir, run, "--steps", "120", "--push", "examples", "--eval-every", "30", "--eval-examples", "500",
                     "--eval-steps", "5", "--batch-size", "50", "--attack-steps", "2", "--log-every", "2",
                     "--no-progress", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = rows(run)
    first_eval = next(i for i, r in enumerate(metrics) if r["kind"] == "eval")
    assert metrics[first_eval]["version"] == 30
    trained_meanwhile = [r["version"] for r in metrics[:first_eval] if r["kind"] == "train" and r["version"] > 30]
    assert trained_meanwhile, "no training step happened while version 30 was evaluated"
    evals = [r for r in metrics if r["kind"] == "eval"]
    assert [r["version"] for r in evals] == [30, 60, 90, 120]
    assert all(r["examples"] == 500 for r in evals)


@needs_mpi
def test_sigterm_checkpoints_and_resume_continues_the_version_counter(tmp_path, mnist_dir):
    run = tmp_path / "term"
    # SIGTERM to mpiexec, which forwards it to every rank
    code, out, err = signal_at_version(_cmd(3, mnist_dir, run, "--steps", "100000", "--checkpoint-every", "0", *SMALL),
                                       run, 20, signal.SIGTERM, timeout=30)
    assert code == 0, err
    s = summary(run)
    assert s["stop_reason"] == "signal SIGTERM"
    stopped = s["version"]
    ckpt = load_checkpoint(find_checkpoint(run))
    assert ckpt.state["version"] == stopped >= 20
    assert ckpt.state["examples_seen"] == stopped * 2 * 50  # a synchronous version: both attackers' batches
    streams = ckpt.state["mpi"]["attacker_streams"]
    assert len(streams) == 2 and all(pos >= 0 for _, pos in streams)

    res = subprocess.run([MPIEXEC, "-n", "3", sys.executable, "-m", "psadv.cli", "train", "--resume", str(run),
                          "--steps", str(stopped + 10), "--no-progress"], capture_output=True, text=True,
                         timeout=90, env=_env())
    assert res.returncode == 0, res.stderr
    s2 = summary(run)
    assert s2["stop_reason"] == "version budget" and s2["version"] == stopped + 10
    assert s2["examples_seen"] == (stopped + 10) * 2 * 50
    assert s2["applied"] == s["applied"] + 2 * 10  # the counters continue too (a push per attacker a version)
    versions = [r["version"] for r in rows(run, "train")]
    assert versions == sorted(versions) and versions[-1] > stopped


@needs_mpi
def test_sigterm_ends_a_job_whose_attacker_hangs_while_the_ranks_exit(tmp_path, mnist_dir):
    """Training has ended and every rank is exiting, which waits in MPI_Finalize for all of them; one
    attacker stops there. SIGTERM must still end the job: ranks keep the signal's default action
    once their command has ended (psadv.cli._after_the_command). Ignoring it hung such jobs until a
    SIGKILL (results/fault-bench-100.toml, hung-term at the end of training)."""
    for attempt in range(3):  # the window between the summary and the job's end is short
        run = tmp_path / f"hungend{attempt}"
        proc = subprocess.Popen(_cmd(3, mnist_dir, run, "--steps", "20", *SMALL), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
        pids, stopped = {}, False
        try:
            world = wait_for(lambda: rows(run, "world"), 60, proc, "the world row")[0]
            pids = {r["rank"]: int(r["pid"]) for r in world["ranks"]}
            deadline = time.monotonic() + 90
            # Stop the attacker only once its command has ended and SIGTERM is back at its default
            # action: stopped while psadv's handler still held the signal, it stayed pending on the
            # stopped rank and the job's end waited on mpiexec (a flaky failure under load).
            while not ((run / "summary.json").exists() and _sigterm_is_default(pids[1])) \
                    and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            try:
                os.kill(pids[1], signal.SIGSTOP)
                stopped = proc.poll() is None
            except ProcessLookupError:  # it had already exited: too late, try again
                pass
            if stopped:
                proc.send_signal(signal.SIGTERM)
                start = time.monotonic()
                proc.communicate(timeout=30)  # before the fix: no end until SIGKILL
                assert time.monotonic() - start < 20
                break
        finally:
            for pid in pids.values():
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert stopped, "the attacker never ended its command with SIGTERM at its default action before it exited"
    s = summary(run)
    assert s["version"] == 20 and load_checkpoint(find_checkpoint(run)).state["version"] == 20


def _sigterm_is_default(pid: int) -> bool:
    """Whether SIGTERM has its default action in process ``pid``: neither caught nor ignored
    (/proc/PID/status); False once the process has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    masks = dict(line.split(":\t") for line in status.splitlines() if line.startswith(("SigCgt", "SigIgn")))
    bit = 1 << (signal.SIGTERM - 1)
    return not (int(masks["SigCgt"], 16) | int(masks["SigIgn"], 16)) & bit


@needs_mpi
def test_one_rank_runs_the_single_process_trainer(tmp_path, mnist_dir):
    run = tmp_path / "one"
    res = run_job(1, mnist_dir, run, "--steps", "5", *SMALL)
    assert res.returncode == 0, res.stderr
    s = summary(run)
    assert s["version"] == 5 and "push" not in s


def test_no_pickle_on_the_wire():
    """Only mpi4py's upper-case (buffer) calls: the lower-case ones pickle Python objects."""
    import re

    root = Path(__file__).resolve().parents[1] / "psadv"
    lower = re.compile(r"\.(send|recv|isend|irecv|issend|bcast|gather|allgather|scatter|allreduce|reduce|"
                       r"sendrecv|probe|iprobe|mprobe|improbe|mrecv)\(")
    for name in ("wire.py", "server.py", "attacker.py", "mpi.py", "launch.py"):
        text = (root / name).read_text()
        assert not lower.search(text), f"{name}: {lower.search(text).group(0)}"
        assert not re.search(r"^\s*(import|from)\s+pickle", text, re.M), name
