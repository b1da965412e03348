"""psadv's evaluation attacks next to torchattacks' independent implementations.

Runs each psadv attack and its torchattacks counterpart (APGD loss='ce', APGDT, Square, and FAB
multi-targeted when psadv.attacks.fab exists) on the same test images with the same weights, and
prints robust accuracy and seconds side by side (one JSON object with --json). Targets: robust
accuracies within 0.5 point, psadv at least as fast. With --repeats N each pair runs N times, the
order alternating (psadv first, then torchattacks first, ...) so that a load that comes and goes on
a shared machine does not favour one side; the seconds reported are the medians, wall-clock and
CPU (the process's CPU time: with --threads 1 the work done, less swayed by other jobs). The
model's work is counted too, free of noise: examples forwarded, and how many of them with autograd
on (a graph built).

    python scripts/attack_check.py RUN_DIR --examples 100 --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time

import torch


def load(run: str):
    from psadv.checkpoint import open_checkpoint

    ckpt, model = open_checkpoint(run)  # psadv's registry models: a factory the file names is not run
    return model, ckpt.config


def pairs(args, norm: str, eps: float):
    """(name, psadv attack, torchattacks attack factory) for each attack to compare."""
    import torchattacks

    from psadv.attacks.suite import EvalSettings, build_cascade

    settings = EvalSettings(norm=norm, eps=eps, apgd_steps=args.steps, targets=args.targets, queries=args.queries)
    ta_norm = {"linf": "Linf", "l2": "L2"}[norm]
    n_classes = args.targets + 1
    rows = [("apgd-ce", lambda m: torchattacks.APGD(m, norm=ta_norm, eps=eps, steps=args.steps, loss="ce",
                                                    n_restarts=1, seed=args.seed)),
            ("apgd-t", lambda m: torchattacks.APGDT(m, norm=ta_norm, eps=eps, steps=args.steps, n_restarts=1,
                                                    n_classes=n_classes, seed=args.seed)),
            ("square", lambda m: torchattacks.Square(m, norm=ta_norm, eps=eps, n_queries=args.queries, n_restarts=1,
                                                     p_init=0.8, seed=args.seed))]
    if importlib.util.find_spec("psadv.attacks.fab") is not None:
        rows.append(("fab-t", lambda m: torchattacks.FAB(m, norm=ta_norm, eps=eps, steps=args.steps, n_restarts=1,
                                                         multi_targeted=True, n_classes=n_classes, seed=args.seed)))
    return [(name, build_cascade(name, settings)[0], make) for name, make in rows]


def robust_acc(model, x_adv, y) -> float:
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run directory or checkpoint of a psadv model")
    p.add_argument("--examples", type=int, default=200, help="first N test images")
    p.add_argument("--eps", type=float, default=None, help="ε (default: the checkpoint's)")
    p.add_argument("--norm", choices=["linf", "l2"], default=None, help="threat model (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=100, help="APGD / FAB iterations")
    p.add_argument("--targets", type=int, default=9, help="target classes of the targeted attacks")
    p.add_argument("--queries", type=int, default=5000, help="Square queries")
    p.add_argument("--only", default="", help="comma-separated attack names to run (default: all)")
    p.add_argument("--data-dir", default=None, help="dataset directory (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="runs of each side, order alternating; median seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")

    from psadv.data import load_dataset

    torch.set_num_threads(args.threads)
    model, cfg = load(args.run)
    norm, eps = args.norm or cfg["norm"], cfg["eps"] if args.eps is None else args.eps
    test = load_dataset(cfg["dataset"], "test", args.data_dir or cfg.get("data_dir") or None)
    x, y = torch.tensor(test.x[:args.examples]), torch.tensor(test.y[:args.examples])
    only = set(filter(None, args.only.split(",")))
    work: dict[str, int] = {}

    def count(_module, inputs):
        work["rows"] = work.get("rows", 0) + len(inputs[0])
        work["grad_rows"] = work.get("grad_rows", 0) + (len(inputs[0]) if torch.is_grad_enabled() else 0)

    model.register_forward_pre_hook(count)
    rows = []
    for name, ours, make_theirs in pairs(args, norm, eps):
        if only and name not in only:
            continue
        row = {"attack": name, "describe": ours.describe()}
        for side in ("psadv", "torchattacks"):
            row[f"{side}_runs"], row[f"{side}_cpu_runs"] = [], []
        for r in range(args.repeats):
            sides = ["psadv", "torchattacks"] if r % 2 == 0 else ["torchattacks", "psadv"]
            for side in sides:
                work.clear()
                started, cpu_started = time.perf_counter(), time.process_time()
                if side == "psadv":
                    adv = ours.run(model, x, y, torch.Generator().manual_seed(args.seed))
                else:
                    adv = make_theirs(model)(x, y)
                row[f"{side}_runs"].append(round(time.perf_counter() - started, 2))
                row[f"{side}_cpu_runs"].append(round(time.process_time() - cpu_started, 2))
                if r == 0:  # both sides are seeded: every repeat computes the same points
                    row[f"{side}_forwarded"], row[f"{side}_autograd_on"] = work["rows"], work["grad_rows"]
                    row[f"{side}_robust_acc"] = robust_acc(model, adv, y)
                    if side == "psadv":
                        row["psadv_in_ball"] = _in_ball(adv, x, norm, eps)
        for side in ("psadv", "torchattacks"):
            row[f"{side}_seconds"] = round(statistics.median(row[f"{side}_runs"]), 2)
            row[f"{side}_cpu_seconds"] = round(statistics.median(row[f"{side}_cpu_runs"]), 2)
        row["points_apart"] = round(100 * (row["psadv_robust_acc"] - row["torchattacks_robust_acc"]), 2)
        rows.append(row)
        if not args.json:
            print(f"{name:8s} psadv {row['psadv_robust_acc']:.2%} in {row['psadv_seconds']:7.1f}s   "
                  f"torchattacks {row['torchattacks_robust_acc']:.2%} in {row['torchattacks_seconds']:7.1f}s   "
                  f"({row['points_apart']:+.2f} points)"
                  f"   CPU {row['psadv_cpu_seconds']:.1f}s vs {row['torchattacks_cpu_seconds']:.1f}s"
                  f"   forwarded {row['psadv_forwarded']} ({row['psadv_autograd_on']} with autograd on) vs "
                  f"{row['torchattacks_forwarded']} ({row['torchattacks_autograd_on']})"
                  + (f"   runs {row['psadv_runs']} vs {row['torchattacks_runs']}" if args.repeats > 1 else ""),
                  flush=True)
    clean = robust_acc(model, x, y)
    if args.json:
        print(json.dumps({"examples": len(y), "norm": norm, "eps": eps, "clean_acc": clean, "rows": rows}))
    else:
        print(f"{len(y)} test images, {norm} eps={eps:g}, clean {clean:.2%}")
    return 0 if all(r["psadv_in_ball"] for r in rows) else 1


def _in_ball(adv, x, norm, eps) -> bool:
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    return bool((size <= eps * (1 + 1e-5) + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1) and math.isfinite(
        float(size.max()))


if __name__ == "__main__":
    sys.exit(main())
