#!/usr/bin/env python
"""Benchmark the asynchronous parameter server (not a test; numbers go into records in results/).

Throughput (default): one short run per world size, each with the same recipe and a time budget:

    python scripts/bench_mpi.py --data-dir ../shared/data/mnist --seconds 40 --ranks 1,2,3

``--ranks 1`` is the single-process trainer (plain ``psadv train``), ``2`` and ``3`` are
``mpiexec -n 2|3 psadv train`` (server + 1 or 2 attackers). Reported per run: examples/s consumed
by the optimizer (steady state, as ``psadv scaling-report`` measures it: the median over the windows
between train rows), examples/s produced per attacker, server utilization (time computing /
(computing + waiting)), bytes on the wire per example (pushes only, and pushes + parameter
refreshes), staleness.

Time to target: the single-process trainer and the asynchronous examples mode with the same recipe,
one after the other in one invocation, each stopping when periodic evaluation (on a test slice)
reaches the target; then ``psadv eval --save`` (PGD-50x10 on the full test set) confirms each final model
and leaves the result in RUN/final_eval.json for ``psadv scaling-report``:

    python scripts/bench_mpi.py --data-dir ../shared/data/mnist --target 0.89 --ranks 1,3 -- \\
        --epochs 15 --attack-steps 10 --optimizer adam --lr 5e-3 --lr-schedule onecycle --eval-every 500

Arguments after ``--`` are passed to every ``psadv train`` (the recipe). The runs are launched one
after another by psadv's sweep launcher (psadv/report/sweep.py) into OUT/throughput or OUT/target,
named single, w1, w2, … by attackers. Needs a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from psadv.errors import PsadvError
from psadv.report import Sweep, load_run, run_sweep
from psadv.report.analysis import throughput

DEFAULT_RECIPE = ["--batch-size", "100", "--attack-steps", "10", "--eval-every", "0", "--eval-examples", "200",
                  "--eval-steps", "5", "--log-every", "20"]


def run_all(ranks: list[int], runs_dir: Path, data_dir: str, args: list[str]) -> list[dict]:
    """One run per world size, one after another, by psadv's sweep launcher into ``runs_dir``."""
    # push None: the recipe after -- may set --push itself (psadv's default is sync)
    sweep = Sweep(workers=[n - 1 for n in ranks], push=[None], launcher="mpiexec -n {n}", data_dir=data_dir,
                  train_args=args)
    try:
        jobs = run_sweep(sweep, runs_dir, overwrite=True, echo=lambda line: print(line, flush=True)).jobs
    except PsadvError as exc:
        raise SystemExit(f"bench_mpi: {exc}") from None
    failed = [job for job in jobs if job["returncode"] != 0]
    if failed:
        job = failed[0]
        raise SystemExit(f"{job['name']} failed (rc {job['returncode']}):\n{Path(job['log']).read_text()[-4000:]}")
    return [describe(job) for job in jobs]


def describe(job: dict) -> dict:
    ranks = job["attackers"] + 1
    run_dir = Path(job["run_dir"])
    run = load_run(run_dir)
    summary, train = run.summary, run.of_kind("train")
    # the scaling report's steady throughput, so a benchmark's number and a report's are one number
    rate = throughput(run).get("examples_per_s")
    out = {"ranks": ranks, "attackers": ranks - 1, "run_dir": str(run_dir), "wall_s": job["seconds"],
           "version": summary["version"], "examples_seen": summary["examples_seen"],
           "elapsed_s": summary["elapsed"],
           "examples_per_s": rate["value"] if rate else None,
           "time_to_target_s": summary.get("time_to_target"), "last_eval": summary.get("last_eval"),
           "stop_reason": summary["stop_reason"]}
    if ranks > 1:
        produced = {}
        for r in train[1:]:
            for k, v in r.get("produced_per_s", {}).items():
                produced.setdefault(k, []).append(v)
        out.update(produced_per_s={k: round(sum(v) / len(v), 1) for k, v in produced.items()},
                   utilization=summary["utilization"], server_seconds=summary["server_seconds"],
                   push_bytes_per_example=summary["push_bytes_per_example"],
                   wire_bytes_per_example=summary["wire_bytes_per_example"],
                   staleness_mean=summary["staleness_mean"], staleness_max=summary["staleness_max"],
                   rejected_fraction=summary["rejected_fraction"])
    return out


