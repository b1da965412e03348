"""Trackers (--log csv,tensorboard,wandb) mirror every metrics row; `psadv plot` draws a run."""

import csv
import json
import os
import subprocess
import sys
import types

import pytest

from psadv.metrics import SCHEMA, MetricsLog
from psadv.report.plot_run import run_series
from psadv.rundir import read_metrics
from psadv.trackers import WandbSink, csv_columns, parse_trackers, scalars

from cli_helpers import assert_one_line_error, invoke

TINY = ["--batch-size", "50", "--attack-steps", "1", "--eval-examples", "50", "--eval-steps", "1", "--log-every", "3",
        "--eval-every", "6", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, mnist_dir):
    run_dir = tmp_path_factory.mktemp("logged") / "run"
    res = invoke("train", "--data-dir", mnist_dir, "--run-dir", run_dir, "--steps", "12", "--log", "tensorboard,csv",
                 *TINY)
    assert res.exit_code == 0, res.output
    return run_dir


def csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_csv_mirrors_metrics(run_dir):
    rows = read_metrics(run_dir / "metrics.jsonl")
    kinds = sorted({r["kind"] for r in rows})
    assert sorted(p.stem for p in (run_dir / "csv").glob("*.csv")) == kinds
    for kind in kinds:
        expected = [r for r in rows if r["kind"] == kind]
        got = csv_rows(run_dir / "csv" / f"{kind}.csv")
        assert list(got[0]) == csv_columns(kind)
        assert len(got) == len(expected), kind
        for g, e in zip(got, expected):
            assert float(g["wall"]) == e["wall"] and g.get("version", "") == str(e.get("version", ""))
    return rows


def test_csv_gets_every_row_one_file_per_kind(logged_run):
    rows = assert_csv_mirrors_metrics(logged_run)
    assert {"train", "eval", "end"} <= {r["kind"] for r in rows}
    train = csv_rows(logged_run / "csv" / "train.csv")
    first = next(r for r in rows if r["kind"] == "train")
    assert float(train[0]["loss"]) == first["loss"] and train[0]["attack"] == first["attack"]
    end = csv_rows(logged_run / "csv" / "end.csv")[0]
    assert json.loads(end["last_eval"])["robust_acc"] == rows[-1]["last_eval"]["robust_acc"]


