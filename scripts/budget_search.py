#!/usr/bin/env python3
"""Time to target, measured fairly: for each recipe, the smallest ``--time-budget`` whose runs end at
the target for every seed (``psadv.bench.budget.BudgetSearch`` picks the budgets).

    python scripts/budget_search.py --data-dir ../shared/data --out runs/budget \\
        --recipe default= --recipe pgd5='--attack-steps 5' --seeds 0,1,2 --start 60

Each trial trains ``psadv train --time-budget T --seed S --eval-every 0`` (schedules stretch to T;
no periodic evaluation), times the whole command (start-up included), then evaluates the final model
once with ``psadv eval`` (default: PGD-50×10 on the full test set) and checks robust and clean
accuracy against the targets. A trial fails at its first failing seed. ``--gate-examples`` first
evaluates a slice and skips the full evaluation when the slice is clearly below the target (by more
than ``--gate-margin``), which saves most of the evaluation time of short failing budgets.

``--grid T1,T2,...`` tries those budgets instead of searching: every recipe at every budget for every
seed (no early stop), interleaved budget by budget so the VM's drift touches every recipe alike; the
time to target is then the smallest budget of the grid at which every seed passed. With
``--train-only`` the grid trains and stops: the same command without it (on another machine, say,
with ``--eval-args '... --device cuda'`` and ``--eval-jobs``) evaluates the kept runs and reports.

Finished trials (a run with summary.json and eval.json) are kept, so the same command continues an
interrupted search. Writes OUT/budget_search.json and OUT/budget_search.md. Every time is a
wall-clock time: run it on a quiet machine, one benchmark at a time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from psadv.bench.budget import BudgetSearch, bracket_text, ratio
from psadv.bench.child import run_child, run_children
from psadv.rundir import SUMMARY

PSADV = [sys.executable, "-m", "psadv.cli"]


def parse_recipe(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--recipe wants NAME=FLAGS, got {text!r}")
    return name.strip(), shlex.split(flags)


def run_json(cmd: list[str]) -> dict:
    print("$ " + shlex.join(cmd).replace(shlex.join(PSADV), "psadv"), flush=True)
    out = run_child(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(f"budget_search: command failed with exit code {out.returncode}")
    return json.loads(out.stdout)


class Trial:
    """One recipe at one budget and seed: train, time it, evaluate it."""

    def __init__(self, args, recipe: list[str], run_dir: Path, budget: float, seed: int):
        self.args, self.recipe, self.run_dir, self.budget, self.seed = args, recipe, run_dir, budget, seed

    def train(self) -> float:
        timing = self.run_dir / "wall.json"
        if (self.run_dir / SUMMARY).exists() and timing.exists():
            return json.loads(timing.read_text())["seconds"]
        cmd = PSADV + ["train", "--run-dir", str(self.run_dir), "--no-progress", "--time-budget", str(self.budget),
                       "--seed", str(self.seed), "--eval-every", "0", *self.data_dir(), *self.recipe]
        if self.run_dir.exists():
            cmd.append("--overwrite")
        print("$ " + shlex.join(cmd).replace(shlex.join(PSADV), "psadv"), flush=True)
        start = time.perf_counter()
        if run_child(cmd).returncode != 0:
            raise SystemExit(f"budget_search: training {self.run_dir} failed")
        seconds = time.perf_counter() - start
        timing.write_text(json.dumps({"seconds": round(seconds, 2)}) + "\n")
        return seconds

    def evaluate(self, examples: int | None, name: str, flags: list[str] | None = None) -> dict:
        path = self.run_dir / name
        if path.exists():
            return json.loads(path.read_text())
        result = run_json(self.eval_command(examples, flags))
        path.write_text(json.dumps(result) + "\n")
        return result

    def eval_command(self, examples: int | None, flags: list[str] | None = None) -> list[str]:
        """``psadv eval`` of this run: the final grade's ``--eval-args`` unless other flags are given."""
        flags = shlex.split(self.args.eval_args) if flags is None else flags
        return PSADV + ["eval", str(self.run_dir), "--json", "--no-progress", *self.data_dir(),
                        *(["--examples", str(examples)] if examples else []), *flags]

    def data_dir(self) -> list[str]:
        return ["--data-dir", self.args.data_dir] if self.args.data_dir else []

    def measure(self) -> dict:
        wall = self.train()
        summary = json.loads((self.run_dir / SUMMARY).read_text())
        row = {"seed": self.seed, "wall_seconds": round(wall, 2), "versions": summary["version"]}
        if self.args.gate_examples:
            gate = self.evaluate(self.args.gate_examples, "gate_eval.json")
            row["gate_robust_acc"] = gate["robust_acc"]
            if gate["robust_acc"] < self.args.target - self.args.gate_margin:
                return {**row, "passed": False, "by": "gate"}
        final = self.evaluate(None, "eval.json")
        clean = final["clean_acc"]
        if self.args.full_clean:  # the robust grade ran on a slice: the clean one takes the whole test set
            clean = self.evaluate(None, "clean_eval.json", ["--attack", "none"])["clean_acc"]
            row["slice_clean_acc"] = final["clean_acc"]
        passed = final["robust_acc"] >= self.args.target and clean >= self.args.clean_target
        return {**row, "clean_acc": clean, "robust_acc": final["robust_acc"],
                "attack": final["attack"], "examples": final["examples"], "passed": passed, "by": "final"}


