#!/usr/bin/env python3
"""Train and evaluate a Fashion-MNIST model with the dataset's recipe (numbers for results/fashion-mnist.toml).

    python scripts/bench_fashion.py --data-dir ../shared/data --run-dir runs/bench-fashion [-- TRAIN FLAGS]

trains ``psadv train --dataset fashion-mnist`` (its recipe: ε = 0.1, otherwise the MNIST defaults:
mnist-small, PGD-10, Adam one-cycle) for 3 epochs on 1 thread into runs/bench-fashion where the
flags say nothing else, then evaluates the final checkpoint with ``psadv eval`` (PGD-50 with 10
restarts) on the first --examples test images, and prints one JSON object: the commands, their
wall-clock seconds, clean and robust accuracy. Every flag but --examples is ``psadv train``'s, read
by its own parser (before or after ``--``, which is optional).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from psadv.bench.child import run_child
from psadv.rundir import CONFIG

PSADV = [sys.executable, "-m", "psadv.cli"]
# the benchmark's own defaults, by psadv train's parameter, for what the flags leave out
TRAIN_DEFAULTS = (("dataset", ["--dataset", "fashion-mnist"]), ("epochs", ["--epochs", "3"]),
                  ("threads", ["--threads", "1"]), ("run_dir", ["--run-dir", "runs/bench-fashion"]),
                  ("progress", ["--no-progress"]))


def timed(cmd: list[str]) -> tuple[float, str]:
    """Run ``cmd`` (its stderr passes through); wall-clock seconds and stdout; exit on failure."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    res = run_child(cmd, stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        sys.exit(res.returncode)
    return time.perf_counter() - start, res.stdout


def train_context(train_args: list[str]):
    """``psadv train``'s click context for ``train_args``: its options as the command reads them (a
    usage error exits 2, as the command would, before anything runs)."""
    import click

    from psadv.cli import cli

    try:
        return cli.commands["train"].make_context("train", list(train_args))
    except click.ClickException as exc:
        print(f"bench_fashion.py: psadv train: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)


def train_command(train_args: list[str]) -> tuple[list[str], dict]:
    """The ``psadv train`` command of ``train_args`` with the benchmark's defaults for what they leave
    out, and its options."""
    from click.core import ParameterSource

    given = train_context(train_args)
    defaults = [flag for name, flags in TRAIN_DEFAULTS
                if given.get_parameter_source(name) is not ParameterSource.COMMANDLINE for flag in flags]
    args = [*defaults, *train_args]
    return [*PSADV, "train", *args], train_context(args).params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     epilog="every other flag goes to psadv train (see psadv train --help)")
    parser.add_argument("--examples", type=int, default=1000, help="test images for the final evaluation")
    args, extra = parser.parse_known_args(argv)
    if "--" in extra:
        extra.remove("--")
    train, options = train_command(extra)
    evaluate = [*PSADV, "eval", options["run_dir"], "--attack", "pgd", "--examples", str(args.examples),
                "--threads", str(options["threads"]), "--json", "--no-progress"]
    train_s, _ = timed(train)
    eval_s, out = timed(evaluate)
    result = json.loads(out)
    config = json.loads((Path(options["run_dir"]) / CONFIG).read_text())["config"]
    summary = {"train_cmd": " ".join(train[2:]), "eval_cmd": " ".join(evaluate[2:]), "eps": config["eps"],
               "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1),
               "clean_acc": result["clean_acc"], "robust_acc": result["robust_acc"], "attack": result["attack"],
               "examples": args.examples, "version": result["version"]}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
