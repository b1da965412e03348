"""Nothing lost, whatever happens: locks, signals, divergence, resume rules, error paths.

Each test reproduces a way work used to be lost (real processes and signals where the bug is
about them); the MPI ones run ``mpiexec`` jobs with hard timeouts, so a hang fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from psadv.checkpoint import IncompatibleCheckpoint, find_checkpoint, list_checkpoints, load_checkpoint
from psadv.errors import CheckpointError, StorageError, TrainingDiverged, UsageError
from psadv.metrics import MetricsLog
from psadv.rundir import prepare
from psadv.runsetup import resolve_run
from psadv.single import train_single
from test_mpi import (FAULT_ENTRY, MPIEXEC, _cmd, _env, needs_mpi, rows, run_job, signal_at_version, summary,
                      wait_for)

from cli_helpers import assert_one_line_error, invoke, without

SMALL = dict(batch_size=50, attack_steps=2, eval_examples=100, eval_steps=2, eval_every=0, log_every=5, threads=1)
CLI_SMALL = ["--batch-size", "50", "--attack-steps", "2", "--eval-examples", "100", "--eval-steps", "2",
             "--eval-every", "0", "--log-every", "5", "--threads", "1", "--no-progress"]


def run(tmp_path, mnist_dir, name="run", resume=None, **options):
    overrides = {**({} if resume else SMALL), "data_dir": str(mnist_dir), "run_dir": str(tmp_path / name), **options}
    return train_single(resolve_run(overrides, resume=resume), show_progress=False)


def psadv_train(mnist_dir, run_dir, *args) -> list[str]:
    small = without(CLI_SMALL, "--attack-steps") if "--attack" in args else CLI_SMALL
    return [sys.executable, "-m", "psadv.cli", "train", "--data-dir", str(mnist_dir), "--run-dir", str(run_dir),
            *small, *args]


def strict_json_lines(path: Path) -> list[dict]:
    """Every line parses as strict JSON (no bare NaN) and is an object."""
    def no_constants(name):
        raise ValueError(f"non-JSON constant {name}")

    out = [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]
    assert all(isinstance(row, dict) for row in out)
    return out


# --- run directories and the lock -----------------------------------------------------------
def test_overwrite_of_a_live_run_is_refused(tmp_path, mnist_dir):
    run_dir = tmp_path / "live"
    proc = subprocess.Popen(psadv_train(mnist_dir, run_dir, "--steps", "100000", "--checkpoint-every", "20"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        wait_for(lambda: rows(run_dir, "train"), 60, proc, "the first train row")
        second = subprocess.run(psadv_train(mnist_dir, run_dir, "--steps", "10", "--overwrite"),
                                capture_output=True, text=True, timeout=60, env=_env())
        assert second.returncode == 2, second.stderr
        assert f"run directory {run_dir} is in use by another psadv process (pid {proc.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        resumed = subprocess.run([sys.executable, "-m", "psadv.cli", "train", "--resume", str(run_dir), "--no-progress"],
                                 capture_output=True, text=True, timeout=60, env=_env())
        assert resumed.returncode == 2 and "in use by another psadv process" in resumed.stderr
        assert proc.poll() is None, "the live run must keep training"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert summary(run_dir)["stop_reason"] == "signal SIGTERM"
    assert json.loads((run_dir / "config.json").read_text())["config"]["steps"] == 100000  # never replaced


def test_run_directory_that_cannot_be_made_is_one_line(tmp_path, mnist_dir):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for where in ("/proc/psadv-x", afile / "sub"):
        result = invoke("train", "--data-dir", mnist_dir, "--run-dir", where, "--steps", "1", "--no-progress")
        assert_one_line_error(result, 2, f"run directory {where}")


def test_a_start_up_error_leaves_no_run_directory(tmp_path, mnist_dir):
    result = invoke("train", "--data-dir", mnist_dir, "--run-dir", tmp_path / "big", "--batch-size", "1000000",
                    "--no-progress")
    assert_one_line_error(result, 2, "--batch-size 1000000 exceeds the training set (60000 examples)")
    assert not (tmp_path / "big").exists()
    # a failure after the directory was made (no such device) removes what it made, lock included
    result = invoke("train", "--data-dir", mnist_dir, "--run-dir", tmp_path / "dev", "--device", "cuda:7",
                    "--no-progress")
    assert result.exit_code == 2 and "CUDA" in result.stderr
    assert not (tmp_path / "dev").exists()
    # ... and an existing, empty directory the user made is kept, empty
    (tmp_path / "mine").mkdir()
    invoke("train", "--data-dir", mnist_dir, "--run-dir", tmp_path / "mine", "--device", "cuda:7", "--no-progress")
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())


def test_checkpoint_write_failure_is_one_line(tmp_path, mnist_dir):
    """``ulimit -f``: the file-size limit makes HDF5 fail while closing the file (EFBIG)."""
    run_dir = tmp_path / "efbig"
    cmd = " ".join(f"'{a}'" for a in psadv_train(mnist_dir, run_dir, "--steps", "10", "--checkpoint-every", "5"))
    res = subprocess.run(["bash", "-c", f"ulimit -f 400; exec {cmd}"], capture_output=True, text=True, timeout=120,
                         env=_env())
    assert res.returncode == 1, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("psadv: error:")]
    assert lines == [f"psadv: error: cannot save checkpoint {run_dir}/checkpoints/ckpt-00000005.h5: "
                     "File too large (errno 27)"], res.stderr
    assert "Traceback" not in res.stderr
    assert not list((run_dir / "checkpoints").glob("*.h5")) and not list((run_dir / "checkpoints").glob(".*tmp*"))


# --- resume rules ---------------------------------------------------------------------------
def test_resume_into_another_run_is_refused_and_an_empty_one_is_a_branch(tmp_path, mnist_dir):
    run(tmp_path, mnist_dir, name="a", steps=10)
    run(tmp_path, mnist_dir, name="b", steps=5)
    b_before = (tmp_path / "b" / "metrics.jsonl").read_text()
    with pytest.raises(UsageError, match="already holds a run.*branch"):
        run(tmp_path, mnist_dir, name="b", resume=str(tmp_path / "a"), steps=20)
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == b_before
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["ckpt-00000005.h5"]
    # an empty --run-dir: a new run that starts from a's checkpoint; a stays as it was
    a_files = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    s = run(tmp_path, mnist_dir, name="c", resume=str(tmp_path / "a"), steps=15)
    assert s["version"] == 15
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == a_files
    assert load_checkpoint(find_checkpoint(tmp_path / "c")).state["version"] == 15


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, mnist_dir, capsys):
    run(tmp_path, mnist_dir, name="r", steps=20, checkpoint_every=5, keep_checkpoints=4)
    ckpts = tmp_path / "r" / "checkpoints"
    names = [p.name for p in list_checkpoints(ckpts)]
    assert names == [f"ckpt-{v:08d}.h5" for v in (5, 10, 15, 20)]
    (ckpts / names[-1]).write_bytes((ckpts / names[-1]).read_bytes()[:3000])  # the newest is damaged
    with pytest.raises(CheckpointError, match=f"--resume {ckpts / names[-2]}"):
        resolve_run({}, resume=str(tmp_path / "r"))
    s = run(tmp_path, mnist_dir, name="r", resume=str(ckpts / names[1]), steps=25, checkpoint_every=5)
    assert s["version"] == 25
    assert "moved 2 newer checkpoints" in capsys.readouterr().err
    aside = [d for d in ckpts.iterdir() if d.is_dir()]
    assert len(aside) == 1
    assert sorted(p.name for p in aside[0].iterdir()) == sorted(names[2:] + ["metrics.jsonl", "summary.json"])
    # the abandoned line's rows went with it: the live log has no version above 10 before the resume's
    versions = [r["version"] for r in strict_json_lines(tmp_path / "r" / "metrics.jsonl") if "version" in r]
    first_after = versions.index(15)
    assert max(versions[:first_after]) == 10 and versions[first_after:] == sorted(versions[first_after:])
    assert max(r.get("version", 0) for r in strict_json_lines(aside[0] / "metrics.jsonl")) == 20
    # the line being trained is the only one "latest" and the rotation see
    assert [p.name for p in list_checkpoints(ckpts)] == [f"ckpt-{v:08d}.h5" for v in (10, 15, 20, 25)]
    assert load_checkpoint(find_checkpoint(tmp_path / "r")).state["version"] == 25
    assert run(tmp_path, mnist_dir, name="r", resume=str(tmp_path / "r"), steps=30)["version"] == 30


def files_of(run_dir: Path) -> dict:
    """Every file of a run and its bytes (the lock aside: it holds the pid of its last holder)."""
    return {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


def test_resume_with_options_the_checkpoint_cannot_continue_is_refused_before_anything_is_written(tmp_path,
                                                                                                     mnist_dir):
    """Another --optimizer used to fail at the first step (KeyError), after config.json had been
    rewritten (in place) or a run directory made (a branch); another --batch-size did not fit the
    data position."""
    run(tmp_path, mnist_dir, name="a", steps=4)
    before = files_of(tmp_path / "a")
    for flags, message in ((["--optimizer", "sgd"], "holds the state of --optimizer adam, not sgd"),
                           (["--batch-size", "30000"], "trained with --batch-size 50, not 30000")):
        result = invoke("train", "--resume", tmp_path / "a", "--steps", 8, "--no-progress", *flags)
        assert_one_line_error(result, 2, message, "train a new run")
        branch = invoke("train", "--resume", tmp_path / "a", "--run-dir", tmp_path / "b", "--steps", 8,
                        "--no-progress", *flags)
        assert_one_line_error(branch, 2, message)
        assert files_of(tmp_path / "a") == before and not (tmp_path / "b").exists()
    with pytest.raises(IncompatibleCheckpoint, match="--optimizer adam, not sgd"):
        resolve_run({"optimizer": "sgd"}, resume=str(tmp_path / "a"), prepare_dir=False)  # MPI's first phase too


def test_a_resume_that_fails_while_starting_up_leaves_the_run_as_it_was(tmp_path, mnist_dir, monkeypatch):
    """config.json, the metrics and final_eval.json of the run stay as they were until the resumed
    run has restored the whole checkpoint; then the resume works."""
    run(tmp_path, mnist_dir, name="a", steps=4)
    (tmp_path / "a" / "final_eval.json").write_text(json.dumps({"version": 4, "robust_acc": 0.5}))
    before = files_of(tmp_path / "a")

    def fails(state):
        raise CheckpointError("the generators' state does not fit")

    monkeypatch.setattr("psadv.single.restore_rng_state", fails)  # the last piece a resume restores
    with pytest.raises(CheckpointError, match="does not fit"):
        run(tmp_path, mnist_dir, name="a", resume=str(tmp_path / "a"), steps=6, weight_decay=0.5)
    assert files_of(tmp_path / "a") == before
    monkeypatch.undo()
    assert run(tmp_path, mnist_dir, name="a", resume=str(tmp_path / "a"), steps=6)["version"] == 6


def test_a_resume_trains_with_the_optimizer_settings_its_config_records(tmp_path, mnist_dir):
    """load_state_dict brings back the checkpoint's weight decay and momentum; config.json says the
    resume's, and the optimizer must use them (its param_groups, saved in the next checkpoint)."""
    run(tmp_path, mnist_dir, name="s", steps=2, optimizer="sgd", momentum=0.9, weight_decay=0.0)
    before = load_checkpoint(find_checkpoint(tmp_path / "s")).optimizer_state
    run(tmp_path, mnist_dir, name="s", resume=str(tmp_path / "s"), steps=4, momentum=0.5, weight_decay=0.25)
    after = load_checkpoint(find_checkpoint(tmp_path / "s"))
    assert {(g["momentum"], g["weight_decay"]) for g in after.optimizer_state["param_groups"]} == {(0.5, 0.25)}
    assert json.loads((tmp_path / "s" / "config.json").read_text())["config"]["weight_decay"] == 0.25
    assert before["state"] and after.optimizer_state["state"].keys() == before["state"].keys()  # the state carried on


