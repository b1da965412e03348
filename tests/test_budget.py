"""Time to target as a budget search: the pure policy, and the benchmark script end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from psadv.bench.budget import BudgetSearch, bracket_text, ratio

ROOT = Path(__file__).resolve().parents[1]


def drive(search: BudgetSearch, threshold: float) -> list[float]:
    """Run the search against a recipe that passes exactly at budgets >= threshold."""
    tried = []
    while (budget := search.next_budget()) is not None:
        tried.append(budget)
        search.record(budget, budget >= threshold)
        assert len(tried) < 50
    return tried


@pytest.mark.parametrize("threshold", [7.0, 45.0, 60.0, 61.0, 500.0])
def test_search_brackets_the_threshold_within_tolerance(threshold):
    search = BudgetSearch(start=60, tolerance=0.15)
    drive(search, threshold)
    answer = search.answer()
    assert answer["done"]
    passing, failing = answer["bracket"][1], answer["bracket"][0]
    assert passing >= threshold and (failing is None or failing < threshold)
    assert failing is not None and passing / failing <= 1.15


def test_search_halves_then_doubles_and_gives_up_at_the_max():
    search = BudgetSearch(start=60)
    assert search.next_budget() == 60
    search.record(60, True)
    assert search.next_budget() == 30
    never = BudgetSearch(start=60, max_budget=200)
    drive(never, float("inf"))
    assert never.answer()["time_to_target"] is None and max(map(float, never.answer()["tried"])) == 200


def test_a_fixed_budget_is_tried_once_whatever_it_gives():
    for passed in (True, False):
        search = BudgetSearch(start=60, min_budget=60, max_budget=60)
        assert search.next_budget() == 60
        search.record(60, passed)
        assert search.next_budget() is None


def test_a_pass_below_a_failure_is_reported_not_hidden():
    search = BudgetSearch(start=60)
    for budget, ok in [(60, True), (30, False), (42.4, True), (50, False)]:
        search.record(budget, ok)
    assert search.passing == 42.4 and search.failing == 30 and search.non_monotone == [50]


def test_bracket_text_says_where_the_time_to_target_lies():
    assert bracket_text(60.0, 120.0) == "(60, 120]"
    assert bracket_text(60.0, None) == "> 60"
    assert bracket_text(None, 170.0) == "≤ 170"
    assert bracket_text(None, None) == "–"


def test_ratio_needs_both_times():
    assert ratio({"time_to_target": 600}, {"time_to_target": 30}) == 20
    assert ratio({"time_to_target": None}, {"time_to_target": 30}) is None


def test_budget_search_script_runs_trials_and_keeps_them(tmp_path, mnist_dir):
    out = tmp_path / "bs"
    cmd = [sys.executable, str(ROOT / "scripts" / "budget_search.py"), "--out", str(out), "--data-dir", str(mnist_dir),
           "--recipe", "tiny=--batch-size 50 --attack-steps 1 --threads 1", "--seeds", "0", "--start", "2",
           "--tolerance", "1", "--target", "0", "--clean-target", "0", "--gate-examples", "0",
           "--eval-args", "--attack pgd --steps 1 --restarts 1 --examples 100"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    result = json.loads((out / "budget_search.json").read_text())["results"][0]
    # everything passes at target 0: 2 s passes, 1 s (the floor) passes, the search ends there
    assert result["tried"] == {"1.0": True, "2.0": True} and result["time_to_target"] == 1.0
    trial = result["trials"]["2"][0]
    assert trial["passed"] and trial["wall_seconds"] > 2 and trial["versions"] > 0
    report = (out / "budget_search.md").read_text()
    assert "| tiny" in report and "(PGD-1 linf eps=0.3 on 100 test images), for each of seeds 0" in report
    assert "| 1 | ≤ 1 |" in report  # the time to target and its bracket: nothing shorter was tried
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "psadv train" not in again.stdout  # finished trials are kept


def test_a_grid_trains_every_recipe_budget_and_seed_then_grades_them_apart(tmp_path, mnist_dir):
    out = tmp_path / "grid"
    cmd = [sys.executable, str(ROOT / "scripts" / "budget_search.py"), "--out", str(out), "--data-dir", str(mnist_dir),
           "--recipe", "a=--batch-size 50 --attack-steps 1 --threads 1 --eval-examples 100", "--recipe",
           "b=--batch-size 50 --attack-steps 2 --threads 1 --eval-examples 100", "--seeds", "0",
           "--grid", "1", "--target", "0", "--clean-target", "0.5",
           "--eval-args", "--attack pgd --steps 1 --restarts 1 --examples 100 --threads 1"]
    trained = subprocess.run([*cmd, "--train-only"], capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    runs = sorted(out.glob("*/T*/seed*"))
    assert len(runs) == 2 and all((r / "summary.json").exists() for r in runs)  # 2 recipes x 1 budget x 1 seed
    assert not list(out.glob("*/T*/seed*/eval.json")) and not (out / "budget_search.json").exists()
    graded = subprocess.run([*cmd, "--eval-jobs", "3"], capture_output=True, text=True, timeout=600)
    assert graded.returncode == 0, graded.stderr
    assert "$ psadv train" not in graded.stdout and graded.stdout.count("$ psadv eval") == 2  # trained once, graded once
    results = {r["name"]: r for r in json.loads((out / "budget_search.json").read_text())["results"]}
    for r in results.values():
        assert set(r["tried"]) == {"1.0"} and len(r["trials"]["1"]) == 1
        for budget, ok in r["tried"].items():  # a budget passes when its runs reached the clean target
            rows = r["trials"][f"{float(budget):g}"]
            assert ok == all(t["clean_acc"] >= 0.5 for t in rows)
    assert "budgets 1 s, each for every recipe and seed" in (out / "budget_search.md").read_text()
    # graded elsewhere by another attack: the report names what each eval.json holds, not --eval-args
    other = next(out.glob("a/T*/seed0/eval.json"))
    other.write_text(json.dumps({**json.loads(other.read_text()), "attack": "strong linf eps=0.3", "examples": 10000}))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ psadv" not in again.stdout, again.stderr
    report = (out / "budget_search.md").read_text()
    assert "(PGD-1 linf eps=0.3 on 100 test images; strong linf eps=0.3 on 10,000 test images)" in report
    assert "(strong linf eps=0.3, 10,000)" in report and "(PGD-1 linf eps=0.3, 100)" in report



def test_full_clean_grades_clean_accuracy_on_the_whole_test_set_beside_a_robust_slice(tmp_path, mnist_dir):
    out = tmp_path / "full"
    cmd = [sys.executable, str(ROOT / "scripts" / "budget_search.py"), "--out", str(out), "--data-dir", str(mnist_dir),
           "--recipe", "a=--batch-size 50 --attack-steps 1 --threads 1 --eval-examples 100", "--seeds", "0",
           "--grid", "1", "--target", "0", "--clean-target", "0", "--full-clean",
           "--eval-args", "--attack pgd --steps 1 --restarts 1 --examples 100 --threads 1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    run = out / "a" / "T1" / "seed0"
    robust, clean = (json.loads((run / name).read_text()) for name in ("eval.json", "clean_eval.json"))
    assert robust["examples"] == 100 and clean["examples"] > 100 and clean["attack"] == "clean"
    trial = json.loads((out / "budget_search.json").read_text())["results"][0]["trials"]["1"][0]
    # the trial is judged by the whole test set's clean accuracy; the slice's is kept beside it
    assert trial["clean_acc"] == clean["clean_acc"] and trial["slice_clean_acc"] == robust["clean_acc"]
    assert trial["robust_acc"] == robust["robust_acc"]
    assert "; clean on the full test set)" in (out / "budget_search.md").read_text()
