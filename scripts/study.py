#!/usr/bin/env python3
"""The reproduction study: the method's findings at CPU scale (MNIST, ε = 0.3, mnist-small).

    python scripts/study.py --data-dir ../shared/data --out runs/study            # the real study
    python scripts/study.py --data-dir ../shared/data --out runs/study-quick --quick   # minutes

1. adversary: how strong must the training adversary be? FGSM with a random start and PGD-k,
   k = 1, 2, 5, 10, 40, each trained for the same epochs; robust accuracy under ``psadv eval``'s
   default (the strong cascade) and training time.
2. staleness: robust accuracy after a fixed budget vs staleness, untreated, emulated in one process
   (``--emulate-staleness S``, S = 0, 8, 32, 64, 128) and real under MPI (attackers refreshed
   every R = 1, 8, 32, 64, 128 versions; the server measures the staleness τ it sees).
3. scaling: ``psadv scaling-report`` sweeps the attacker count (and push mode) with a time budget
   per run: measured speedup on this machine and the bottleneck model's prediction beyond it.
4. headline: time to target measured fairly, by ``scripts/budget_search.py``: for the Madry-style
   baseline (PGD-40) and psadv's recipes (PGD-k, k in --psadv-steps), each in one process, the
   smallest ``--time-budget`` at which every seed ends at the target (robust and clean accuracy of
   the final model, --headline-eval-args on the full test set), and its ratio to the baseline's.
5. attackers: what N attackers buy, measured on one machine: the default recipe trained with the
   staleness of N emulated attackers (``--emulate-attackers N``) and with a fixed staleness S
   (``--emulate-staleness S``), each with every method against staleness (``--methods``: nothing,
   server-side refinement, …), two seeds each; final robust accuracy at a fixed budget and the
   versions to the target; one short MPI run (one attacker) measures c_s and c_a, so the report
   predicts the time to target for each N and method.
6. masking: does a weaker training adversary leave more gradient masking? FGSM-RS, N-FGSM, FGSM-RS
   with reused perturbations (psadv's one-step recipe) and PGD-k (k = 5, 10, 40) at the same epoch
   budget, two seeds each, graded twice: PGD-50×10 (what psadv reported before) and ``psadv eval``'s
   strong cascade (APGD-CE, APGD-T, Square); the difference is how much PGD over-claims, the
   cascade's ``masking_gap`` how much Square finds beyond the gradients.

Each part writes run directories under OUT/<part>/runs and a report (report.md, report.json,
PNGs) under OUT/<part>/report; part 4 writes the budget search (its trials, budget_search.md and
budget_search.json) under OUT/part4-headline/search. OUT/study.md and OUT/study.json collect the
headline numbers.
Every command is printed before it runs. A finished run (summary.json present) is kept when the
study is run again; a part whose report exists is skipped unless named in --redo.
Needs a quiet machine: every number is a wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from psadv.report.runs import final_eval_mismatch
from psadv.bench.budget import ratio
from psadv.bench.child import run_child
from psadv.rundir import FINAL_EVAL, SUMMARY

PSADV = [sys.executable, "-m", "psadv.cli"]
# The study recipe (scripts/bench_core.py) without its adversary and budget.
RECIPE = ["--model", "mnist-small", "--eps", "0.3", "--eps-ramp", "0.2", "--optimizer", "adam", "--lr", "5e-3",
          "--lr-schedule", "onecycle", "--batch-size", "100", "--log-every", "50"]
ADVERSARIES = [("fgsm-rs", ["--attack", "fgsm-rs"])] + [
    (f"pgd-{k}", ["--attack", "pgd", "--attack-steps", str(k)]) for k in (1, 2, 5, 10, 40)]
STALENESS = (0, 8, 32, 64, 128)
PARTS = {1: "part1-adversary", 2: "part2-staleness", 3: "part3-scaling", 4: "part4-headline", 5: "part5-attackers",
         6: "part6-masking"}
MASKING_ADVERSARIES = [("fgsm-rs", ["--attack", "fgsm-rs"]), ("n-fgsm", ["--attack", "n-fgsm"]),
                       ("fgsm-rs-reuse", ["--attack", "fgsm-rs", "--reuse-perturbations"])] + [
    (f"pgd-{k}", ["--attack", "pgd", "--attack-steps", str(k)]) for k in (5, 10, 40)]
# part 5: what the trainer does against staleness: "none" = nothing (--refine-steps 0), "default" =
# psadv's defaults (one refinement step of 1.25ε), or any psadv train flags
METHODS = ("none", "default")
METHOD_WORDS = {"none": ["--refine-steps", "0"], "default": []}
PGD_EVAL = "final_eval_pgd.json"  # part 6: the PGD-50x10 grade beside final_eval.json's strong one
TITLES = {1: "Study part 1: how strong must the training adversary be?",
          2: "Study part 2: robust accuracy vs staleness",
          3: "Study part 3: speedup vs attackers",
          5: "Study part 5: what N attackers buy (emulated)",
          6: "Study part 6: does a weaker training adversary mask gradients more?"}


BUDGET_SEARCH = Path(__file__).with_name("budget_search.py")
# what part 4 writes: the budget search's output instead of a scaling report
PART_RESULT = {4: Path("search") / "budget_search.json"}


def part_result(number: int) -> Path:
    """The file a finished part leaves, relative to its directory."""
    return PART_RESULT.get(number, Path("report") / "report.json")


def method_name(flags: str) -> str:
    """A run directory's name for a set of flags: '--refine-steps 1 --reuse-perturbations' →
    'refine-steps_1_reuse-perturbations'."""
    return "_".join(w.lstrip("-") for w in shlex.split(flags)) or "default"


def display(cmd: list[str]) -> str:
    """The command as a user would type it (``psadv`` for ``python -m psadv.cli``, ``python`` for this
    interpreter)."""
    text = shlex.join(cmd)
    return text.replace(shlex.join(PSADV), "psadv").replace(shlex.quote(sys.executable) + " ", "python ")


class Study:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.quick = args.quick
        self.failures: list[str] = []

    # --- budgets and evaluation, full or quick ---------------------------------------------------
    def budget(self, epochs: float) -> list[str]:
        # quick: one thread per process, so a smoke run stays quick on a machine busy with other work
        return ["--steps", str(self.args.quick_steps), "--threads", "1"] if self.quick else ["--epochs", str(epochs)]

    def periodic_eval(self) -> list[str]:
        """Periodic evaluation on a test slice; eval-every is a multiple of log-every so every
        evaluation's pause is measured."""
        if self.quick:
            return ["--eval-every", "10", "--log-every", "5", "--eval-examples", "100", "--eval-steps", "5"]
        return ["--eval-examples", str(self.args.eval_examples), "--eval-every", "600"]

    def final_eval_flags(self) -> list[str]:
        if self.quick:
            return ["--examples", "100", "--attack", "pgd", "--steps", "5", "--restarts", "2", "--threads", "1"]
        return ["--examples", str(self.args.final_examples)]  # psadv eval's default: the strong cascade

    def launcher(self, attackers: int) -> list[str]:
        return shlex.split(self.args.launcher.format(n=attackers + 1)) if attackers else []

    # --- running -----------------------------------------------------------------------------------
    def run(self, cmd: list[str]) -> int:
        print("$ " + display(cmd), flush=True)
        if self.args.dry_run:
            return 0
        return run_child(cmd).returncode

    def train(self, run_dir: Path, flags: list[str], attackers: int = 0) -> None:
        if (run_dir / SUMMARY).exists():
            print(f"# {run_dir}: finished earlier, kept", flush=True)
            return
        cmd = self.launcher(attackers) + PSADV + ["train", "--run-dir", str(run_dir), "--no-progress", *RECIPE,
                                                  *self.data_dir(), *flags]
        if run_dir.exists():
            cmd.append("--overwrite")  # an unfinished run from an earlier attempt starts over
        if self.run(cmd) != 0:
            self.failures.append(str(run_dir))
            print(f"# {run_dir}: training failed; the report shows it as partial", flush=True)

    def final_eval(self, run_dir: Path) -> None:
        """``psadv eval --save``: the strong evaluation of the final model, in RUN/final_eval.json."""
        if (run_dir / FINAL_EVAL).exists() or not (self.args.dry_run or (run_dir / SUMMARY).exists()):
            return
        if self.run(PSADV + ["eval", str(run_dir), "--save", "--no-progress", *self.data_dir(),
                             *self.final_eval_flags()]) != 0:
            self.failures.append(f"{run_dir} (psadv eval)")

    def report(self, number: int) -> None:
        part_dir = self.out / PARTS[number]
        cmd = PSADV + ["scaling-report", str(part_dir / "runs"), "--out", str(part_dir / "report"), "--overwrite",
                       "--target", str(self.args.target), "--title", TITLES[number]]
        if self.run(cmd) != 0:
            self.failures.append(f"{part_dir} (report)")

    def data_dir(self) -> list[str]:
        return ["--data-dir", self.args.data_dir] if self.args.data_dir else []

    # --- the four parts ------------------------------------------------------------------------------
    def part1(self, part_dir: Path) -> None:
        for name, flags in ADVERSARIES:
            run_dir = part_dir / "runs" / name
            self.train(run_dir, [*flags, *self.budget(self.args.epochs_adversary), *self.periodic_eval()])
            self.final_eval(run_dir)
        self.report(1)

    def part2(self, part_dir: Path) -> None:
        # staleness untreated (part 5 measures what the methods against it buy)
        flags = ["--attack", "pgd", "--attack-steps", str(self.args.staleness_steps), "--refine-steps", "0",
                 *self.budget(self.args.epochs_staleness), *self.periodic_eval()]
        for S in STALENESS:
            run_dir = part_dir / "runs" / f"emulated-S{S}"
            self.train(run_dir, [*flags, "--emulate-staleness", str(S)])
            self.final_eval(run_dir)
        for S in STALENESS:
            run_dir = part_dir / "runs" / f"mpi-refresh{max(1, S)}"
            # nothing rejected: the staleness comes from refreshing the attackers every R versions
            self.train(run_dir, [*flags, "--refresh-every", str(max(1, S)), "--max-staleness", "1000"],
                       attackers=self.args.attackers)
            self.final_eval(run_dir)
        self.report(2)

    def part3(self, part_dir: Path) -> None:
        seconds = self.args.quick_seconds if self.quick else self.args.seconds_scaling
        cmd = PSADV + ["scaling-report", "--out", str(part_dir / "report"), "--overwrite", "--title", TITLES[3],
                       "--target", str(self.args.target), "--workers", self.args.workers,
                       "--push", "examples,gradients", "--launcher", self.args.launcher,
                       "--time-budget", str(seconds), *self.data_dir(), "--",
                       *RECIPE, "--attack", "pgd", "--attack-steps", str(self.args.scaling_steps), "--eval-every", "0",
                       *(["--eval-examples", "100", "--threads", "1"] if self.quick else
                         ["--eval-examples", str(self.args.eval_examples)])]
        if self.run(cmd) != 0:
            self.failures.append(f"{part_dir} (sweep)")

    def part4(self, part_dir: Path) -> None:
        # the baseline first: budget_search.py states every ratio against its first recipe
        recipes = [("madry-pgd40", 40)] + [(f"pgd{k}", k) for k in self.args.psadv_steps]
        cmd = [sys.executable, str(BUDGET_SEARCH), "--out", str(part_dir / "search"), *self.data_dir(),
               "--seeds", ",".join(map(str, self.args.headline_seeds)), "--target", str(self.args.headline_target),
               "--clean-target", str(self.args.clean_target)]
        if self.quick:  # one tiny budget, graded on 100 images
            cmd += ["--start", "2", "--min-budget", "2", "--max-budget", "2", "--gate-examples", "0",
                    "--eval-args", "--examples 100 --attack pgd --steps 5 --restarts 2 --threads 1"]
        else:
            cmd += ["--start", str(self.args.headline_start), "--eval-args", self.args.headline_eval_args]
        for name, steps in recipes:
            flags = [*RECIPE, "--attack", "pgd", "--attack-steps", str(steps), *(["--threads", "1"] if self.quick else [])]
            cmd += ["--recipe", f"{name}={shlex.join(flags)}"]
        if self.run(cmd) != 0:
            self.failures.append(f"{part_dir} (budget search)")

    def part5(self, part_dir: Path) -> None:
        # the default recipe at a fixed budget; periodic evaluation finds the versions to target
        common = [*self.budget(self.args.epochs_attackers),
                  *(self.periodic_eval() if self.quick else
                    ["--eval-examples", str(self.args.eval_examples), "--eval-every", "300"])]
        for seed in self.args.seeds:
            for n in self.args.emulated:
                for name, flags in self.args.methods:
                    run_dir = part_dir / "runs" / f"emulated-n{n}-{name}-seed{seed}"
                    self.train(run_dir, [*common, "--emulate-attackers", str(n), *flags, "--seed", str(seed)])
                    self.final_eval(run_dir)
            # the same methods against a fixed staleness S (S = 0: the plain recipe, nothing to treat)
            for S in self.args.fixed_staleness:
                for name, flags in (self.args.methods if S else [("none", METHOD_WORDS["none"])]):
                    run_dir = part_dir / "runs" / f"staleness-S{S}-{name}-seed{seed}"
                    self.train(run_dir, [*common, "--emulate-staleness", str(S), *flags, "--seed", str(seed)])
                    self.final_eval(run_dir)
        # c_s and c_a for the bottleneck model: a short real run with one attacker
        seconds = self.args.quick_seconds if self.quick else self.args.seconds_scaling
        self.train(part_dir / "runs" / "mpi-w1", ["--time-budget", str(seconds), "--eval-every", "0",
                                                  *(["--threads", "1"] if self.quick else [])], attackers=1)
        self.report(5)

    def part6(self, part_dir: Path) -> None:
        for name, flags in MASKING_ADVERSARIES:
            for seed in self.args.seeds:
                run_dir = part_dir / "runs" / f"{name}-seed{seed}"
                self.train(run_dir, [*flags, *self.budget(self.args.epochs_masking), "--eval-every", "0",
                                     "--seed", str(seed)])
                self.final_eval(run_dir)
                self.pgd_eval(run_dir)
        if self.args.dry_run:
            return
        rows = []
        for name, _ in MASKING_ADVERSARIES:  # in the plan's order: every finished seed, of this or an earlier call
            seeds = sorted((part_dir / "runs").glob(f"{name}-seed*"), key=lambda d: int(d.name.rsplit("seed", 1)[1]))
            for run_dir in seeds:
                files = [run_dir / f for f in (SUMMARY, FINAL_EVAL, PGD_EVAL)]
                if all(f.exists() for f in files):
                    summary, strong, pgd = (json.loads(f.read_text()) for f in files)
                    stale = [final_eval_mismatch(grade, summary.get("version")) for grade in (strong, pgd)]
                    if any(stale):  # a grade of an earlier model than the run's final one
                        print(f"# warning: {run_dir}: {next(filter(None, stale))}", flush=True)
                        continue
                    rows.append({"adversary": name, "seed": run_dir.name.rsplit("seed", 1)[1],
                                 "seconds": summary["elapsed"], "strong": strong, "pgd": pgd})
        report = part_dir / "report"
        report.mkdir(parents=True, exist_ok=True)
        table = masking_table(rows)
        (report / "report.json").write_text(json.dumps({"rows": rows, "table": table}, indent=2) + "\n")
        (report / "report.md").write_text(render_masking(table, TITLES[6]))

    def pgd_eval(self, run_dir: Path) -> None:
        """The PGD-50x10 grade psadv used to report, as JSON in RUN/final_eval_pgd.json."""
        path = run_dir / PGD_EVAL
        if path.exists() or not (self.args.dry_run or (run_dir / SUMMARY).exists()):
            return
        cmd = PSADV + ["eval", str(run_dir), "--json", "--no-progress", "--attack", "pgd", *self.data_dir(),
                       *self.final_eval_flags()]
        print("$ " + display(cmd), flush=True)
        if self.args.dry_run:
            return
        out = run_child(cmd, stdout=subprocess.PIPE, text=True)
        if out.returncode != 0:
            self.failures.append(f"{run_dir} (psadv eval --attack pgd)")
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(out.stdout)
        tmp.replace(path)

    # --- the summary ----------------------------------------------------------------------------------
    def summarise(self) -> dict:
        summary = {"quick": self.quick, "target": self.args.target, "headline_target": self.args.headline_target,
                   "parts": {}, "failures": self.failures}
        for number, name in PARTS.items():
            path = self.out / name / part_result(number)
            if path.exists():
                summary["parts"][name] = str(path.relative_to(self.out))
        headline = self.out / PARTS[4] / part_result(4)
        lines = ["# psadv reproduction study", "",
                 f"{'Quick smoke version' if self.quick else 'Study'}, run as `python {shlex.join(sys.argv)}` "
                 f"(budgets: the defaults of scripts/study.py unless given there). Reports:", ""]
        lines += [f"- [{name}]({name}/{part_result(number).with_suffix('.md').as_posix()})"
                  for number, name in PARTS.items() if name in summary["parts"]]
        if headline.exists():
            results = json.loads(headline.read_text())["results"]
            base = results[0]
            rows = [{"recipe": r["name"], "flags": r["flags"], "time_to_target": r["time_to_target"],
                     "ratio": ratio(base, r)} for r in results]
            best = max((r for r in rows[1:] if r["ratio"]), key=lambda r: r["ratio"], default=None)
            summary["headline"] = {"baseline": base["name"], "runs": rows, "best": best}
            lines += ["", f"## Headline: time to target by budget search, vs the Madry-style baseline ({base['name']})",
                      "", "| recipe | time to target (s) | speedup vs baseline |", "|---|---|---|"]
            lines += [f"| {r['recipe']} | {_fmt(r['time_to_target'], '{:g}')} | {_fmt(r['ratio'], '{:.2f}×')} |"
                      for r in rows]
            lines += ["", f"Best psadv recipe: {best['recipe']}, {best['ratio']:.2f}× sooner at the target."
                      if best else "No psadv recipe reached the target (or the baseline did not)."]
        (self.out / "study.md").write_text("\n".join(lines) + "\n")
        (self.out / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def masking_table(rows: list[dict]) -> list[dict]:
    """Per training adversary (in the order first seen): means over seeds and the spread (max − min)
    of the PGD-50x10 grade, the strong cascade's worst case, PGD's over-claim and Square's gap."""
    by: dict[str, list[dict]] = {}
    for row in rows:
        by.setdefault(row["adversary"], []).append(row)
    table = []
    for adversary, runs in by.items():
        def stats(values):
            return {"mean": sum(values) / len(values), "spread": max(values) - min(values)}
        pgd = [r["pgd"]["robust_acc"] for r in runs]
        strong = [r["strong"]["robust_acc"] for r in runs]
        table.append({
            "adversary": adversary, "seeds": len(runs),
            "seconds": stats([r["seconds"] for r in runs]),
            "clean": stats([r["strong"]["clean_acc"] for r in runs]),
            "pgd": stats(pgd), "strong": stats(strong),
            "over_claim": stats([a - b for a, b in zip(pgd, strong)]),
            "masking_gap": stats([r["strong"].get("masking_gap") or 0.0 for r in runs]),
            "attack": runs[0]["strong"]["attack"], "examples": runs[0]["strong"]["examples"]})
    return table


def render_masking(table: list[dict], title: str) -> str:
    lines = [f"# {title}", "", "All numbers *measured*; mean over seeds (spread = max − min).", "",
             "| training adversary | seeds | training s | clean | PGD-50×10 | strong (worst case) | "
             "PGD over-claims by | Square beyond gradients |", "|---|---|---|---|---|---|---|---|"]

    def pct(s):
        return f"{s['mean']:.1%} ({s['spread']:.1%})"

    for r in table:
        lines.append(f"| {r['adversary']} | {r['seeds']} | {r['seconds']['mean']:.0f} | {pct(r['clean'])} | "
                     f"{pct(r['pgd'])} | {pct(r['strong'])} | {r['over_claim']['mean'] * 100:.1f} points | "
                     f"{r['masking_gap']['mean'] * 100:.1f} points |")
    if table:
        lines += ["", f"Strong cascade: {table[0]['attack']} on {table[0]['examples']} test examples."]
    return "\n".join(lines) + "\n"


def _fmt(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study", help="study directory [runs/study]")
    p.add_argument("--data-dir", default=None, help="dataset directory (passed to psadv)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a few-minute smoke version")
    p.add_argument("--parts", default="1,2,3,4,5,6", help="which parts to run [1,2,3,4,5,6]")
    p.add_argument("--redo", default="", help="parts to rerun although their report exists, e.g. 3,4")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--launcher", default="mpiexec -n {n}", help="MPI launcher, {n} = attackers + 1 [mpiexec -n {n}]")
    p.add_argument("--attackers", type=int, default=2, help="attackers of the MPI runs in part 2 [2]")
    p.add_argument("--target", type=float, default=0.89, help="robust accuracy target of the reports [0.89]")
    p.add_argument("--epochs-adversary", type=float, default=10, help="part 1: epochs per adversary [10]")
    p.add_argument("--epochs-staleness", type=float, default=5, help="part 2: epochs per staleness [5]")
    p.add_argument("--staleness-steps", type=int, default=5, help="part 2: PGD steps of the training attack [5]")
    p.add_argument("--seconds-scaling", type=float, default=120, help="part 3: seconds per run [120]")
    p.add_argument("--workers", default="0,1,2,3", help="part 3: attacker counts (0 = one process) [0,1,2,3]")
    p.add_argument("--scaling-steps", type=int, default=10, help="part 3: PGD steps of the training attack [10]")
    p.add_argument("--psadv-steps", default="5,10", help="part 4: PGD steps of the psadv recipes [5,10]")
    p.add_argument("--headline-seeds", default="0,1,2", help="part 4: seeds; every one must reach the target [0,1,2]")
    # the budget searches of results/ started here: the shortest budgets measured to reach 89% PGD-50x10
    # lie between 120 s (one-step) and 960 s (PGD-40), so halving or doubling from 120 s finds each soon
    p.add_argument("--headline-start", type=float, default=120, help="part 4: first budget in seconds [120]")
    p.add_argument("--headline-target", type=float, default=0.89,
                   help="part 4: robust accuracy target of the final evaluation [0.89]")
    p.add_argument("--clean-target", type=float, default=0.98, help="part 4: clean accuracy target [0.98]")
    p.add_argument("--headline-eval-args", default="--attack pgd --steps 50 --restarts 10",
                   help="part 4: psadv eval flags of each final evaluation, on the full test set (e.g. "
                        "'--attack strong' with --headline-target 0.87) [--attack pgd --steps 50 --restarts 10]")
    p.add_argument("--epochs-attackers", type=float, default=5, help="part 5: epochs per emulated run [5]")
    p.add_argument("--emulated", default="1,8,32,64", help="part 5: emulated attacker counts [1,8,32,64]")
    p.add_argument("--methods", default=";".join(METHODS),
                   help="part 5: what to do against staleness, ';'-separated psadv train flags ('none': nothing, "
                        "'default': psadv's defaults) "
                        f"[{';'.join(METHODS)}]")
    p.add_argument("--fixed-staleness", default="0,32", help="part 5: fixed emulated staleness S, with each method [0,32]")
    p.add_argument("--seeds", default="0,1", help="parts 5 and 6: seeds [0,1]")
    p.add_argument("--epochs-masking", type=float, default=2, help="part 6: epochs per adversary [2]")
    p.add_argument("--eval-examples", type=int, default=1000, help="periodic evaluation slice [1000]")
    p.add_argument("--final-examples", type=int, default=1000,
                   help="test examples of the final evaluations of parts 1, 2, 5 and 6 (10000 = the whole test set; "
                        "part 4 grades on the whole test set) [1000]")
    p.add_argument("--quick-steps", type=int, default=30, help="--quick: versions per run [30]")
    p.add_argument("--quick-seconds", type=float, default=3, help="--quick: seconds per scaling run [3]")
    args = p.parse_args(argv)
    try:
        args.parts = sorted({int(x) for x in args.parts.split(",") if x.strip()})
        args.redo = {int(x) for x in args.redo.split(",") if x.strip()}
        args.psadv_steps = [int(x) for x in args.psadv_steps.split(",") if x.strip()]
        args.emulated, args.fixed_staleness, args.seeds, args.headline_seeds = (
            [int(x) for x in text.split(",") if x.strip()]
            for text in (args.emulated, args.fixed_staleness, args.seeds, args.headline_seeds))
    except ValueError:
        p.error("--parts, --redo, --psadv-steps, --emulated, --fixed-staleness, --seeds and --headline-seeds take "
                "comma-separated integers")
    args.methods = [(method_name(text), METHOD_WORDS.get(text.strip(), shlex.split(text)))
                    for text in args.methods.split(";") if text.strip()]
    if not set(args.parts) <= set(PARTS) or not args.redo <= set(PARTS):
        p.error("parts are 1, 2, 3, 4, 5 and 6")
    if "{n}" not in args.launcher:
        p.error(f"--launcher must contain {{n}}, got {args.launcher!r}")
    if args.attackers < 1:
        p.error("--attackers must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    study = Study(args)
    study.out.mkdir(parents=True, exist_ok=True)
    for number in args.parts:
        part_dir = study.out / PARTS[number]
        if (part_dir / part_result(number)).exists() and number not in args.redo:
            print(f"# part {number} ({PARTS[number]}): report exists, skipped (--redo {number} reruns it)", flush=True)
            continue
        print(f"# part {number}: {PARTS[number]}", flush=True)
        getattr(study, f"part{number}")(part_dir)
    if args.dry_run:
        return 0
    summary = study.summarise()
    print(f"# study summary: {study.out / 'study.md'}")
    if summary["failures"]:
        print("# failed: " + ", ".join(summary["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