def confirm(run_dir: Path, data_dir: str, examples: int | None) -> dict:
    cmd = [sys.executable, "-m", "psadv.cli", "eval", str(run_dir), "--attack", "pgd", "--steps", "50", "--restarts", "10",
           "--data-dir", data_dir, "--json", "--save", "--no-progress"]
    if examples:
        cmd += ["--examples", str(examples)]
    print("$", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    argv = sys.argv[1:]
    recipe = argv[argv.index("--") + 1:] if "--" in argv else None
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", default="runs/bench-mpi", help="directory for the run directories and results.json [runs/bench-mpi]")
    p.add_argument("--ranks", default="1,2,3", help="world sizes to run (1 = single-process trainer)")
    p.add_argument("--seconds", type=float, default=40.0, help="time budget of each throughput run")
    p.add_argument("--target", type=float, default=0.0, help="time-to-target mode: robust accuracy to reach")
    p.add_argument("--target-timeout", type=float, default=4 * 3600, help="time budget of each target run")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process for every run (0 = psadv's automatic split of the cores)")
    p.add_argument("--confirm-examples", type=int, default=0, help="test examples for psadv eval (0 = all)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # every run (launched by psadv's sweep) inherits this environment
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.pop("PSADV_FAULT", None)
    ranks = [int(r) for r in a.ranks.split(",")]
    if a.threads:
        recipe = (recipe or DEFAULT_RECIPE) + ["--threads", str(a.threads)]
    results = {"host": os.uname().nodename, "cores": os.cpu_count(), "recipe": recipe or DEFAULT_RECIPE, "runs": []}

    if a.target:
        # a target is noticed by periodic evaluation, which the default recipe's throughput runs leave off
        target_recipe = recipe or [("500" if f == "0" and DEFAULT_RECIPE[i - 1] == "--eval-every" else f)
                                   for i, f in enumerate(DEFAULT_RECIPE)]
        base = target_recipe + ["--target-robust-acc", str(a.target), "--time-budget", str(a.target_timeout)]
        for r in run_all(ranks, out / "target", a.data_dir, base):
            r["confirm"] = confirm(Path(r["run_dir"]), a.data_dir, a.confirm_examples or None)
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
        by = {r["ranks"]: r for r in results["runs"]}
        if 1 in by:
            for n, r in by.items():
                if n > 1 and r["time_to_target_s"] and by[1]["time_to_target_s"]:
                    r["speedup_vs_single"] = round(by[1]["time_to_target_s"] / r["time_to_target_s"], 3)
    else:
        base = (recipe or DEFAULT_RECIPE) + ["--time-budget", str(a.seconds)]
        for r in run_all(ranks, out / "throughput", a.data_dir, base):
            results["runs"].append(r)
            print(json.dumps(r), flush=True)

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(f"{'ranks':>5} {'attackers':>9} {'ex/s':>8} {'util':>6} {'push B/ex':>10} {'wire B/ex':>10} "
          f"{'tau mean':>8} {'to target':>10} {'confirmed robust':>16}")
    for r in results["runs"]:
        conf = r.get("confirm", {}).get("robust_acc")
        print(f"{r['ranks']:>5} {r['attackers']:>9} {r['examples_per_s'] or float('nan'):>8.1f} {r.get('utilization', float('nan')):>6.2f} "
              f"{r.get('push_bytes_per_example', float('nan')):>10.1f} {r.get('wire_bytes_per_example', float('nan')):>10.1f} "
              f"{r.get('staleness_mean') or float('nan'):>8.2f} {r['time_to_target_s'] or float('nan'):>10.1f} "
              f"{conf if conf is not None else float('nan'):>16.4f}")
        if "speedup_vs_single" in r:
            print(f"      time to target: single / async({r['attackers']} attackers) = {r['speedup_vs_single']}")
    print(f"results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
