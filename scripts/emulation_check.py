#!/usr/bin/env python
"""Does ``--emulate-attackers N`` reproduce the real server's staleness? (A benchmark, not a test.)

For each N it trains the same recipe twice with the same version budget, once for real
(``mpiexec -n N+1 psadv train``: a server and N attackers) and once emulated in one process
(``psadv train --emulate-attackers N``), and compares the staleness histograms the two servers
recorded (mean, support) and, with ``--seeds``, the robust accuracy of the final models:

    python scripts/emulation_check.py --data-dir ../shared/data/mnist --attackers 1,2,3 --steps 600
    python scripts/emulation_check.py --data-dir ../shared/data/mnist --attackers 1,2 --steps 3000 \\
        --seeds 0,1 --out runs/emulation-accuracy -- --attack-steps 5

Agreement means: mean τ within 15% and the same support (min and max τ within one version).

``--memory`` instead measures what the emulation keeps: the most parameter snapshots alive at once
(and their MiB) for 64 attackers of mnist-small and 8 of preact-resnet18, no training.
Arguments after ``--`` go to every ``psadv train``. Writes OUT/emulation_check.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

from psadv.bench.child import run_child
from psadv.rundir import SUMMARY

PSADV = [sys.executable, "-m", "psadv.cli"]
RECIPE = ["--eval-every", "0", "--eval-examples", "1000", "--log-every", "50", "--no-progress"]


def histogram(summary: dict) -> dict[int, int]:
    return {int(k): v for k, v in summary["staleness_histogram"].items() if not k.startswith(">")}


def stats(summary: dict) -> dict:
    hist = histogram(summary)
    last = summary.get("last_eval") or {}
    return {"mean": summary["staleness_mean"], "min": min(hist), "max": max(hist), "histogram": hist,
            "rejected": summary["rejected_stale"], "clean": last.get("clean_acc"), "robust": last.get("robust_acc"),
            "seconds": summary["elapsed"]}


def train(cmd: list[str], run_dir: Path) -> dict:
    if not (run_dir / SUMMARY).exists():
        print("+", " ".join(cmd), flush=True)
        if run_child(cmd).returncode != 0:
            raise SystemExit(f"emulation_check: {shlex.join(cmd)} failed")
    return json.loads((run_dir / SUMMARY).read_text())


def snapshot_memory() -> None:
    import resource
    from types import SimpleNamespace

    from psadv.emulate import Emulation
    from psadv.models import build_model, model_args_for

    for name, shape, n in (("mnist-small", (1, 28, 28), 64), ("preact-resnet18", (3, 32, 32), 8)):
        args = model_args_for(name, shape, 10)
        emulation = Emulation(SimpleNamespace(emulate_attackers=n, refresh_every=4, max_staleness=1000),
                              build_model(name, **args), build_model(name, **args), 0)
        peak = 0
        for version in range(1, 40 * n):
            emulation.attack_model_for_next_batch(version - 1)
            emulation.applied(version)
            peak = max(peak, len(emulation.store.snapshots))
        state = next(iter(emulation.store.snapshots.values())).numel() * 4 / 2**20
        print(f"{name}: {n} attackers, refresh every 4: at most {peak} snapshots alive, {peak * state:.1f} MiB "
              f"(one model state {state:.1f} MiB); max RSS of this process "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", action="store_true", help="measure the snapshots' memory instead")
    parser.add_argument("--data-dir")
    parser.add_argument("--attackers", default="1,2,3")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="runs/emulation-check")
    args = parser.parse_args(argv)
    if args.memory:
        snapshot_memory()
        return
    if not args.data_dir:
        parser.error("--data-dir is required")
    out = Path(args.out)
    mpiexec = shutil.which("mpiexec") or "mpiexec"
    results = []
    for n in [int(v) for v in args.attackers.split(",")]:
        for seed in [int(v) for v in args.seeds.split(",")]:
            common = ["train", "--data-dir", args.data_dir, "--steps", str(args.steps), "--seed", str(seed),
                      "--threads", "1", *RECIPE, *extra]
            real_dir, emu_dir = out / f"real-n{n}-s{seed}", out / f"emulated-n{n}-s{seed}"
            real = stats(train([mpiexec, "-n", str(n + 1), *PSADV, *common, "--run-dir", str(real_dir)], real_dir))
            emu = stats(train([*PSADV, *common, "--emulate-attackers", str(n), "--run-dir", str(emu_dir)], emu_dir))
            agree = (abs(emu["mean"] - real["mean"]) <= 0.15 * real["mean"] and abs(emu["min"] - real["min"]) <= 1
                     and abs(emu["max"] - real["max"]) <= 1)
            results.append({"attackers": n, "seed": seed, "real": real, "emulated": emu, "agree": agree})
            print(json.dumps(results[-1]), flush=True)
    (out / "emulation_check.json").write_text(json.dumps(results, indent=1))
    lines = [f"`python scripts/emulation_check.py --attackers {args.attackers} --steps {args.steps} "
             f"--seeds {args.seeds}" + (" -- " + " ".join(extra) if extra else "") + "`", "",
             "| attackers | seed | real mean τ (min–max) | emulated mean τ (min–max) | agree | "
             "real clean / robust | emulated clean / robust |", "|---|---|---|---|---|---|---|"]
    for r in results:
        real, emu = r["real"], r["emulated"]
        acc = lambda s: f"{s['clean']:.1%} / {s['robust']:.1%}" if s["robust"] is not None else "–"  # noqa: E731
        lines.append(f"| {r['attackers']} | {r['seed']} | {real['mean']:.2f} ({real['min']}–{real['max']}) | "
                     f"{emu['mean']:.2f} ({emu['min']}–{emu['max']}) | {'yes' if r['agree'] else 'no'} | "
                     f"{acc(real)} | {acc(emu)} |")
    (out / "emulation_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