def test_final_eval_json_grades_only_the_final_model(tmp_path, mnist_dir, capsys):
    """psadv eval --save refuses a run a trainer holds and a checkpoint older than the run's newest;
    a resume in place sets the grade of the old final model aside (never deleted)."""
    run(tmp_path, mnist_dir, name="r", steps=4, checkpoint_every=2)
    run_dir = tmp_path / "r"
    grade = ["--attack", "pgd", "--steps", 1, "--restarts", 1, "--examples", 10, "--threads", 1, "--no-progress",
             "--data-dir", mnist_dir]
    older = invoke("eval", run_dir / "checkpoints" / "ckpt-00000002.h5", *grade, "--save")
    assert_one_line_error(older, 2, "ckpt-00000002.h5 holds version 2, not the newest of", "(4)")
    trainer = prepare(run_dir, resume=True)  # what a training process holds for the whole run
    try:
        live = invoke("eval", run_dir, *grade, "--save")
    finally:
        trainer.release()
    assert_one_line_error(live, 2, f"{run_dir} is in use by another psadv process (pid {os.getpid()})")
    assert not (run_dir / "final_eval.json").exists()
    assert invoke("eval", run_dir, *grade, "--save").exit_code == 0  # and it lets the next trainer in:
    capsys.readouterr()
    assert run(tmp_path, mnist_dir, name="r", resume=str(run_dir), steps=6)["version"] == 6
    assert "moved final_eval.json to" in capsys.readouterr().err
    (aside,) = (run_dir / "checkpoints").glob("superseded-*/final_eval.json")
    assert json.loads(aside.read_text())["version"] == 4 and not (run_dir / "final_eval.json").exists()