def search(args, name: str, recipe: list[str]) -> dict:
    policy = BudgetSearch(start=args.start, tolerance=args.tolerance, min_budget=args.min_budget,
                          max_budget=args.max_budget)
    trials: dict[str, list[dict]] = {}
    while (budget := policy.next_budget()) is not None:
        rows = []
        for seed in args.seeds:
            rows.append(Trial(args, recipe, args.out / name / f"T{budget:g}" / f"seed{seed}", budget, seed).measure())
            if not rows[-1]["passed"]:
                break
        trials[f"{budget:g}"] = rows
        policy.record(budget, all(r["passed"] for r in rows) and len(rows) == len(args.seeds))
        print(f"# {name}: budget {budget:g}s {'passed' if policy.results[budget] else 'failed'}", flush=True)
    return {"name": name, "flags": shlex.join(recipe), **policy.answer(), "trials": trials}


def evaluate_all(args, trials: list[Trial]) -> None:
    """The final evaluation (eval.json) of every trial that lacks one, ``--eval-jobs`` at a time."""
    todo = [t for t in trials if not (t.run_dir / "eval.json").exists()]
    parts = [t.run_dir / "eval.json.part" for t in todo]
    files = [part.open("w") for part in parts]
    try:
        for t in todo:
            print("$ " + shlex.join(t.eval_command(None)).replace(shlex.join(PSADV), "psadv"), flush=True)
        codes = run_children([(t.eval_command(None), {"stdout": f}) for t, f in zip(todo, files)], args.eval_jobs)
    finally:
        for f in files:
            f.close()
    for t, part, code in zip(todo, parts, codes):
        if code != 0:
            raise SystemExit(f"budget_search: evaluating {t.run_dir} failed with exit code {code}")
        try:
            json.loads(part.read_text())
        except ValueError:
            raise SystemExit(f"budget_search: the evaluation of {t.run_dir} printed no JSON object") from None
        part.replace(t.run_dir / "eval.json")


def grid(args) -> list[dict] | None:
    """Every recipe at every budget of ``--grid`` for every seed; None after ``--train-only``."""
    trials = {(name, budget, seed): Trial(args, recipe, args.out / name / f"T{budget:g}" / f"seed{seed}", budget, seed)
              for budget in args.grid for seed in args.seeds for name, recipe in args.recipe}
    for trial in trials.values():  # budget-major: a grid cut short still compares recipes budget by budget
        trial.train()
    if args.train_only:
        print(f"# trained {len(trials)} runs under {args.out}; evaluate them with the same command without --train-only")
        return None
    evaluate_all(args, list(trials.values()))
    results = []
    for name, recipe in args.recipe:
        policy = BudgetSearch(start=args.grid[0], min_budget=args.grid[0], max_budget=args.grid[-1])
        rows = {}
        for budget in args.grid:
            rows[f"{budget:g}"] = [trials[name, budget, seed].measure() for seed in args.seeds]
            policy.record(budget, all(r["passed"] for r in rows[f"{budget:g}"]))
        # a grid is done when it has run: no bisection follows
        results.append({"name": name, "flags": shlex.join(recipe), **policy.answer(), "done": True, "trials": rows})
    return results


