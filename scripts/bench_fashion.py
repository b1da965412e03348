#!/usr/bin/env python3
"""Train and evaluate a Fashion-MNIST model with the dataset's recipe (numbers for results/fashion-mnist.toml).

    python scripts/bench_fashion.py --data-dir ../shared/data --run-dir runs/bench-fashion [-- TRAIN FLAGS]

trains ``psadv train --dataset fashion-mnist`` (its recipe: ε = 0.1, otherwise the MNIST defaults:
mnist-small, PGD-10, Adam one-cycle; the flags after ``--`` change it) for --epochs epochs, then
evaluates the final checkpoint with ``psadv eval`` (PGD-50 with 10 restarts) on the first
--examples test images, and prints one JSON object: the commands, their wall-clock seconds, clean
and robust accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from psadv.bench.child import run_child

PSADV = [sys.executable, "-m", "psadv.cli"]


def timed(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd`` (its stderr passes through); wall-clock seconds and stdout; exit on failure."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    res = run_child(cmd, stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        sys.exit(res.returncode)
    return time.perf_counter() - start, res.stdout


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="directory holding fashion-mnist/ (or its files)")
    parser.add_argument("--run-dir", default="runs/bench-fashion")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--examples", type=int, default=1000, help="test images for the final evaluation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="psadv train flags after --, e.g. -- --attack fgsm-rs --reuse-perturbations")
    args = parser.parse_args(argv)
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    train = [*PSADV, "train", "--dataset", "fashion-mnist", "--data-dir", args.data_dir, "--run-dir", args.run_dir,
             "--epochs", str(args.epochs), "--threads", str(args.threads), "--no-progress",
             *(["--overwrite"] if args.overwrite else []), *extra]
    evaluate = [*PSADV, "eval", args.run_dir, "--attack", "pgd", "--examples", str(args.examples),
                "--threads", str(args.threads), "--json", "--no-progress"]
    train_s, _ = timed(train)
    eval_s, out = timed(evaluate)
    result = json.loads(out)
    config = json.loads((Path(args.run_dir) / "config.json").read_text())["config"]
    summary = {"train_cmd": " ".join(train[2:]), "eval_cmd": " ".join(evaluate[2:]), "eps": config["eps"],
               "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
               "clean_acc": result["clean_acc"], "robust_acc": result["robust_acc"], "attack": result["attack"],
               "examples": args.examples, "version": result["version"]}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