def test_tensorboard_gets_every_row_by_version_and_wall_clock(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logged_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = read_metrics(logged_run / "metrics.jsonl")
    for row in rows:
        for tag, value in scalars(row).items():
            assert tag in tags
            events = [e for e in acc.Scalars(tag) if e.step == row.get("version", 0) and e.wall_time == row["wall"]]
            assert len(events) == 1 and events[0].value == pytest.approx(value), tag
    train = [r for r in rows if r["kind"] == "train"]
    assert [e.step for e in acc.Scalars("train/loss")] == [r["version"] for r in train] == [3, 6, 9, 12]
    assert {"eval/robust_acc", "eval/clean_acc", "train/lr", "train/eps", "train/examples_per_s",
            "end/last_eval/robust_acc"} <= tags


def test_resume_rewrites_csv_from_metrics_and_purges_abandoned_tensorboard_steps(tmp_path, mnist_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    res = invoke("train", "--data-dir", mnist_dir, "--run-dir", run_dir, "--steps", "12", "--checkpoint-every", "6",
                 "--keep-checkpoints", "5", "--log", "csv,tensorboard", *TINY)
    assert res.exit_code == 0, res.output
    # back to version 6: the rows after it are set aside, and so must the trackers' copies be
    res = invoke("train", "--resume", run_dir / "checkpoints" / "ckpt-00000006.h5", "--steps", "9", "--no-progress")
    assert res.exit_code == 0, res.output
    rows = assert_csv_mirrors_metrics(run_dir)
    assert [r["version"] for r in rows if r["kind"] == "train"] == [3, 6, 9]
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [3, 6, 9]


def test_under_mpi_only_the_server_logs_and_every_row_arrives(tmp_path, mnist_dir, mpiexec):
    run_dir = tmp_path / "mpi"
    cmd = [mpiexec, "-n", "3", sys.executable, "-m", "psadv.cli", "train", "--data-dir", str(mnist_dir),
           "--run-dir", str(run_dir), "--steps", "12", "--log", "csv,tensorboard", *TINY]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    rows = assert_csv_mirrors_metrics(run_dir)
    assert {"world", "attacker", "train", "eval", "end"} <= {r["kind"] for r in rows}
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # one writer: the server


def test_a_missing_or_unknown_tracker_fails_in_one_line_before_the_run_starts(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    res = invoke("train", "--data-dir", mnist_dir, "--run-dir", tmp_path / "w", "--steps", "2", "--log", "csv,wandb",
                 *TINY)
    assert_one_line_error(res, 2, "--log wandb: the wandb package is not installed", "pip install wandb")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    res = invoke("train", "--data-dir", mnist_dir, "--run-dir", tmp_path / "t", "--steps", "2", "--log", "tensorboard",
                 *TINY)
    assert_one_line_error(res, 2, "--log tensorboard: the tensorboard package is not installed")
    res = invoke("train", "--data-dir", mnist_dir, "--run-dir", tmp_path / "u", "--steps", "2", "--log", "csv,mlflow",
                 *TINY)
    assert_one_line_error(res, 2, "unknown tracker 'mlflow'", "tensorboard, csv, wandb")
    assert not any((tmp_path / name).exists() for name in "wtu")


def test_tracker_names_and_scalars():
    assert parse_trackers(" TensorBoard, csv,,csv ") == ("tensorboard", "csv") and parse_trackers("") == ()
    row = {"kind": "attacker", "wall": 1.5, "version": 7, "time": 2.0, "rank": 3, "examples_per_s": 10, "busy": 0.5}
    assert scalars(row) == {"attacker3/time": 2.0, "attacker3/examples_per_s": 10.0, "attacker3/busy": 0.5}
    end = {"kind": "end", "wall": 1.0, "version": 4, "stop_reason": "x", "last_eval": {"robust_acc": 0.5, "attack": "p"},
           "lr_damping": True, "time_to_target": None}
    assert scalars(end) == {"end/last_eval/robust_acc": 0.5}
    for kind in SCHEMA:  # every field of every kind has a column
        assert set(csv_columns(kind)) == SCHEMA[kind].required | SCHEMA[kind].optional | {"wall"}


def test_wandb_sink_logs_the_scalars_at_the_rows_version(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLog(tmp_path / "metrics.jsonl", [WandbSink(tmp_path, {"eps": 0.3})])
    log.write("eval", version=5, time=1.0, eval_seconds=0.1, examples_seen=50, examples=10, clean_acc=0.9,
              robust_acc=0.7, attack="pgd")
    log.close()
    assert calls[0][0] == "init" and calls[0][1]["config"] == {"eps": 0.3} and calls[0][1]["dir"] == str(tmp_path)
    assert calls[1] == ("log", {"eval/time": 1.0, "eval/eval_seconds": 0.1, "eval/examples_seen": 50.0,
                                "eval/examples": 10.0, "eval/clean_acc": 0.9, "eval/robust_acc": 0.7}, 5)
    assert calls[2] == ("finish",)


def test_plot_writes_pngs_of_a_real_run(logged_run, tmp_path):
    res = invoke("plot", logged_run)
    assert res.exit_code == 0, res.output
    for name in ("by_version.png", "by_time.png"):
        path = logged_run / "plots" / name
        assert f"psadv: wrote {path}" in res.output
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20000
    res = invoke("plot", logged_run, "--out", tmp_path / "elsewhere")
    assert res.exit_code == 0 and (tmp_path / "elsewhere" / "by_time.png").exists()
    assert not list((tmp_path / "elsewhere").glob(".*"))  # no temp files left
    assert_one_line_error(invoke("plot", tmp_path / "nothing"), 2, "is not a run directory")


def test_run_series_reads_each_panel_from_its_rows():
    rows = [{"kind": "train", "version": 3, "time": 1.0, "loss": 2.0, "eps": 0.1, "lr": 0.01, "examples_per_s": 5.0,
             "staleness_mean": 1.5, "staleness": 9},
            {"kind": "train", "version": 6, "time": 2.0, "loss": None, "eps": 0.2, "lr": 0.02, "examples_per_s": 6.0},
            {"kind": "eval", "version": 6, "time": 2.5, "clean_acc": 0.9, "robust_acc": 0.6},
            {"kind": "world", "size": 3}]
    s = run_series(rows)
    assert s["loss"] == {"loss": [(3, 1.0, 2.0)]}  # the gradients-mode server has no loss: skipped
    assert s["staleness"] == {"staleness": [(3, 1.0, 1.5)]}  # the server's mean wins over the single value
    assert s["accuracy"] == {"clean": [(6, 2.5, 0.9)], "robust": [(6, 2.5, 0.6)]}
    assert [p[2] for p in s["eps"]["ε"]] == [0.1, 0.2]