def render(args, results: list[dict]) -> str:
    base = results[0]
    # what graded the runs, read from their eval.json: a grid may have been graded by another command
    graded = sorted({(t["attack"], t["examples"]) for r in results for rows in r["trials"].values() for t in rows
                     if t["by"] == "final"})
    lines = ["# Time to target by budget search", "",
             f"`python {shlex.join(sys.argv)}`", "",
             f"Target: robust ≥ {args.target:.1%} and clean ≥ {args.clean_target:.1%} in the final evaluation "
             f"({'; '.join(f'{attack} on {n:,} test images' for attack, n in graded) or 'none yet'}"
             f"{'; clean on the full test set' if args.full_clean else ''}), for each of "
             f"seeds {', '.join(map(str, args.seeds))}; " +
             (f"budgets {', '.join(f'{b:g}' for b in args.grid)} s, each for every recipe and seed"
              if args.grid else f"bisection stops within {args.tolerance:.0%}") + ". All numbers *measured*.", "",
             f"| recipe | time to target (s) | bracket (s) | ratio vs {base['name']} | budgets tried (pass/fail) |",
             "|---|---|---|---|---|"]
    for r in results:
        tried = ", ".join(f"{b}{'✓' if ok else '✗'}" for b, ok in r["tried"].items())
        ttt = "–" if r["time_to_target"] is None else f"{r['time_to_target']:g}"
        rat = ratio(base, r)
        lines.append(f"| {r['name']} (`{r['flags']}`) | {ttt} | {bracket_text(*r['bracket'])} | "
                     f"{'–' if rat is None else f'{rat:.2f}×'} | {tried} |")
    lines += ["", "Per trial (seed: clean / robust, wall seconds incl. start-up):", ""]

    def cell(t: dict) -> str:
        if t["by"] == "gate":
            return f"seed {t['seed']}: gate {t['gate_robust_acc']:.1%}, {t['wall_seconds']:.0f}s"
        by = f" ({t['attack']}, {t['examples']:,})" if len(graded) > 1 else ""
        return f"seed {t['seed']}: {t['clean_acc']:.2%} / {t['robust_acc']:.2%}{by}, {t['wall_seconds']:.0f}s"
    for r in results:
        for budget, rows in r["trials"].items():
            lines.append(f"- {r['name']} at {budget}s: {'; '.join(cell(t) for t in rows)}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/budget-search"), help="output directory")
    p.add_argument("--data-dir", default=None, help="dataset directory (passed to psadv)")
    p.add_argument("--recipe", action="append", type=parse_recipe, default=None,
                   help="NAME=FLAGS, repeatable; the first is the baseline of the ratios [default=]")
    p.add_argument("--seeds", default="0,1,2", help="seeds; every one must reach the target [0,1,2]")
    p.add_argument("--start", type=float, default=60.0, help="first budget in seconds [60]")
    p.add_argument("--tolerance", type=float, default=0.15, help="relative width at which bisection stops [0.15]")
    p.add_argument("--min-budget", type=float, default=1.0, help="never try below this budget [1]")
    p.add_argument("--max-budget", type=float, default=3600.0,
                   help="give up above this budget (= --start = --min-budget: try that budget only) [3600]")
    p.add_argument("--grid", default=None, help="budgets to try instead of searching, e.g. 120,170,240")
    p.add_argument("--train-only", action="store_true", help="with --grid: train the runs, evaluate nothing")
    p.add_argument("--eval-jobs", type=int, default=1, help="evaluations run at once (grid) [1]")
    p.add_argument("--target", type=float, default=0.89, help="robust accuracy target [0.89]")
    p.add_argument("--clean-target", type=float, default=0.98, help="clean accuracy target [0.98]")
    p.add_argument("--eval-args", default="--attack pgd --steps 50 --restarts 10",
                   help="psadv eval flags of the final evaluation [--attack pgd --steps 50 --restarts 10]")
    p.add_argument("--full-clean", action="store_true",
                   help="grade clean accuracy on the full test set (psadv eval --attack none), for when "
                        "--eval-args grade robustness on a slice (--examples N)")
    p.add_argument("--gate-examples", type=int, default=1000, help="slice evaluated first (0 = no gate) [1000]")
    p.add_argument("--gate-margin", type=float, default=0.02,
                   help="skip the full evaluation when the slice is this far below the target [0.02]")
    args = p.parse_args(argv)
    args.recipe = args.recipe or [("default", [])]
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds wants integers, got {args.seeds!r}")
    if args.grid is not None:
        try:
            args.grid = sorted({float(b) for b in args.grid.split(",")})
        except ValueError:
            p.error(f"--grid wants budgets in seconds, got {args.grid!r}")
        if args.grid[0] <= 0:
            p.error("--grid budgets must be > 0")
        args.gate_examples = 0  # a grid grades every run in full
    elif args.train_only:
        p.error("--train-only needs --grid")
    if args.eval_jobs < 1:
        p.error("--eval-jobs must be >= 1")
    if not 0 < args.min_budget <= args.start <= args.max_budget:
        p.error("--start must lie in [--min-budget, --max-budget], and budgets must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.grid is None:
        results = [search(args, name, flags) for name, flags in args.recipe]
    elif (results := grid(args)) is None:
        return 0
    (args.out / "budget_search.json").write_text(json.dumps({"results": results}, indent=2) + "\n")
    (args.out / "budget_search.md").write_text(render(args, results))
    print((args.out / "budget_search.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