# --- divergence -------------------------------------------------------------------------------
def test_divergence_stops_the_run_and_keeps_the_good_checkpoint(tmp_path, mnist_dir):
    run(tmp_path, mnist_dir, name="d", steps=10, checkpoint_every=5, keep_checkpoints=2)
    good = {p.name: p.read_bytes() for p in list_checkpoints(tmp_path / "d" / "checkpoints")}
    with pytest.raises(TrainingDiverged, match=r"training diverged at version 1[0-9]: .*ckpt-00000010\.h5.* kept"):
        run(tmp_path, mnist_dir, name="d", resume=str(tmp_path / "d"), steps=40, lr=1e30, lr_schedule="constant",
            checkpoint_every=2)
    after = {p.name: p.read_bytes() for p in list_checkpoints(tmp_path / "d" / "checkpoints")}
    assert after == good  # nothing NaN written, nothing good rotated away
    assert all(np.isfinite(t.numpy()).all() for t in load_checkpoint(find_checkpoint(tmp_path / "d")).model_state.values())
    strict_json_lines(tmp_path / "d" / "metrics.jsonl")


def test_metrics_rows_are_strict_json(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    end = dict(stop_reason="x", version=1, examples_seen=0, time_to_target=None, target_robust_acc=None,
               best_robust_acc=None)
    log.write("end", **end, elapsed=float("nan"), last_eval={"x": [float("inf"), 1.5]})
    log.close()
    assert strict_json_lines(tmp_path / "m.jsonl")[0] | {"wall": 0} == {"kind": "end", "wall": 0, **end, "elapsed": None,
                                                                         "last_eval": {"x": [None, 1.5]}}


def test_divergence_from_the_command_line_is_one_line(tmp_path, mnist_dir):
    result = invoke("train", "--data-dir", mnist_dir, "--run-dir", tmp_path / "x", "--steps", "30", "--lr", "1e30",
                    "--lr-schedule", "constant", *CLI_SMALL)
    assert result.exit_code == 1 and "Traceback" not in result.output + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("psadv: error:")]
    assert len(errors) == 1 and "training diverged at version 1: the training loss is nan" in errors[0]
    assert "no checkpoint had been written" in errors[0]
    assert not list((tmp_path / "x" / "checkpoints").glob("*.h5"))


