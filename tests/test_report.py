"""``psadv scaling-report``: the numbers from handmade run directories, a sweep of real runs, bad input."""

import json
import shutil
import sys

import pytest

from cli_helpers import assert_one_line_error, invoke
from psadv.config import STALENESS_LR, SYNC_BATCH, SYNC_LR, Config
from psadv.errors import UsageError
from psadv.report import Sweep, find_runs, load_run, scaling_report
from psadv.report.sweep import plan, reference_flags

FAST = ["--batch-size", "50", "--attack-steps", "1", "--eval-examples", "50", "--eval-steps", "1", "--threads", "1",
        "--log-every", "5", "--eval-every", "10", "--checkpoint-every", "0"]
PNG = b"\x89PNG\r\n\x1a\n"


def write_run(path, *, config=None, rows=(), summary=None):
    """A run directory as psadv writes it, with chosen numbers."""
    path.mkdir(parents=True)
    # pushes of examples unless a test says otherwise (as mpi_summary)
    cfg = {**Config().to_dict(), "push": "examples", "run_dir": str(path), **(config or {})}
    (path / "config.json").write_text(json.dumps({"config": cfg, "model_name": cfg["model"], "model_args": {}}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def train_rows(versions_per_s, batch=100, n=5):
    return [{"kind": "train", "version": 10 * i, "time": 10 * i / versions_per_s, "examples_seen": 10 * i * batch}
            for i in range(1, n + 1)]


def mpi_summary(attackers, *, versions, busy, compute, batches, push="examples", hist=None):
    per = batches // attackers
    return {"push": push, "attackers": attackers, "version": versions, "examples_seen": versions * 100,
            "elapsed": 100.0, "max_staleness": 32, "server_seconds": {"busy": busy, "wait": 1.0, "eval": 0, "checkpoint": 0},
            "produced_examples": {str(r): per * 100 for r in range(1, attackers + 1)},
            "attacker_compute_seconds": {str(r): compute / attackers for r in range(1, attackers + 1)},
            "staleness_histogram": hist or {"0": 3, "1": 5}, "staleness_mean": 0.6, "staleness_max": 1,
            "rejected_fraction": 0.1, "utilization": 0.9, "last_eval": None, "stop_reason": "version budget"}


def evals(points, examples=1000, attack="PGD-50x10 linf eps=0.3"):
    return [{"kind": "eval", "time": t, "version": v, "clean_acc": 0.99, "robust_acc": acc, "examples": examples,
             "attack": attack} for t, v, acc in points]


# --- the numbers, from handmade runs ---------------------------------------------------------------
def test_bottleneck_model_speedup_and_time_to_target(tmp_path):
    # 1 attacker: c_s = 10 s / 1000 versions = 0.01, c_a = 40 s / 1000 batches = 0.04 -> n* = 4
    attacker_rows = [{"kind": "attacker", "rank": 1, "version": v, "time": v / 25, "busy": b}
                     for v, b in ((10, 0.5), (20, 0.9), (30, 0.7))]
    write_run(tmp_path / "runs" / "w1", rows=train_rows(25) + attacker_rows + evals([(10, 250, 0.5), (20, 500, 0.9)]),
              summary=mpi_summary(1, versions=1000, busy=10.0, compute=40.0, batches=1000))
    write_run(tmp_path / "runs" / "w2", rows=train_rows(50) + evals([(5, 250, 0.6), (10, 500, 0.95)]),
              summary=mpi_summary(2, versions=1000, busy=10.0, compute=80.0, batches=1000))
    write_run(tmp_path / "runs" / "w8", rows=train_rows(95),
              summary=mpi_summary(8, versions=1000, busy=10.0, compute=60.0, batches=1000))
    write_run(tmp_path / "runs" / "one", rows=train_rows(30) + evals([(40, 250, 0.3)]),
              summary={"version": 100, "examples_seen": 10000, "elapsed": 4.0, "last_eval": None})
    out = tmp_path / "report"
    report = scaling_report([str(tmp_path / "runs")], out, target=0.89, baseline="runs/w1")

    (group,) = report["scaling"]
    assert group["push"] == "examples" and group["baseline"] == "runs/w1"
    model = group["model"]
    assert model["c_s"] == {"value": 0.01, "kind": "measured", "from": model["c_s"]["from"]}
    assert model["c_a"]["value"] == 0.04 and model["c_a"]["kind"] == "measured"
    assert model["n_star"]["value"] == 4.0 and model["n_star"]["kind"] == "predicted"
    points = {p["attackers"]: p for p in group["points"]}
    assert points[2]["speedup"]["value"] == pytest.approx(2.0) and points[2]["speedup"]["kind"] == "measured"
    assert points[8]["speedup"]["value"] == pytest.approx(3.8)
    assert points[8]["efficiency"]["value"] == pytest.approx(3.8 / 8, abs=1e-3)
    assert points[8]["predicted_speedup"] == {"value": 4.0, "kind": "predicted", "from": points[8]["predicted_speedup"]["from"]}
    assert points[2]["predicted_speedup"]["value"] == 2.0
    # batch 100 x min(n / 0.04, 1 / 0.01) examples/s
    assert points[8]["predicted_examples_per_s"]["value"] == 10000.0
    assert points[1]["predicted_examples_per_s"]["value"] == 2500.0
    assert points[8]["costs"]["c_a"]["value"] == pytest.approx(0.06)  # measured on that run, for comparison
    assert points[1]["costs"]["attacker_busy"]["value"] == 0.7 and "attacker_busy" not in points[8]["costs"]
    # measured 2,500 examples/s at the baseline, as the model predicts there
    assert model["overhead_factor"]["value"] == 1.0 and model["overhead_factor"]["kind"] == "measured"
    preds = {p["attackers"]: p["speedup"]["value"] for p in model["predictions"]}
    assert preds[1] == 1 and preds[4] == 4 and preds[64] == 4
    # the one-process run of the same recipe is the reference in the group
    assert group["single_process"]["run"] == "runs/one"

    runs = {r["name"]: r for r in report["runs"]}
    assert runs["runs/w1"]["time_to_target"]["seconds"]["value"] == 20
    assert runs["runs/w2"]["time_to_target"]["seconds"]["value"] == 10
    assert "1000 test examples, PGD-50x10" in runs["runs/w1"]["time_to_target"]["seconds"]["from"]
    assert runs["runs/one"]["time_to_target"]["reached"] is False
    assert runs["runs/w8"]["time_to_target"] is None and "no evaluation rows" in runs["runs/w8"]["problems"]
    ratios = {r["run"]: r["ratio"]["value"] for r in report["time_to_target_ratio"]}
    assert ratios == {"runs/w1": 1.0, "runs/w2": 2.0, "runs/w8": None, "runs/one": None}

    md = (out / "report.md").read_text()
    assert "n* = c_a / c_s = **4.0 attackers**" in md
    assert "| runs/w8 | 8 | complete | 9,500 | 95.00 | 3.80 | 48% | 10,000 | 4.00 | 0.0100 | 0.0600 | – |" in md
    assert "| runs/w2 | 20.0s | 2.00× |" not in md and "| runs/w2 | 2.00× |" in md
    assert (out / "throughput.png").read_bytes().startswith(PNG)
    assert "<table>" in (out / "report.html").read_text()
    assert json.loads((out / "report.json").read_text())["scaling"][0]["model"]["n_star"]["value"] == 4.0


def test_every_number_names_its_kind_and_source(tmp_path):
    write_run(tmp_path / "a", rows=train_rows(25) + evals([(10, 250, 0.5)]),
              summary=mpi_summary(1, versions=1000, busy=10.0, compute=40.0, batches=1000))
    report = scaling_report([str(tmp_path / "a")], tmp_path / "out")
    tagged = []

    def walk(obj):
        if isinstance(obj, dict):
            if "kind" in obj and "value" in obj:
                tagged.append(obj)
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    walk(report)
    assert len(tagged) > 20
    assert all(t["kind"] in ("measured", "predicted") and t["from"] for t in tagged)
    assert {t["kind"] for t in tagged} == {"measured", "predicted"}


def test_time_to_target_without_evaluation_pauses(tmp_path):
    def rows(final_eval_has_train_row):
        out = []
        for v, t_train, t_eval, acc in ((10, 1, 3, 0.2), (20, 4, 5, 0.5), (30, 6, 9, 0.95)):
            if v < 30 or final_eval_has_train_row:
                out.append({"kind": "train", "version": v, "time": t_train, "examples_seen": v * 100})
            out += evals([(t_eval, v, acc)])
        return out

    summary = {"version": 30, "examples_seen": 3000, "elapsed": 9.0}
    write_run(tmp_path / "runs" / "a", rows=rows(True), summary=summary)
    write_run(tmp_path / "runs" / "b", rows=rows(False), summary=summary)
    report = scaling_report([str(tmp_path / "runs")], tmp_path / "out", target=0.9, baseline="runs/a")
    a, b = report["runs"]
    # pauses of 2 s and 1 s before the third evaluation: 9 s of wall clock, 6 - 3 = 3 s of training
    assert [p["train_time"] for p in a["accuracy_curve"]] == [1, 2, 3]
    assert a["time_to_target"]["seconds"]["value"] == 9 and a["time_to_target"]["training_seconds"]["value"] == 3
    assert a["training_seconds"]["value"] == 3 and "training_seconds" not in b
    # no train row at the third evaluation: its pause is unknown
    assert [p["train_time"] for p in b["accuracy_curve"]] == [1, 2, None]
    assert b["time_to_target"]["training_seconds"]["value"] is None
    ratios = {r["run"]: r["ratio"] for r in report["time_to_target_ratio"]}
    assert ratios["runs/a"]["value"] == 1.0 and "training seconds" in ratios["runs/a"]["from"]
    assert ratios["runs/b"]["value"] == 1.0 and "wall-clock" in ratios["runs/b"]["from"]


def test_evaluation_seconds_pause_one_process_but_not_the_server(tmp_path):
    # rows as psadv writes them now: time = when the version was reached, eval_seconds = how long
    # the evaluation took (one process: training stopped; the server: it kept training)
    def rows():
        out = []
        for v, t, pause, acc in ((10, 1.0, 2.0, 0.2), (20, 4.0, 1.0, 0.5), (30, 6.0, 3.0, 0.95)):
            out.append({"kind": "train", "version": v, "time": t, "examples_seen": v * 100})
            out += [{**e, "eval_seconds": pause} for e in evals([(t, v, acc)])]
        return out

    write_run(tmp_path / "runs" / "one", rows=rows(), summary={"version": 30, "examples_seen": 3000, "elapsed": 9.0})
    write_run(tmp_path / "runs" / "mpi", rows=rows(),
              summary={**mpi_summary(2, versions=30, busy=1.0, compute=4.0, batches=40), "elapsed": 9.0})
    report = scaling_report([str(tmp_path / "runs")], tmp_path / "out", target=0.9, baseline="runs/one")
    runs = {r["name"]: r for r in report["runs"]}
    one, mpi = runs["runs/one"], runs["runs/mpi"]
    assert [p["train_time"] for p in one["accuracy_curve"]] == [1.0, 2.0, 3.0]
    assert one["training_seconds"]["value"] == 3.0  # 9 s less 2 + 1 + 3 s of evaluation
    assert [p["train_time"] for p in mpi["accuracy_curve"]] == [1.0, 4.0, 6.0]
    assert mpi["training_seconds"]["value"] == 9.0
    assert one["time_to_target"]["seconds"]["value"] == 6.0 and one["time_to_target"]["training_seconds"]["value"] == 3.0
    ratios = {r["run"]: r["ratio"]["value"] for r in report["time_to_target_ratio"]}
    assert ratios == {"runs/mpi": 0.5, "runs/one": 1.0}


def test_resumed_run_uses_the_last_session_for_server_cost(tmp_path):
    # first session ended at version 600; the summary's busy seconds are the second session's only
    rows = [{"kind": "world", "size": 2}, {"kind": "end", "version": 600},
            {"kind": "world", "size": 2}] + train_rows(25)
    write_run(tmp_path / "r", rows=rows, summary=mpi_summary(1, versions=1000, busy=8.0, compute=40.0, batches=1000))
    report = scaling_report([str(tmp_path / "r")], tmp_path / "out")
    assert report["scaling"][0]["model"]["c_s"]["value"] == pytest.approx(8.0 / 400)


def test_partial_runs_are_reported_not_dropped(tmp_path):
    # killed: no summary.json, a truncated last line
    write_run(tmp_path / "runs" / "killed", rows=[{"kind": "world", "size": 3}] + train_rows(20)
              + evals([(3, 30, 0.2)]))
    with open(tmp_path / "runs" / "killed" / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "eval", "version": 60}\n')  # a row without the fields the report reads
        fh.write('{"kind": "train", "vers')  # cut off mid-line
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    (tmp_path / "runs" / "empty" / "config.json").write_text("{not json")
    (tmp_path / "runs" / "started" / "checkpoints").mkdir(parents=True)  # killed right after it began
    (tmp_path / "runs" / "notes").mkdir()  # not a run
    report = scaling_report([str(tmp_path / "runs")], tmp_path / "out")
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"runs/killed", "runs/empty", "runs/started"}
    assert runs["runs/started"]["status"] == "partial"
    assert runs["runs/started"]["problems"][:2] == ["no config.json", "no metrics.jsonl"]
    killed = runs["runs/killed"]
    assert killed["status"] == "partial" and killed["attackers"] == 2
    assert any("no summary.json" in p for p in killed["problems"])
    assert "1 metrics rows lack fields the report needs and were left out" in killed["problems"]
    assert killed["version"]["value"] == 50 and "partial" in killed["version"]["from"]
    assert killed["throughput"]["versions_per_s"]["value"] == pytest.approx(20)
    assert runs["runs/empty"]["status"] == "partial"
    assert "config.json is unreadable" in " ".join(runs["runs/empty"]["problems"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Runs with missing or partial metrics" in md and "| runs/empty | partial |" in md


def test_metrics_lines_that_are_not_json_objects_are_skipped_and_counted(tmp_path):
    # issue 13: a line that is valid JSON but no object, or bytes that are not UTF-8, crashed the report
    run = write_run(tmp_path / "r", rows=train_rows(10) + evals([(5, 50, 0.9)]),
                    summary={"version": 50, "examples_seen": 5000, "elapsed": 5.0})
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b'42\n["train"]\n"eval"\nnull\n\xff\xfe{"kind": "train"}\n')
        # valid JSON objects whose values have the wrong type crashed plot and report (an audit)
        for bad in ({"version": "x"}, {"time": "abc"}, {"version": [1]}, {"time": 1e308}, {"version": True}):
            fh.write(json.dumps({**train_rows(1)[0], "version": 55, **bad}).encode() + b"\n")
        fh.write(json.dumps({"kind": "eval", "time": 6, "version": 60, "clean_acc": 0.9, "robust_acc": 0.95}).encode())
    (run / "summary.json").write_text("[1, 2]")  # valid JSON, not an object
    (described,) = scaling_report([str(run)], tmp_path / "out", target=0.9)["runs"]
    assert described["metrics_lines_skipped"] == 10
    skipped = "10 metrics.jsonl lines are not metrics rows (cut off, not UTF-8, or values of the wrong type) and were skipped"
    assert skipped in described["problems"]
    assert "summary.json is not a JSON object" in described["problems"] and described["status"] == "partial"
    assert [p["version"] for p in described["accuracy_curve"]] == [50, 60]  # the rows around the bad lines count
    assert "| r | partial | " in (tmp_path / "out" / "report.md").read_text()
    assert invoke("plot", run).exit_code == 0



def test_final_eval_json_is_the_strong_evaluation_in_the_report(tmp_path):
    run = write_run(tmp_path / "r", rows=train_rows(10) + evals([(5, 50, 0.5)]),
                    summary={"version": 50, "examples_seen": 5000, "elapsed": 5.0})
    (run / "final_eval.json").write_text(json.dumps({"clean_acc": 0.98, "robust_acc": 0.91, "examples": 10000,
                                                     "attack": "PGD-50x10 linf eps=0.3", "version": 50}))
    (described,) = scaling_report([str(run)], tmp_path / "out")["runs"]
    assert described["final_eval"]["robust_acc"]["value"] == 0.91
    assert "final_eval.json (10000 test examples" in described["final_eval"]["robust_acc"]["from"]
    assert "| r | 98.00% | 91.00% |" in (tmp_path / "out" / "report.md").read_text()


def test_a_final_eval_json_of_another_version_than_the_final_model_is_left_out(tmp_path):
    """Graded, then resumed (or graded while the run trained on): not the final model's numbers. A run
    without a summary (killed) ends at its newest checkpoint."""
    grade = {"clean_acc": 0.98, "robust_acc": 0.91, "examples": 100, "attack": "PGD-50x10 linf eps=0.3"}
    stale = write_run(tmp_path / "stale", rows=train_rows(10) + evals([(5, 50, 0.5)]),
                      summary={"version": 60, "examples_seen": 6000, "elapsed": 6.0})
    (stale / "final_eval.json").write_text(json.dumps({**grade, "version": 50}))
    killed = write_run(tmp_path / "killed", rows=train_rows(10) + evals([(5, 50, 0.5)]))
    (killed / "checkpoints").mkdir()
    for version in (40, 70):
        (killed / "checkpoints" / f"ckpt-{version:08d}.h5").write_bytes(b"")
    (killed / "final_eval.json").write_text(json.dumps({**grade, "version": 70}))
    # resumed in place and killed before its own summary: the old summary (60) lags the checkpoints (80)
    resumed = write_run(tmp_path / "resumed", rows=train_rows(10), summary={"version": 60, "examples_seen": 6000,
                                                                             "elapsed": 6.0})
    (resumed / "checkpoints").mkdir()
    (resumed / "checkpoints" / "ckpt-00000080.h5").write_bytes(b"")
    (resumed / "final_eval.json").write_text(json.dumps({**grade, "version": 80}))
    warnings = []
    report = scaling_report([str(stale), str(killed), str(resumed)], tmp_path / "out", echo=warnings.append)
    described = {d["name"]: d for d in report["runs"]}
    left_out = "final_eval.json grades version 50, not the final model (version 60), and was left out"
    assert "final_eval" not in described["stale"] and any(left_out in p for p in described["stale"]["problems"])
    assert [w.split("; ")[0] for w in warnings] == [f"psadv: warning: stale: {left_out}"]
    assert described["killed"]["final_eval"]["robust_acc"]["value"] == 0.91
    assert described["resumed"]["final_eval"]["robust_acc"]["value"] == 0.91
    assert "| stale | 98.00%" not in (tmp_path / "out" / "report.md").read_text()


def test_sweep_plan_resumes_what_was_stopped_and_keeps_what_finished(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "single", rows=train_rows(10), summary={"version": 50, "examples_seen": 5000, "elapsed": 5.0,
                                                             "stop_reason": "time budget"})
    stopped = write_run(runs / "sync-w1", rows=train_rows(10),
                        summary={**mpi_summary(1, versions=50, busy=1.0, compute=4.0, batches=50),
                                 "stop_reason": "signal SIGUSR1"})
    (stopped / "checkpoints").mkdir()
    (stopped / "checkpoints" / "ckpt-00000050.h5").write_bytes(b"")
    write_run(runs / "sync-w2", rows=[])  # killed before its first checkpoint
    sweep = Sweep(workers=[0, 1, 2, 3], launcher="srun -n {n}", steps=100, train_args=["--max-staleness", "8"])
    jobs = {job["name"]: job for job in plan(sweep, runs, resume=True)}
    assert jobs["single"]["cmd"] is None  # finished: kept
    assert jobs["sync-w1"]["cmd"][:4] == ["srun", "-n", "2", sys.executable]
    assert jobs["sync-w1"]["cmd"][6:9] == ["train", "--resume", str(stopped)]
    w2 = jobs["sync-w2"]["cmd"]
    assert w2[w2.index("--run-dir") + 1] == str(runs / "sync-w2") and "--overwrite" in w2
    w3 = jobs["sync-w3"]["cmd"]  # never started
    assert "--overwrite" not in w3 and "--resume" not in w3
    assert w3[-4:] == ["--steps", "100", "--max-staleness", "8"]  # the sweep does not vary --max-staleness here
    assert "--eval-every" not in w3  # a version budget keeps psadv train's periodic evaluation
    # under a time budget psadv train evaluates only at the end; the report needs the curve
    timed = plan(Sweep(workers=[0, 1], time_budget=30), tmp_path / "timed")
    assert all(job["cmd"][job["cmd"].index("--eval-every") + 1] == "500" for job in timed)
    # the single-process reference trains the attackers' recipe: the synchronous attackers' shared batch and
    # peak lr (the asynchronous ones' lower peak), unless given
    assert timed[0]["cmd"][-4:] == ["--lr", repr(SYNC_LR), "--batch-size", repr(SYNC_BATCH)]
    assert "--lr" not in timed[1]["cmd"]
    examples = plan(Sweep(workers=[0, 1], time_budget=30, push=["examples"]), tmp_path / "examples")
    assert examples[0]["cmd"][-2:] == ["--lr", repr(STALENESS_LR)]
    given = plan(Sweep(workers=[0, 1], time_budget=30, train_args=["--lr", "0.02"]), tmp_path / "given")
    assert [job["cmd"].count("--lr") for job in given] == [1, 1]
    assert reference_flags(["--dataset", "cifar10"]) == []  # a recipe's own peak and batch stay
    own = plan(Sweep(workers=[0], train_args=["--time-budget", "30", "--eval-every", "50"]), tmp_path / "own")
    assert own[0]["cmd"].count("--eval-every") == 1 and own[0]["cmd"][-1] == "50"
    # without resume every run starts from scratch; push None leaves --push to the train flags
    fresh = plan(Sweep(workers=[0, 2], push=[None], steps=5, train_args=["--push", "gradients"]), runs, overwrite=True)
    assert [job["name"] for job in fresh] == ["single", "w2"]
    assert all("--overwrite" in job["cmd"] and job["cmd"].count("--push") == 1 for job in fresh)


@pytest.mark.parametrize("train_args, workers, fragment", [
    (["--eps", "5"], [0], "--eps 5 exceeds 1"),
    (["--bogus-flag", "3"], [0, 1], "No such option '--bogus-flag'"),
    (["--emulate-attackers", "2"], [0, 1], "--emulate-attackers and --emulate-staleness are for one process"),
    (["--help"], [0], "--help is not a flag to train with"),  # fine alone, not with attackers
])
def test_sweep_plan_refuses_train_flags_that_every_run_would_refuse(tmp_path, train_args, workers, fragment):
    with pytest.raises(UsageError, match=f"psadv train flags after --: {fragment}"):
        plan(Sweep(workers=workers, steps=2, train_args=train_args), tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_a_missing_launcher_is_refused_before_the_report_directory_is_made(tmp_path, mnist_dir):
    result = invoke("scaling-report", "--workers", "0,1", "--launcher", "no-such-launcher -n {n}", "-o",
                    tmp_path / "out", "--steps", 2, "--data-dir", mnist_dir)
    assert_one_line_error(result, 2, "launcher program 'no-such-launcher' (from --launcher) is not on PATH")
    assert not (tmp_path / "out").exists()


def test_run_stopped_by_a_signal_is_marked_resumable(tmp_path):
    summary = {**mpi_summary(2, versions=40, busy=1.0, compute=4.0, batches=40), "stop_reason": "signal SIGUSR1"}
    write_run(tmp_path / "r", rows=train_rows(10), summary=summary)
    (run,) = scaling_report([str(tmp_path / "r")], tmp_path / "out")["runs"]
    assert run["status"] == "stopped" and "stopped by a signal SIGUSR1" in run["problems"][0]


def test_sync_groups_get_the_round_model_and_staleness_series(tmp_path):
    for S, acc in ((0, 0.9), (8, 0.85), (64, 0.2)):
        write_run(tmp_path / "runs" / f"s{S}", config={"emulate_staleness": S}, rows=train_rows(10)
                  + evals([(5, 50, acc)]), summary={"version": 50, "examples_seen": 5000, "elapsed": 5.0,
                                                   "last_eval": {"clean_acc": 0.9, "robust_acc": acc, "examples": 50,
                                                                 "attack": "PGD-1"}})
    write_run(tmp_path / "runs" / "sync", config={"push": "sync"}, rows=train_rows(10),
              summary=mpi_summary(2, versions=100, busy=1.0, compute=4.0, batches=200, push="sync"))
    report = scaling_report([str(tmp_path / "runs")], tmp_path / "out")
    (group,) = report["scaling"]
    # a round: 2 pushes of c_s = 1 s / (100 versions × 2) each after the attackers' c_a = 4 s / 200 batches
    model = group["model"]
    assert model["synchronous"] and model["c_s"]["value"] == 0.005 and model["c_a"]["value"] == 0.02
    assert model["n_star"]["value"] == 4
    # 8 attackers against the baseline's 2: 2 × rate(8) / rate(2) = 2 × (800 / 0.06) / (200 / 0.03) = 4
    (at8,) = [p for p in model["predictions"] if p["attackers"] == 8]
    assert at8["speedup"]["value"] == 4.0 and "c_a + c_0 + n·c_1" in at8["speedup"]["from"]
    assert model["c_0"]["value"] == 0 and model["c_1"]["value"] == 0.005  # one count: all per push
    assert "staleness_accuracy.png" in report["plots"]
    assert [r["name"] for r in report["runs"]] == ["runs/s0", "runs/s8", "runs/s64", "runs/sync"]  # natural order
    staleness = {r["name"]: r["staleness"] for r in report["runs"]}
    assert staleness["runs/s64"] == {"kind": "emulated", "S": {"value": 64, "kind": "measured",
                                                                "from": "config.json emulate_staleness"}}
    # a plain one-process run has no staleness: not "emulated, 0", yet the S = 0 point of the series
    assert staleness["runs/s0"]["kind"] == "none"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| runs/s0 | none (one process) |" in md and "| runs/s0 | emulated |" not in md
    from psadv.report.analysis import staleness_series

    (series,) = staleness_series(report["runs"]).values()
    assert sorted(point[0] for point in series) == [0, 8, 64]
    assert staleness["runs/sync"]["staleness_histogram"]["value"] == {"0": 3, "1": 5}


def test_a_sync_round_is_fitted_as_fixed_work_plus_work_per_push(tmp_path):
    # busy per round 3 ms at 1 attacker, 5 ms at 4: c_1 = 2/3 ms a push, c_0 = 7/3 ms a round
    for n, busy in ((1, 0.3), (4, 0.5)):
        write_run(tmp_path / f"sync{n}", config={"push": "sync"}, rows=train_rows(10),
                  summary=mpi_summary(n, versions=100, busy=busy, compute=2.0 * n, batches=100 * n, push="sync"))
    report = scaling_report([str(tmp_path / "sync1"), str(tmp_path / "sync4")], tmp_path / "out")
    (group,) = report["scaling"]
    model = group["model"]
    assert model["c_1"]["value"] == pytest.approx(0.002 / 3, abs=1e-6)
    assert model["c_0"]["value"] == pytest.approx(0.007 / 3, abs=1e-6)
    # c_a = 2 s / 100 batches = 20 ms: the server's round equals it at n* = (20 - 7/3) / (2/3) = 26.5
    assert model["n_star"]["value"] == pytest.approx(26.5, abs=0.01)
    from psadv.report.analysis import model_rate

    assert model_rate(model, 4) == pytest.approx(100 * 4 / (0.02 + 0.005), rel=1e-3)  # the fitted round at 4: 5 ms


# --- real runs: a sweep launched by the report, then a report over existing directories -------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mnist_dir):
    if shutil.which("mpiexec") is None:
        pytest.fail("mpiexec is not on PATH: the MPI part of the report cannot be tested")
    out = tmp_path_factory.mktemp("sweep") / "report"
    result = invoke("scaling-report", "--out", out, "--workers", "0,1,2", "--steps", "20", "--data-dir", mnist_dir,
                    "--launcher", "mpiexec -n {n}", "--", *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    return out, result


def test_sweep_launches_every_run_and_renders(sweep):
    out, result = sweep
    assert f"psadv: report of 3 runs in {out}/report.md" in result.output
    assert result.stderr.count("$ ") == 3 and "mpiexec -n 3 " in result.stderr
    report = json.loads((out / "report.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert set(runs) == {"single", "sync-w1", "sync-w2"}
    assert all(r["status"] == "complete" and not r["problems"] for r in runs.values())
    assert runs["sync-w2"]["attackers"] == 2 and runs["sync-w2"]["mode"] == "mpi"
    assert runs["single"]["mode"] == "single" and runs["single"]["version"]["value"] == 20
    assert runs["sync-w1"]["launch"]["returncode"] == 0
    (group,) = report["scaling"]
    assert [p["attackers"] for p in group["points"]] == [1, 2] and group["baseline"] == "sync-w1"
    assert group["points"][0]["speedup"]["value"] == 1.0 and group["single_process"]["run"] == "single"
    model = group["model"]
    assert model["c_s"]["value"] > 0 and model["c_a"]["value"] > 0 and model["n_star"]["kind"] == "predicted"
    assert sorted(report["plots"]) == ["accuracy.png", "robust_vs_time.png", "staleness.png", "throughput.png"]
    for name in report["plots"]:
        assert (out / name).read_bytes().startswith(PNG) and (out / name).stat().st_size > 10_000
    md = (out / "report.md").read_text()
    for section in ("## Runs", "## Throughput, speedup and the server bottleneck", "## Accuracy vs wall-clock time",
                    "## Staleness", "![staleness histograms](staleness.png)"):
        assert section in md
    assert json.loads((out / "runs" / "sweep.json").read_text())[2]["cmd"][:3] == ["mpiexec", "-n", "3"]


def test_report_on_existing_run_dirs_with_a_killed_run(sweep, tmp_path):
    out, _ = sweep
    killed = tmp_path / "killed"
    shutil.copytree(out / "runs" / "sync-w2", killed)
    (killed / "summary.json").unlink()
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("\n".join(line for line in lines if '"kind": "end"' not in line) + "\n")
    result = invoke("scaling-report", out / "runs", killed, "--out", tmp_path / "r", "--target", "0")
    assert result.exit_code == 0, result.stderr
    assert "(1 not complete: killed)" in result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["killed"]["status"] == "partial" and runs["killed"]["throughput"]
    # target 0: reached at the first evaluation
    first_eval = runs["runs/single"]["accuracy_curve"][0]
    assert runs["runs/single"]["time_to_target"]["seconds"]["value"] == round(first_eval["time"], 2)
    assert runs["runs/single"]["time_to_target"]["version"]["value"] == first_eval["version"] == 10
    assert "killed" in report["scaling"][0]["runs"]


def test_failed_launch_is_reported_not_dropped(tmp_path, mnist_dir):
    out = tmp_path / "rep"
    result = invoke("scaling-report", "--out", out, "--workers", "1", "--steps", "5", "--data-dir", mnist_dir,
                    "--launcher", f"{sys.executable} -c 'raise SystemExit(3)' {{n}}", "--", *FAST)
    assert result.exit_code == 0, result.stderr
    assert "psadv: warning: sync-w1 exited with code 3" in result.stderr
    assert "(1 not complete: sync-w1)" in result.output
    (run,) = json.loads((out / "report.json").read_text())["runs"]
    assert run["status"] == "failed" and run["problems"][0] == "launcher exited with code 3"
    assert "| sync-w1 | failed | launcher exited with code 3; no run directory was created |" in \
        (out / "report.md").read_text()


# --- bad input: one line, exit 2, nothing written --------------------------------------------------
@pytest.mark.parametrize("args, fragments", [
    (["nowhere"], ["nowhere is not a directory"]),
    (["{empty}"], ["is not a run directory", "holds none"]),
    (["{run}", "--baseline", "other"], ["--baseline 'other' is not one of the runs: a"]),
    (["{run}", "--push", "gradients"], ["--push only apply to a sweep; add --workers"]),
    (["{run}", "--", "--steps", "3"], ["flags after -- only apply to a sweep"]),
    (["{run}", "--launcher", "srun -n {n}"], ["--launcher only apply to a sweep"]),
    ([], ["give run directories to report on, or --workers"]),
    (["--workers", "1", "--steps", "5", "--launcher", "mpiexec -n 3"], ["must contain {n}"]),
    (["--workers", "1", "--steps", "5", "--launcher", "mpiexec -n {n} {x}"], ["only {n} may appear in braces"]),
    (["--workers", "1,x", "--steps", "5"], ["--workers must be a comma-separated list of integers"]),
    (["--workers", "1", "--steps", "5", "--max-staleness", "-1"], ["--max-staleness values must be >= 0"]),
    (["--workers", "1"], ["a sweep needs a budget per run"]),
    (["--workers", "1", "--steps", "5", "--push", "examples,pull"], ["--push: unknown mode 'pull'"]),
    (["--workers", "1", "--steps", "5", "--", "--run-dir", "x"], ["--run-dir is set by the sweep"]),
    (["--workers", "1", "--steps", "5", "--max-staleness", "4", "--", "--max-staleness", "8"],
     ["--max-staleness is set by the sweep"]),
    (["{run}", "--resume"], ["--resume only apply to a sweep"]),
    (["--workers", "1", "--steps", "5", "--resume", "--overwrite"], ["--resume and --overwrite exclude each other"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragments):
    write_run(tmp_path / "a", rows=train_rows(10), summary={"version": 50, "examples_seen": 5000, "elapsed": 5.0})
    (tmp_path / "empty").mkdir()
    places = {"{run}": tmp_path / "a", "{empty}": tmp_path / "empty"}
    out = tmp_path / "out"
    result = invoke("scaling-report", "--out", out, *[places.get(a, a) for a in args])
    assert_one_line_error(result, 2, *fragments)
    assert not out.exists()


def test_existing_report_is_not_overwritten_without_flag(tmp_path):
    write_run(tmp_path / "a", rows=train_rows(10), summary={"version": 50, "examples_seen": 5000, "elapsed": 5.0})
    out = tmp_path / "out"
    assert invoke("scaling-report", tmp_path / "a", "--out", out).exit_code == 0
    before = (out / "report.json").read_bytes()
    result = invoke("scaling-report", tmp_path / "a", "--out", out, "--target", "0.5")
    assert_one_line_error(result, 2, "already holds a report", "--overwrite")
    assert (out / "report.json").read_bytes() == before
    assert invoke("scaling-report", tmp_path / "a", "--out", out, "--target", "0.5", "--overwrite").exit_code == 0
    assert json.loads((out / "report.json").read_text())["target_robust_acc"] == 0.5


def test_duplicate_run_names_are_told_apart(tmp_path):
    for parent in ("x", "y"):
        write_run(tmp_path / parent / "run", rows=train_rows(10), summary={"version": 50, "examples_seen": 5000,
                                                                           "elapsed": 5.0})
    names = [r.name for r in find_runs([str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")])]
    assert names == [str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]
    assert load_run(tmp_path / "x" / "run").status == "complete"


def test_what_synchronous_attackers_buy_priced_by_their_rounds(tmp_path):
    runs = tmp_path / "runs"
    # one sync attacker of batch 50: 2 ms of server work a round, c_a = 20 ms; two: 3 ms a round
    for n, busy in ((1, 2.0), (2, 3.0)):
        write_run(runs / f"sync{n}", config={"push": "sync", "batch_size": 50}, rows=train_rows(25, batch=50 * n),
                  summary={**mpi_summary(n, versions=1000, busy=busy, compute=20.0 * n, batches=1000 * n, push="sync"),
                           "produced_examples": {str(r): 50000 for r in range(1, n + 1)}})
    # eight emulated sync attackers of 50 (a version is 400 examples), evaluated every 50,000 examples
    for seed, version in ((0, 375), (1, 500)):
        write_run(runs / f"s8-s{seed}", config={"push": "sync", "emulate_attackers": 8, "batch_size": 50,
                                               "eval_every": 125, "seed": seed},
                  rows=train_rows(30, batch=400) + evals([(1, 125, 0.5), (2, version, 0.9)]),
                  summary={"version": 750, "examples_seen": 300000, "elapsed": 60.0, "last_eval": None,
                           "emulated_attackers": 8, "push": "sync", "staleness_max": 0})
    # one process, batch 100, evaluated every 50,000 examples too: 2,000 versions at 1/25 s; and one evaluated
    # on another grid, which does not count
    write_run(runs / "single", config={"batch_size": 100, "eval_every": 500}, rows=train_rows(25) +
              evals([(1, 1500, 0.8), (2, 2000, 0.9)]), summary={"version": 3000, "examples_seen": 300000, "elapsed": 120.0})
    write_run(runs / "single-other-grid", config={"batch_size": 100, "eval_every": 300}, rows=train_rows(20) +
              evals([(1, 3000, 0.8)]), summary={"version": 3000, "examples_seen": 300000, "elapsed": 150.0})
    buy = scaling_report([str(runs)], tmp_path / "out", target=0.89)["attackers_buy"]
    assert buy["single_process"]["runs"] == ["runs/single"] and buy["single_process"]["seconds"]["value"] == 80.0
    (row,) = buy["rows"]
    assert row["method"] == "sync" and row["versions_to_target"]["value"] == 500
    # c_1 = 1 ms a push, c_0 = 1 ms a round: a round of eight takes 20 + 1 + 8 = 29 ms
    assert row["seconds_per_version"]["value"] == pytest.approx(0.029) and "runs/sync1" in row["seconds_per_version"]["from"]
    assert row["n_star"]["value"] == pytest.approx(19.0) and row["time_to_target"]["value"] == 14.5
    assert row["speedup_over_single_process"]["value"] == pytest.approx(80 / 14.5, abs=0.01)


def test_what_n_attackers_buy_from_emulated_runs_and_the_bottleneck_model(tmp_path):
    # c_s = 0.01 s, c_a = 0.04 s per batch with k = 10 attack steps (measured on w1): n* = 4
    write_run(tmp_path / "runs" / "w1", rows=train_rows(25), config={"refine_steps": 0},
              summary=mpi_summary(1, versions=1000, busy=10.0, compute=40.0, batches=1000))
    emulated = {(1, 0, 0): 1000, (1, 0, 1): 1200, (8, 0, 0): 1500, (8, 0, 1): 1400, (8, 1, 0): 1100, (32, 0, 0): None}
    for (n, k, seed), version in emulated.items():
        points = [(1, 500, 0.5)] + ([(2, version, 0.9)] if version else [(2, 2000, 0.8)])
        write_run(tmp_path / "runs" / f"n{n}-k{k}-s{seed}",
                  config={"emulate_attackers": n, "refine_steps": k, "refine_step_ratio": 0, "attack_steps": 10,
                          "seed": seed},
                  rows=train_rows(30) + evals(points),
                  summary={"version": 2000, "examples_seen": 200000, "elapsed": 60.0, "last_eval": None,
                           "emulated_attackers": n, "staleness_mean": n + 1.5, "staleness_max": n + 3,
                           "staleness_histogram": {str(n): 10}, "rejected_stale": 400 if n == 32 else 0,
                           "applied": 2000})
    for seed, robust in ((0, 0.90), (1, 0.87)):  # another method: its own row, with the final models' accuracy
        write_run(tmp_path / "runs" / f"n8-k1r-reuse-s{seed}",
                  config={"emulate_attackers": 8, "refine_steps": 1, "refine_step_ratio": 1.25,
                          "reuse_perturbations": True, "attack_steps": 10, "seed": seed},
                  rows=train_rows(30) + evals([(1, 500, 0.5), (2, 2000, robust)]),
                  summary={"version": 2000, "examples_seen": 200000, "elapsed": 60.0, "applied": 2000,
                           "last_eval": {"version": 2000, "clean_acc": 0.98, "robust_acc": robust},
                           "emulated_attackers": 8})
    write_run(tmp_path / "runs" / "single", config={"attack_steps": 10}, rows=train_rows(30) + evals([(60.0, 900, 0.9)]),
              summary={"version": 2000, "examples_seen": 200000, "elapsed": 90.0, "last_eval": None})
    report = scaling_report([str(tmp_path / "runs")], tmp_path / "out", target=0.89)
    buy = report["attackers_buy"]
    assert buy["model_from"] == "runs/w1" and buy["single_process"]["runs"] == ["runs/single"]
    # one process: 900 versions to target × 1/30 s per version (its train rows) = 30 s
    assert buy["single_process"]["versions_to_target"]["value"] == 900
    assert buy["single_process"]["seconds"]["value"] == 30.0
    rows = {(r["attackers"], r["method"]): r for r in buy["rows"]}
    one, eight, refined = rows[(1, "none")], rows[(8, "none")], rows[(8, "refine 1")]
    both = rows[(8, "refine 1 × 1.25ε + reuse")]
    assert both["versions_to_target"]["value"] is None  # seed 1 never reached 89%
    assert both["final_robust_acc"]["value"] == pytest.approx(0.885)
    assert both["final_robust_spread"]["value"] == pytest.approx(0.03) and "final_robust_acc" not in eight
    assert one["versions_to_target"]["value"] == 1200 and one["versions_to_target"]["kind"] == "measured"
    # 1 attacker: max(0.04 / 1, 0.01) = 0.04 s per version; 8: the server's 0.01 s
    assert one["time_to_target"] == {"value": 48.0, "kind": "predicted", "from": one["time_to_target"]["from"]}
    assert eight["versions_to_target"]["value"] == 1500 and eight["time_to_target"]["value"] == 15.0
    assert eight["speedup_over_one_attacker"]["value"] == 3.2 and eight["n_star"]["value"] == 4.0
    # one refinement step costs the server c_a / k = 0.004 s more per version: n* = 0.04 / 0.014
    assert refined["seconds_per_version"]["value"] == pytest.approx(0.014)
    assert refined["n_star"]["value"] == pytest.approx(2.86) and refined["time_to_target"]["value"] == 15.4
    assert eight["speedup_over_single_process"]["value"] == 2.0  # predicted 30 s ÷ predicted 15 s
    assert rows[(32, "none")]["versions_to_target"]["value"] is None and "time_to_target" not in rows[(32, "none")]
    assert rows[(32, "none")]["pushes_per_version"]["value"] == 1.2 and eight["pushes_per_version"]["value"] == 1.0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## What N attackers buy" in text and "3.20×" in text and "| 88.5% (3.0) |" in text
    # an MPI run with the same refinement measures the server's work whole: c_s = 0.02 s, no estimate
    write_run(tmp_path / "runs" / "w1-refined", rows=train_rows(25), config={"refine_steps": 1, "refine_step_ratio": 0},
              summary=mpi_summary(1, versions=1000, busy=20.0, compute=40.0, batches=1000))
    rows = {(r["attackers"], r["method"]): r
            for r in scaling_report([str(tmp_path / "runs")], tmp_path / "out2", target=0.89)["attackers_buy"]["rows"]}
    refined = rows[(8, "refine 1")]
    assert refined["seconds_per_version"]["value"] == pytest.approx(0.02) and "runs/w1-refined" in \
        refined["seconds_per_version"]["from"] and refined["n_star"]["value"] == 2.0
    assert rows[(8, "none")]["seconds_per_version"]["value"] == pytest.approx(0.01)  # still w1's c_s
    runs = tmp_path / "runs"
    alone = scaling_report([str(runs / "w1-refined"), str(runs / "n8-k0-s0"), str(runs / "n8-k0-s1")], tmp_path / "out3",
                           target=0.89)["attackers_buy"]["rows"]
    assert "seconds_per_version" not in alone[0]  # a refining server's c_s does not price an unrefined method
    # refinement on the attackers is its own method, priced only by an MPI run whose attackers refined
    write_run(runs / "n8-ra-s0", config={"emulate_attackers": 8, "refine_steps": 1, "refine_on": "attackers",
                                         "refine_step_ratio": 0, "attack_steps": 10, "seed": 0},
              rows=train_rows(30) + evals([(1, 500, 0.5), (2, 1000, 0.9)]),
              summary={"version": 2000, "examples_seen": 200000, "elapsed": 60.0, "applied": 2000, "last_eval": None,
                       "emulated_attackers": 8})
    picked = [str(runs / n) for n in ("w1", "w1-refined", "n8-ra-s0")]
    row = scaling_report(picked, tmp_path / "out4", target=0.89)["attackers_buy"]["rows"][0]
    assert row["method"] == "refine 1 on attackers" and "seconds_per_version" not in row
    write_run(runs / "w1-ra", config={"refine_steps": 1, "refine_on": "attackers", "refine_step_ratio": 0},
              rows=train_rows(25), summary=mpi_summary(1, versions=1000, busy=10.0, compute=48.0, batches=1000))
    row = scaling_report(picked + [str(runs / "w1-ra")], tmp_path / "out5", target=0.89)["attackers_buy"]["rows"][0]
    assert row["n_star"]["value"] == 4.8 and row["time_to_target"]["value"] == 10.0  # 1,000 × max(0.048 / 8, 0.01)
    assert "w1-ra" in row["seconds_per_version"]["from"]
    # a quiet timing run (no periodic evaluation: its one eval row is the final one) prices one process's
    # versions but never counts them: 900 versions of runs/single × 1/40 s
    write_run(runs / "timing", config={"attack_steps": 10, "eval_every": 0}, rows=train_rows(40) + evals([(9, 400, 0.95)]),
              summary={"version": 400, "examples_seen": 40000, "elapsed": 10.0, "last_eval": None})
    buy = scaling_report([str(runs / n) for n in ("w1", "n8-k0-s0", "single", "timing")], tmp_path / "out6",
                         target=0.89)["attackers_buy"]
    assert buy["single_process"]["runs"] == ["single"] and buy["single_process"]["seconds"]["value"] == 22.5
    assert "timing" in buy["single_process"]["seconds_per_version"]["from"]
