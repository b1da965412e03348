#!/usr/bin/env python3
"""Benchmarks of the single-process core (numbers for records in results/; not a timed test).

    python scripts/bench_core.py throughput --data-dir ../shared/data
        examples/s of the attack (FGSM, FGSM-RS, PGD-k for k = 1, 2, 5, 10, 40) and of the training
        step, plain and with GradAlign's regulariser (--grad-align)

    python scripts/bench_core.py robust --data-dir ../shared/data --run-dir runs/bench-robust
        trains the study recipe (mnist-small, PGD adversarial training at ε=0.3), then evaluates
        the final checkpoint with PGD-50 x 10 restarts on the full 10,000-image test set and
        reports wall-clock minutes, clean and robust accuracy

    python scripts/bench_core.py arithmetic --data-dir ../shared/data
        examples/s of one adversarial training version (PGD-k, then the training step) as psadv runs
        it (eager, NCHW, float32) side by side with channels_last, torch.compile, bfloat16 autocast
        and bfloat16 with channels_last (--precision bf16), the variants taking turns so that the
        VM's drift reaches them alike; torch.compile's first-call (compile) seconds reported apart

    python scripts/bench_core.py madry --data-dir ../shared/data
        the per-version cost of Madry et al.'s original MNIST recipe (mnist-madry, PGD-40 of step
        0.01 at ε=0.3 from a random start, Adam 1e-4, batch 50), measured on real training steps,
        and its 100,000 versions' total on this machine, predicted from it

Each command prints one JSON object (and writes it with --out). Run on a quiet machine: a
second busy process on the same cores distorts every number.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from psadv.attacks import Attack, perturb
from psadv.data import load_dataset
from psadv.devices import autocast, set_threads
from psadv.gradalign import training_loss
from psadv.models import build_model

# The recipe of the first time-to-robustness measurements (flags of `psadv train`).
RECIPE = ["--model", "mnist-small", "--eps", "0.3", "--attack", "pgd", "--attack-steps", "10",
          "--eps-ramp", "0.2", "--optimizer", "adam", "--lr", "5e-3", "--lr-schedule", "onecycle",
          "--batch-size", "100", "--epochs", "15", "--eval-every", "1000", "--eval-examples", "1000"]


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def rate(fn, examples_per_call: int, seconds: float) -> float:
    fn()  # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls * examples_per_call / (time.perf_counter() - start)


def throughput(args) -> dict:
    set_threads(args.threads)
    data = load_dataset("mnist", "train", args.data_dir)
    x, y = torch.tensor(data.x[:args.batch_size]), torch.tensor(data.y[:args.batch_size])
    model = build_model(args.model, in_channels=1, num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step(grad_align: float = 0.0):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        # the step on clean x: the cost is the same for adversarial examples
        training_loss(model, x, y, clean=x, weight=grad_align, eps=0.3)[0].backward()
        optimizer.step()

    out = {"model": args.model, "batch_size": args.batch_size, "machine": machine(),
           "train_step_examples_per_s": round(rate(train_step, len(y), args.seconds), 1),
           # GradAlign's regulariser is part of the step: two more gradients, one differentiated through
           "grad_align_train_step_examples_per_s": round(rate(lambda: train_step(1.0), len(y), args.seconds), 1),
           "attack_examples_per_s": {}}
    specs = [("fgsm", Attack(name="fgsm", eps=0.3)), ("fgsm-rs", Attack(name="fgsm-rs", eps=0.3))] + [
        (f"pgd-{k}", Attack(name="pgd", eps=0.3, steps=k)) for k in (1, 2, 5, 10, 40)]
    for name, attack in specs:
        out["attack_examples_per_s"][name] = round(rate(lambda: perturb(model, x, y, attack), len(y), args.seconds), 1)
    # Adversarial training throughput = attack then step, per example.
    def combined(attack_rate: float, step_rate: float) -> float:
        return round(1.0 / (1.0 / attack_rate + 1.0 / step_rate), 1)

    out["adversarial_training_examples_per_s"] = {
        name: combined(r, out["train_step_examples_per_s"]) for name, r in out["attack_examples_per_s"].items()}
    out["adversarial_training_examples_per_s"]["fgsm+gradalign"] = combined(
        out["attack_examples_per_s"]["fgsm"], out["grad_align_train_step_examples_per_s"])
    return out


def arithmetic(args) -> dict:
    data = load_dataset("mnist", "train", args.data_dir)
    x, y = torch.tensor(data.x[:args.batch_size]), torch.tensor(data.y[:args.batch_size])
    attack = Attack(name="pgd", eps=0.3, steps=args.attack_steps)

    def variant(memory_format: torch.memory_format, compiled: bool, bf16: bool = False):
        torch.manual_seed(0)
        model = build_model(args.model, in_channels=1, num_classes=10).to(memory_format=memory_format)
        net = torch.compile(model) if compiled else model
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        inputs = x.contiguous(memory_format=memory_format)

        def version():  # as psadv's trainer runs it: the attack and the step's forward pass in the autocast
            with autocast("bf16" if bf16 else "fp32", torch.device("cpu")):
                x_adv = perturb(net, inputs, y, attack)
                model.train()
                optimizer.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(net(x_adv), y)
            loss.backward()
            optimizer.step()
        return version

    # bf16+channels_last is --precision bf16; bf16 alone shows what the layout adds to it
    settings = {"eager": (torch.contiguous_format, False), "channels_last": (torch.channels_last, False),
                "compile": (torch.contiguous_format, True), "bf16": (torch.contiguous_format, False, True),
                "bf16+channels_last": (torch.channels_last, False, True)}
    names = [name.strip() for name in args.variants.split(",")]
    if "eager" not in names or not set(names) <= set(settings):
        raise SystemExit(f"bench_core: --variants takes eager and any of {', '.join(settings)}")
    variants = {name: variant(*settings[name]) for name in names}
    first_call = {}
    for name, version in variants.items():  # the first call compiles (torch.compile) or warms up
        start = time.perf_counter()
        version()
        version()  # eval and train mode: a compiled model is specialised on each
        first_call[name] = round(time.perf_counter() - start, 2)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, version in variants.items():
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                version()
                calls += 1
            rates[name].append(calls * len(y) / (time.perf_counter() - start))
    medians = {name: sorted(r)[len(r) // 2] for name, r in rates.items()}
    return {"model": args.model, "batch_size": args.batch_size, "attack": f"PGD-{args.attack_steps}",
            "machine": machine(), "rounds": args.rounds, "seconds_per_round": args.seconds,
            "first_two_calls_s": first_call,
            "examples_per_s_median": {name: round(r, 1) for name, r in medians.items()},
            "examples_per_s_rounds": {name: [round(v, 1) for v in r] for name, r in rates.items()},
            "ratio_to_eager": {name: round(r / medians["eager"], 3) for name, r in medians.items()}}


# Madry et al. 2018, MNIST challenge (github.com/MadryLab/mnist_challenge, config.json).
MADRY = {"model": "mnist-madry", "eps": 0.3, "steps": 40, "step_size": 0.01, "lr": 1e-4, "batch_size": 50,
         "versions": 100_000}


def madry(args) -> dict:
    data = load_dataset("mnist", "train", args.data_dir)
    model = build_model(MADRY["model"], in_channels=1, num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=MADRY["lr"])
    attack = Attack(name="pgd", eps=MADRY["eps"], steps=MADRY["steps"], step_size=MADRY["step_size"])
    b, batches = MADRY["batch_size"], len(data.x) // MADRY["batch_size"]

    def version(i: int) -> None:  # what psadv's trainer does per version: attack, then one step on the result
        x = torch.tensor(data.x[i % batches * b:(i % batches + 1) * b])
        y = torch.tensor(data.y[i % batches * b:(i % batches + 1) * b])
        x_adv = perturb(model, x, y, attack)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x_adv), y).backward()
        optimizer.step()

    version(0)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        version(done + 1)
        done += 1
    per_version = (time.perf_counter() - start) / done
    return {"recipe": MADRY, "machine": machine(), "versions_timed": done,
            "seconds_per_version": {"value": round(per_version, 4), "measured": True},
            "total_hours": {"value": round(per_version * MADRY["versions"] / 3600, 2), "measured": False,
                            "predicted_from": "seconds_per_version x versions"}}


def robust(args) -> dict:
    run_dir = Path(args.run_dir)
    cmd = ["psadv", "train", *RECIPE, "--data-dir", args.data_dir, "--run-dir", str(run_dir), "--threads",
           str(args.threads), "--no-progress", *args.extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    train_wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    eval_cmd = ["psadv", "eval", str(run_dir), "--attack", "pgd", "--steps", "50", "--restarts", "10", "--json", "--no-progress",
                "--data-dir", args.data_dir]
    start = time.perf_counter()
    result = json.loads(subprocess.run(eval_cmd, check=True, capture_output=True, text=True).stdout)
    return {"command": " ".join(cmd), "eval_command": " ".join(eval_cmd), "machine": machine(),
            "train_minutes": round(summary["elapsed"] / 60, 2), "train_wall_minutes": round(train_wall / 60, 2),
            "eval_minutes": round((time.perf_counter() - start) / 60, 2), "versions": summary["version"],
            "clean_acc": result["clean_acc"], "robust_acc": result["robust_acc"], "attack": result["attack"],
            "test_examples": result["examples"], "target_met": result["robust_acc"] >= 0.89 and result["clean_acc"] >= 0.98}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("throughput", "robust", "madry", "arithmetic"):
        p = sub.add_parser(name)
        p.add_argument("--data-dir", default="../shared/data")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
        p.add_argument("--out", help="also write the JSON here")
    sub.choices["throughput"].add_argument("--model", default="mnist-small")
    sub.choices["throughput"].add_argument("--batch-size", type=int, default=100)
    sub.choices["throughput"].add_argument("--seconds", type=float, default=5.0, help="seconds per measurement")
    sub.choices["arithmetic"].add_argument("--model", default="mnist-small")
    sub.choices["arithmetic"].add_argument("--batch-size", type=int, default=100)
    sub.choices["arithmetic"].add_argument("--attack-steps", type=int, default=5)
    sub.choices["arithmetic"].add_argument("--seconds", type=float, default=5.0, help="seconds per variant and round")
    sub.choices["arithmetic"].add_argument("--variants", default="eager,channels_last,compile,bf16,bf16+channels_last",
                                           help="the variants to run, eager (the baseline of the ratios) among them")
    sub.choices["arithmetic"].add_argument("--rounds", type=int, default=5, help="rounds; each variant once per round")
    sub.choices["madry"].add_argument("--seconds", type=float, default=60.0, help="seconds of training to time")
    sub.choices["robust"].add_argument("--run-dir", default="runs/bench-robust")
    sub.choices["robust"].add_argument("extra", nargs="*", help="more `psadv train` flags (after --)")
    args = parser.parse_args()
    set_threads(args.threads)
    result = {"throughput": throughput, "robust": robust, "madry": madry, "arithmetic": arithmetic}[args.what](args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