# --- signals in one process ---------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_single_process_checkpoints_on_a_signal_and_resumes(tmp_path, mnist_dir, sig):
    run_dir = tmp_path / "sig"
    code, out, err = signal_at_version(psadv_train(mnist_dir, run_dir, "--steps", "100000", "--checkpoint-every", "0"),
                                       run_dir, 10, sig)
    assert code == 0, err
    s = summary(run_dir)
    assert s["stop_reason"] == f"signal {sig.name}" and f"stopped (signal {sig.name})" in out
    assert s["final_evaluation"] == f"skipped (signal {sig.name})"
    stopped = s["version"]
    assert load_checkpoint(find_checkpoint(run_dir)).state["version"] == stopped >= 10
    if sig == signal.SIGTERM:
        res = subprocess.run([sys.executable, "-m", "psadv.cli", "train", "--resume", str(run_dir),
                              "--steps", str(stopped + 5), "--no-progress"], capture_output=True, text=True,
                             timeout=90, env=_env())
        assert res.returncode == 0, res.stderr
        assert summary(run_dir)["version"] == stopped + 5


# A final evaluation of minutes (10,000 examples, PGD-20, a model that is mostly right after 20 clean
# steps), of which a signal should cost one batch.
LONG_FINAL_EVAL = ["--steps", "20", "--attack", "none", "--batch-size", "100", "--eval-examples", "10000",
                   "--eval-steps", "20"]


def signal_at_final_checkpoint(cmd, run_dir, signals):
    """Start ``cmd``, send ``signals`` (half a second apart) once its final checkpoint is written, while
    its final evaluation runs; the process, its stdout and stderr, and the seconds it took to end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        wait_for(lambda: list_checkpoints(run_dir / "checkpoints"), 90, proc, "the final checkpoint")
        start = time.monotonic()
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.5)
        out, err = proc.communicate(timeout=60)
        return proc, out, err, time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]], ids=["SIGTERM", "SIGINTx2"])
def test_a_signal_during_the_final_evaluation_finds_the_run_saved_and_cuts_it_short(tmp_path, mnist_dir, signals):
    """The final checkpoint used to come after the final evaluation, which ignored signals: SLURM's
    SIGTERM waited for it, and a second Ctrl-C aborted before anything was saved."""
    run_dir = tmp_path / "final"
    proc, out, err, took = signal_at_final_checkpoint(psadv_train(mnist_dir, run_dir, *LONG_FINAL_EVAL), run_dir,
                                                      signals)
    assert took < 20 and "Traceback" not in err, (took, err)
    assert load_checkpoint(find_checkpoint(run_dir)).state["version"] == 20
    if proc.returncode == 0:  # the first signal was enough (two may arrive as one)
        s = summary(run_dir)
        assert s["stop_reason"] == "version budget" and s["version"] == 20
        assert s["final_evaluation"] == f"interrupted (signal {signals[0].name})" and s["last_eval"] is None
        assert f"final evaluation interrupted (signal {signals[0].name})" in out
    else:  # a second Ctrl-C interrupts at once
        assert (len(signals), proc.returncode) == (2, 130), err
        assert err.strip().endswith("psadv: error: aborted")
    res = subprocess.run([sys.executable, "-m", "psadv.cli", "train", "--resume", str(run_dir), "--steps", "22",
                          "--eval-examples", "100", "--no-progress"], capture_output=True, text=True, timeout=90,
                         env=_env())
    assert res.returncode == 0, res.stderr
    assert summary(run_dir)["version"] == 22 and summary(run_dir)["final_evaluation"] == "measured"


# --- under MPI -----------------------------------------------------------------------------------
MPI_SMALL = ["--eval-every", "0", "--eval-examples", "100", "--eval-steps", "2", "--batch-size", "50",
             "--attack-steps", "2", "--log-every", "10", "--no-progress"]


@needs_mpi
def test_signal_with_a_hung_attacker_checkpoints_first_and_ends_in_bounded_time(tmp_path, mnist_dir):
    run_dir = tmp_path / "hung"
    proc = subprocess.Popen(_cmd(3, mnist_dir, run_dir, "--steps", "100000", "--checkpoint-every", "0", *MPI_SMALL),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    pids = {}
    try:
        pids = {r["rank"]: int(r["pid"]) for r in wait_for(lambda: rows(run_dir, "world"), 60, proc, "world")[0]["ranks"]}
        wait_for(lambda: [r for r in rows(run_dir, "train") if r["version"] >= 20], 60, proc, "version 20")
        os.kill(pids[2], signal.SIGSTOP)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0 and took < 30, (took, err)
    errors = [line for line in err.splitlines() if line.startswith("psadv: error:")]
    assert len(errors) == 1 and "rank 0 of 3" in errors[0] and "attacker 2 did not finish" in errors[0], err
    assert "is saved" in errors[0] and "Traceback" not in err
    s = summary(run_dir)
    assert s["stop_reason"] == "signal SIGTERM" and s["unfinished_attackers"] == [2]
    ckpt = load_checkpoint(find_checkpoint(run_dir))
    assert ckpt.state["version"] == s["version"] >= 20
    res = subprocess.run([MPIEXEC, "-n", "1", sys.executable, "-m", "psadv.cli", "train", "--resume", str(run_dir),
                          "--steps", str(s["version"] + 5), "--no-progress"], capture_output=True, text=True,
                         timeout=90, env=_env())
    assert res.returncode == 0, res.stderr
    assert summary(run_dir)["version"] == s["version"] + 5


@needs_mpi
def test_the_server_saves_before_its_final_evaluation_and_a_signal_cuts_that_short(tmp_path, mnist_dir):
    """The server ends a run as the single process does (Trainer.end_run), with its attackers waiting."""
    run_dir = tmp_path / "final"
    proc, out, err, took = signal_at_final_checkpoint(
        _cmd(3, mnist_dir, run_dir, *LONG_FINAL_EVAL, "--log-every", "10", "--no-progress"), run_dir, [signal.SIGTERM])
    assert proc.returncode == 0 and took < 20, (took, err)
    s = summary(run_dir)
    assert s["stop_reason"] == "version budget" and s["final_evaluation"] == "interrupted (signal SIGTERM)"
    assert load_checkpoint(find_checkpoint(run_dir)).state["version"] == s["version"] >= 20


@needs_mpi
def test_stop_is_checked_after_pushes_that_do_not_advance_the_model(tmp_path, mnist_dir):
    """The server rejects every push (test-only fault) while its queue never empties; the time
    budget must still end the run."""
    run_dir = tmp_path / "reject"
    start = time.monotonic()
    res = run_job(3, mnist_dir, run_dir, "--steps", "100000", "--time-budget", "6", *MPI_SMALL, timeout=90,
                  fault="reject,rank=0")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - start < 60
    s = summary(run_dir)
    assert s["stop_reason"] == "time budget" and s["version"] == 0


@needs_mpi
def test_mpi_run_directory_that_cannot_be_made_is_one_line(tmp_path, mnist_dir):
    res = run_job(3, mnist_dir, Path("/proc/psadv-x"), "--steps", "5", *MPI_SMALL, timeout=60)
    assert res.returncode == 2
    assert res.stderr.count("psadv: error:") == 1 and "run directory /proc/psadv-x" in res.stderr
    assert "Traceback" not in res.stderr


@needs_mpi
def test_mpi_start_up_error_on_an_attacker_removes_the_new_run_directory(tmp_path, mnist_dir):
    run_dir = tmp_path / "gone"
    res = run_job(3, mnist_dir, run_dir, "--steps", "5", *MPI_SMALL, timeout=60, fault="fail-setup,rank=2")
    assert res.returncode == 2 and res.stderr.count("psadv: error:") == 1, res.stderr
    assert not run_dir.exists()
    # a resume that an attacker fails leaves the run, config.json included, as it was
    run(tmp_path, mnist_dir, name="gone", steps=4)
    before = files_of(run_dir)
    res = subprocess.run([MPIEXEC, "-n", "3", sys.executable, str(FAULT_ENTRY), "fail-setup,rank=2", "train",
                          "--resume", str(run_dir), "--steps", "8", "--weight-decay", "0.5", "--no-progress"],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert res.returncode == 2 and res.stderr.count("psadv: error:") == 1, res.stderr
    assert files_of(run_dir) == before


@needs_mpi
def test_mpi_failure_to_write_the_run_after_every_rank_started_is_undone(tmp_path, mnist_dir):
    """Rank 0 writes config.json and the metrics only once every rank started; a failure there (a
    full disk) ends every rank with one line and leaves no half-made run, nor a half-done resume."""
    run_dir = tmp_path / "r"
    res = run_job(3, mnist_dir, run_dir, "--steps", "5", *MPI_SMALL, timeout=60, fault="fail-start,rank=0")
    assert res.returncode == 1 and res.stderr.count("psadv: error:") == 1, res.stderr
    assert "No space left on device (injected)" in res.stderr and not run_dir.exists()
    run(tmp_path, mnist_dir, name="r", steps=4)
    (run_dir / "final_eval.json").write_text('{"version": 4}')  # a resume in place sets it aside first
    before = files_of(run_dir)
    res = subprocess.run([MPIEXEC, "-n", "3", sys.executable, str(FAULT_ENTRY), "fail-start,rank=0", "train",
                          "--resume", str(run_dir), "--steps", "8", "--no-progress"],
                         capture_output=True, text=True, timeout=60, env=_env())
    assert res.returncode == 1 and res.stderr.count("psadv: error:") == 1, res.stderr
    assert files_of(run_dir) == before


def test_a_resume_that_fails_to_start_puts_the_set_aside_line_back(tmp_path):
    from psadv.rundir import prepare

    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    for v in (5, 10, 15):
        (run_dir / "checkpoints" / f"ckpt-{v:08d}.h5").write_bytes(b"x")
    rows = "".join(json.dumps({"kind": "train", "version": v}) + "\n" for v in (5, 10, 15))
    (run_dir / "metrics.jsonl").write_text(rows)
    (run_dir / "summary.json").write_text("{}")
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    run = prepare(run_dir, resume=True)
    aside = run.supersede(5, [run_dir / "checkpoints" / f"ckpt-{v:08d}.h5" for v in (10, 15)])
    assert [json.loads(line)["version"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [5]
    assert not (run_dir / "summary.json").exists() and (aside / "summary.json").exists()
    run.abandon()  # e.g. the resumed run's device does not exist
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before and not aside.exists()


# --- smaller ways to lose work (issue 35) ------------------------------------------------------------
def test_a_run_that_diverges_before_its_first_checkpoint_says_how_to_reuse_its_directory(tmp_path, mnist_dir):
    """Its directory could be neither resumed (no checkpoint) nor reused (it holds a run), and the
    error said neither."""
    run_dir = tmp_path / "x"
    diverged = invoke("train", "--data-dir", mnist_dir, "--run-dir", run_dir, "--steps", "3", "--lr", "1e30",
                      "--lr-schedule", "constant", *CLI_SMALL)
    errors = [line for line in diverged.stderr.splitlines() if line.startswith("psadv: error:")]
    assert diverged.exit_code == 1 and len(errors) == 1, diverged.stderr
    assert "no checkpoint had been written" in errors[0] and errors[0].endswith(f"--overwrite --run-dir {run_dir}")
    assert_one_line_error(invoke("train", "--resume", run_dir, "--no-progress"), 1,
                          "stopped before its first checkpoint", f"--overwrite --run-dir {run_dir}")
    again = invoke("train", "--data-dir", mnist_dir, "--run-dir", run_dir, "--steps", "2", "--overwrite", *CLI_SMALL)
    assert again.exit_code == 0, again.stderr
    assert json.loads((run_dir / "summary.json").read_text())["version"] == 2


def test_a_relative_data_file_is_recorded_as_an_absolute_path(tmp_path, monkeypatch):
    x = np.zeros((40, 1, 28, 28), np.uint8)
    y = np.arange(40) % 10
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "mine.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    monkeypatch.chdir(tmp_path / "data")
    setup = resolve_run({"dataset": "npz", "data_dir": "mine.npz", "model": "mnist-small", "run_dir": str(tmp_path / "r"),
                         "batch_size": 20, "eps": 0.3}, prepare_dir=False)
    assert setup.cfg.data_dir == str(tmp_path / "data" / "mine.npz")


def test_a_full_disk_while_writing_metrics_names_the_file_and_keeps_the_first_error():
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    log = MetricsLog(Path("/dev/full"))
    with pytest.raises(StorageError, match=r"cannot write /dev/full: No space left on device"):
        log.write("rejected", version=1, sender=1, reason="x" * 10)
    log.close()  # the cleanup's own failure does not replace the first error
    fresh = MetricsLog(Path("/dev/full"))
    fresh._file.write("unflushed")  # buffered: only the close flushes it
    with pytest.raises(StorageError, match="cannot write /dev/full"):
        fresh.close()
