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

    python scripts/bench_core.py roofline --data-dir ../shared/data --threads 2
        a roofline of the training step: the machine's measured matmul peak (float32, bfloat16) beside
        the achieved GFLOP/s (FLOPs counted by torch's flop counter) of each part of a version (data,
        attack, training pass, optimizer) for PGD-5 and PGD-40 at batch sizes 50-2,000; a profile of
        where a version's time goes (convolutions and matmuls, dtype casts, allocations, other ops,
        Python and dispatch outside any op); and the real loop's examples/s from short `psadv train`
        runs, whose difference from the parts is the loop's bookkeeping

    python scripts/bench_core.py phase --data-dir ../shared/data --threads 2 [--baseline-src DIR]
        the phase-form input gradient (psadv/layers.py): torch's input-gradient kernel against the
        phase form for the convolutions of the built-in models (float32 and bfloat16, NCHW and
        channels-last, with the relative difference); a training version with mnist-small's first
        convolution in the phase form and in torch's (alternating rounds); and `psadv train` itself,
        whole and with either part of the change taken out (the phase rule off; the attacks'
        parameters not frozen), and from an older checkout (--baseline-src, alone and with the
        passive OpenMP wait psadv had before results/openmp-wait.toml), in a seeded shuffled order
        each round; --parts picks among kernels, versions, loops. The script leaves OpenMP's wait
        as the caller set it; GOMP_SPINCOUNT=10000 KMP_BLOCKTIME=0 before it is psadv's own

Each command prints one JSON object (and writes it with --out). Run on a quiet machine: a
second busy process on the same cores distorts every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from psadv import schedules
from psadv.attacks import Attack, perturb
from psadv.config import Config
from psadv.data import load_dataset
from psadv.devices import auto_precision, autocast, set_threads, training_layout
from psadv.gradalign import training_loss
from psadv.models import build_model
from psadv.rundir import METRICS, SUMMARY

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
                "bf16+channels_last": (torch.channels_last, False, True),
                "bf16+channels_last+compile": (torch.channels_last, True, True)}
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
    summary = json.loads((run_dir / SUMMARY).read_text())
    eval_cmd = ["psadv", "eval", str(run_dir), "--attack", "pgd", "--steps", "50", "--restarts", "10", "--json", "--no-progress",
                "--data-dir", args.data_dir]
    start = time.perf_counter()
    result = json.loads(subprocess.run(eval_cmd, check=True, capture_output=True, text=True).stdout)
    return {"command": " ".join(cmd), "eval_command": " ".join(eval_cmd), "machine": machine(),
            "train_minutes": round(summary["elapsed"] / 60, 2), "train_wall_minutes": round(train_wall / 60, 2),
            "eval_minutes": round((time.perf_counter() - start) / 60, 2), "versions": summary["version"],
            "clean_acc": result["clean_acc"], "robust_acc": result["robust_acc"], "attack": result["attack"],
            "test_examples": result["examples"], "target_met": result["robust_acc"] >= 0.89 and result["clean_acc"] >= 0.98}


# --- roofline ------------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, n: int, seconds: float) -> float:
    """GFLOP/s of an n × n matmul in ``dtype`` with the threads set: the machine's practical peak."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        calls += 1
    return 2 * n ** 3 * calls / (time.perf_counter() - start) / 1e9


# Profiler op names by what they cost: arithmetic the roofline counts, and the overheads around it.
OP_KINDS = (("convolutions and matmuls", ("conv", "mm", "addmm", "linear", "matmul", "bmm")),
            ("dtype casts and copies", ("aten::to", "_to_copy", "copy_", "contiguous", "clone")),
            ("allocations", ("empty", "zeros", "ones", "full", "resize_")))


def op_kind(name: str) -> str:
    return next((kind for kind, keys in OP_KINDS if any(k in name for k in keys)), "other ops")


class StepParts:
    """One version of psadv's single-process loop taken apart: data, attack, training pass,
    optimizer, each timed on its own (the same calls the trainer makes, the same arithmetic:
    ``--precision``'s autocast and layout, the default recipe's attack at full ε)."""

    PARTS = ("data", "attack", "training pass", "optimizer")

    def __init__(self, x_train, y_train, *, steps: int, batch: int, precision: str, seed: int = 0):
        torch.manual_seed(seed)
        self.cfg = Config(attack_steps=steps, batch_size=batch)
        self.attack = schedules.AttackSchedule(self.cfg).at(1.0)
        self.precision, self.device = precision, torch.device("cpu")
        self.model = training_layout(build_model(self.cfg.model, in_channels=1, num_classes=10), precision)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr)
        self.x_train, self.y_train, self.batch = x_train, y_train, batch
        self.rng = np.random.default_rng(seed)

    def data(self):
        idx = torch.from_numpy(self.rng.integers(0, len(self.y_train), self.batch))
        self.x, self.y = self.x_train[idx], self.y_train[idx]

    def attack_part(self):
        with autocast(self.precision, self.device):
            self.x_adv = perturb(self.model, self.x, self.y, self.attack)

    def training_pass(self):
        self.model.train()
        with autocast(self.precision, self.device):
            loss = training_loss(self.model, self.x_adv, self.y, clean=self.x)[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.loss = loss.item()  # the trainer reads the loss (divergence check, metrics)

    def optimizer_part(self):
        self.optimizer.step()

    def calls(self):
        return dict(zip(self.PARTS, (self.data, self.attack_part, self.training_pass, self.optimizer_part)))

    def version(self):
        for call in self.calls().values():
            call()

    def attack_step_flops(self) -> int:
        """FLOPs of one attack step (forward, then the input's gradient), counted by torch's counter
        on the same model, batch and autocast; the counter cannot follow ``torch.autograd.grad``
        (which the attack calls), so the step is replayed with ``backward(inputs=[x])``, which
        computes the same input gradient and no weight gradients."""
        x = self.x.clone().requires_grad_(True)
        self.model.eval()
        with FlopCounterMode(display=False) as counter:
            with autocast(self.precision, self.device):
                loss = torch.nn.functional.cross_entropy(self.model(x), self.y)
            loss.backward(inputs=[x])
        return counter.get_total_flops()

    def flops(self) -> dict:
        """FLOPs per version of each part: the attack's as steps × restarts × one step's."""
        out = {}
        for name, call in self.calls().items():
            if name == "attack":
                call()
                out[name] = self.attack.steps * self.attack.restarts * self.attack_step_flops()
                continue
            with FlopCounterMode(display=False) as counter:
                call()
            out[name] = counter.get_total_flops()
        return out

    def seconds(self, budget: float) -> tuple[dict, int]:
        """Seconds per version of each part, over versions run for ``budget`` seconds."""
        self.version()  # warm-up
        spent, versions, start = dict.fromkeys(self.PARTS, 0.0), 0, time.perf_counter()
        while time.perf_counter() - start < budget or versions < 3:
            for name, call in self.calls().items():
                t = time.perf_counter()
                call()
                spent[name] += time.perf_counter() - t
            versions += 1
        return {k: v / versions for k, v in spent.items()}, versions

    def profile(self, versions: int = 10) -> dict:
        """Shares of a version's wall time by op kind (self CPU time of each op on the main thread)
        and outside every op (Python, dispatch, the profiler's own cost)."""
        self.version()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(versions):
                self.version()
            wall = time.perf_counter() - start
        kinds: dict[str, float] = {}
        ops = 0
        for event in prof.key_averages():
            kinds[op_kind(event.key)] = kinds.get(op_kind(event.key), 0.0) + event.self_cpu_time_total / 1e6
            ops += event.count
        inside = sum(kinds.values())
        shares = {k: round(v / wall, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
        shares["outside any op (Python, dispatch, profiler)"] = round(max(wall - inside, 0.0) / wall, 3)
        return {"versions": versions, "wall_ms_per_version_profiled": round(1e3 * wall / versions, 2),
                "ops_per_version": round(ops / versions), "share_of_wall": shares}


def real_loop(args, steps: int, batch: int) -> dict:
    """examples/s of `psadv train` itself (median over its train rows), the same recipe and threads."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["psadv", "train", "--data-dir", args.data_dir, "--time-budget", str(args.loop_seconds),
               "--eval-every", "0", "--checkpoint-every", "0", "--log-every", "10", "--no-progress",
               "--attack-steps", str(steps),
               "--batch-size", str(batch), "--threads", str(torch.get_num_threads()), "--seed", "0",
               "--eval-examples", "100", "--eval-attack", "pgd", "--eval-steps", "1", "--run-dir", f"{tmp}/run"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / METRICS).read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    rates = [(b["examples_seen"] - a["examples_seen"]) / (b["time"] - a["time"]) for a, b in zip(train, train[1:])
             if b["time"] > a["time"]]
    return {"command": " ".join(cmd).replace(tmp, "TMP"), "windows": len(rates),
            "examples_per_s_median": round(sorted(rates)[len(rates) // 2], 1) if rates else None}


def roofline(args) -> dict:
    precision = auto_precision(torch.device("cpu")) if args.precision == "auto" else args.precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peaks = {name: round(matmul_peak(d, args.peak_size, args.seconds), 1)
             for name, d in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    peak = peaks["bfloat16" if dtype == torch.bfloat16 else "float32"]
    data = load_dataset("mnist", "train", args.data_dir)
    x_train, y_train = torch.tensor(data.x), torch.tensor(data.y)
    model = build_model("mnist-small", in_channels=1, num_classes=10)
    with FlopCounterMode(display=False) as counter:
        model(x_train[:100])
    out = {"machine": machine(), "precision": precision, "matmul_size": args.peak_size,
           "matmul_peak_gflop_s": peaks, "peak_in_training_dtype": peak,
           "forward_mflop_per_example": round(counter.get_total_flops() / 100 / 1e6, 3), "recipes": []}
    for steps in (int(s) for s in args.attack_steps.split(",")):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            parts = StepParts(x_train, y_train, steps=steps, batch=batch, precision=precision)
            flops = parts.flops()
            seconds, versions = parts.seconds(args.seconds)
            total = sum(seconds.values())
            row = {"attack": f"PGD-{steps}", "batch_size": batch, "versions_timed": versions,
                   "examples_per_s_parts": round(batch / total, 1),
                   "gflop_s_whole_version": round(sum(flops.values()) / total / 1e9, 2),
                   "share_of_peak_whole_version": round(sum(flops.values()) / total / 1e9 / peak, 4),
                   "parts": {name: {"ms_per_version": round(1e3 * seconds[name], 3),
                                    "share_of_version": round(seconds[name] / total, 3),
                                    "gflop_per_version": round(flops[name] / 1e9, 4),
                                    "gflop_s": round(flops[name] / seconds[name] / 1e9, 2) if seconds[name] else None,
                                    "share_of_peak": round(flops[name] / seconds[name] / 1e9 / peak, 4)
                                    if seconds[name] else None}
                             for name in StepParts.PARTS}}
            if batch == args.profile_batch:
                row["profile"] = parts.profile()
            if batch == args.loop_batch and args.loop_seconds > 0:
                loop = real_loop(args, steps, batch)
                row["psadv_train"] = loop
                if loop["examples_per_s_median"]:
                    per_version = batch / loop["examples_per_s_median"]
                    row["bookkeeping_ms_per_version"] = round(1e3 * (per_version - total), 3)
                    row["bookkeeping_share"] = round((per_version - total) / per_version, 3)
            out["recipes"].append(row)
            print(json.dumps({k: row[k] for k in ("attack", "batch_size", "examples_per_s_parts",
                                                  "gflop_s_whole_version")}), file=sys.stderr, flush=True)
    return out


# --- the phase-form input gradient --------------------------------------------------------------
# (in channels, out channels, image side, kernel, stride, padding) of the built-in models' convolutions
PHASE_CONVS = {"mnist-small conv1": (1, 16, 28, 4, 2, 1), "mnist-small conv2": (16, 32, 14, 4, 2, 1),
               "mnist-madry conv1": (1, 32, 28, 5, 1, 2), "mnist-madry conv2": (32, 64, 14, 5, 1, 2),
               "preact-resnet18 stem": (3, 64, 32, 3, 1, 1), "3 channels, 4x4 stride 2": (3, 16, 28, 4, 2, 1)}


def microseconds(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e6 * (time.perf_counter() - start) / calls


def phase_kernels(batch: int, calls: int) -> list[dict]:
    """Input gradient of each convolution: torch's kernel against the phase form."""
    from psadv.layers import phase_input_gradient
    rows = []
    for name, (c_in, c_out, side, k, s, p) in PHASE_CONVS.items():
        for dtype in (torch.float32, torch.bfloat16):
            for layout in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(batch, c_in, side, side, dtype=dtype).contiguous(memory_format=layout)
                w = torch.randn(c_out, c_in, k, k, dtype=dtype).contiguous(memory_format=layout)
                g = torch.randn_like(torch.nn.functional.conv2d(x, w, None, s, p))

                def torchs():
                    return torch.ops.aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1], False,
                                                              [0, 0], 1, [True, False, False])[0]

                def phase():
                    return phase_input_gradient(g, w, (s, s), (p, p), (side, side))

                want = torchs().float()
                t_torch, t_phase = microseconds(torchs, calls), microseconds(phase, calls)
                rows.append({"convolution": name, "dtype": str(dtype).removeprefix("torch."),
                             "layout": "channels_last" if layout == torch.channels_last else "NCHW",
                             "torch_us": round(t_torch), "phase_us": round(t_phase),
                             "speedup": round(t_torch / t_phase, 2),
                             "relative_difference": float(f"{((phase().float() - want).abs().max() / want.abs().max()).item():.1g}")})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def phase_versions(x_train, y_train, precision: str, steps_list, batches, seconds: float, rounds: int) -> list[dict]:
    """examples/s of whole training versions, mnist-small's first convolution's input gradient in
    torch's form and in the phase form, taking turns round by round."""
    rows = []
    for steps in steps_list:
        for batch in batches:
            variants = {}
            for phase in (False, True):
                parts = StepParts(x_train, y_train, steps=steps, batch=batch, precision=precision)
                for module in parts.model.modules():
                    if hasattr(module, "phase_gradient"):
                        module.phase_gradient = module.phase_gradient and phase
                variants["phase" if phase else "torch"] = parts
            rates = {name: [] for name in variants}
            for _ in range(rounds):
                for name, parts in variants.items():
                    per_part, _ = parts.seconds(seconds)
                    rates[name].append(round(batch / sum(per_part.values()), 1))
            ratios = [p / t for p, t in zip(rates["phase"], rates["torch"])]
            rows.append({"attack": f"PGD-{steps}", "batch_size": batch, "examples_per_s": rates,
                         "ratio_per_round": [round(r, 3) for r in ratios],
                         "ratio_median": round(float(np.median(ratios)), 3)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


# `psadv train` as its console script runs it, and with either of the change's two parts taken out:
# the phase rule switched off (every convolution takes torch's input gradient), and the attacks'
# parameters left unfrozen in the training attack, psadv.attacks.pgd (eval mode only, as before
# psadv/attacks/mode.py)
PSADV_MAIN = "import sys; from psadv.cli import main; sys.exit(main())"
TORCH_GRADIENT = "import psadv.layers as l; l.phase_gradient_pays = lambda conv: False; "
UNFROZEN = ("import contextlib, psadv.attacks.pgd as p\n"
            "@contextlib.contextmanager\n"
            "def eval_only(model):\n"
            "    was = model.training\n"
            "    model.eval()\n"
            "    try:\n"
            "        yield model\n"
            "    finally:\n"
            "        model.train(was)\n"
            "p.attacking = eval_only\n")
LOOP_VARIANTS = {"this checkout": PSADV_MAIN,
                 "torch's input gradient": TORCH_GRADIENT + PSADV_MAIN,
                 "parameters not frozen": UNFROZEN + PSADV_MAIN,
                 "torch's input gradient, parameters not frozen": UNFROZEN + TORCH_GRADIENT + PSADV_MAIN}


def phase_loops(args) -> dict:
    """`psadv train` of this checkout, whole and with either part of the change taken out
    (:data:`LOOP_VARIANTS`), and of ``--baseline-src`` (alone and with the passive OpenMP wait it had
    before results/openmp-wait.toml), in an order shuffled each round (seeded) so that the VM's
    drift reaches every variant alike: examples/s as the median of the run's train rows, the versions
    it trained, and versions per second of training."""
    import random
    import tempfile
    here = str(Path(__file__).resolve().parents[1])
    variants = {name: (here, {}, code) for name, code in LOOP_VARIANTS.items()
                if name == "this checkout" or name in args.loop_variants.split(",") or args.loop_variants == "all"}
    if args.baseline_src:
        variants["baseline"] = (args.baseline_src, {}, PSADV_MAIN)
        variants["baseline, passive wait"] = (args.baseline_src, {"OMP_WAIT_POLICY": "PASSIVE"}, PSADV_MAIN)
    out = {name: {"examples_per_s": [], "versions": [], "versions_per_s": []} for name in variants}
    cmd, run_tmp = None, None
    order, rng = list(variants), random.Random(args.loop_order_seed)
    for _ in range(args.loop_rounds):
        rng.shuffle(order)
        for name in order:
            src, env, code = variants[name]
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-c", code, "train", "--data-dir", args.data_dir, "--time-budget",
                       str(args.loop_seconds), "--eval-every", "0", "--checkpoint-every", "0", "--log-every", "10",
                       "--no-progress", "--threads", str(torch.get_num_threads()), "--seed", "0",
                       "--eval-examples", "100", "--eval-attack", "pgd", "--eval-steps", "1", "--run-dir", f"{tmp}/run"]
                run_tmp = tmp
                environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                               env={**environ, **env, "PYTHONPATH": src})
                rows = [json.loads(line) for line in (Path(tmp) / "run" / METRICS).read_text().splitlines()]
                summary = json.loads((Path(tmp) / "run" / SUMMARY).read_text())
            train = [r for r in rows if r.get("kind") == "train"]
            rates = sorted((b["examples_seen"] - a["examples_seen"]) / (b["time"] - a["time"])
                           for a, b in zip(train, train[1:]) if b["time"] > a["time"])
            out[name]["examples_per_s"].append(round(rates[len(rates) // 2], 1))
            out[name]["versions"].append(summary["version"])
            out[name]["versions_per_s"].append(round(summary["version"] / summary["elapsed"], 2))
            print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
    first = out["this checkout"]["versions_per_s"]
    for name in variants:
        if name != "this checkout":
            ratios = [a / b for a, b in zip(first, out[name]["versions_per_s"])]
            out[name]["this_checkout_over_it"] = [round(r, 3) for r in ratios]
            out[name]["this_checkout_over_it_median"] = round(float(np.median(ratios)), 3)
    return {"command": "psadv " + " ".join(cmd[3:]).replace(run_tmp, "TMP"), "variants": out}


def phase(args) -> dict:
    precision = auto_precision(torch.device("cpu")) if args.precision == "auto" else args.precision
    data = load_dataset("mnist", "train", args.data_dir)
    x_train, y_train = torch.tensor(data.x), torch.tensor(data.y)
    out = {"machine": machine(), "precision": precision,
           "openmp": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}}
    parts = args.parts.split(",")
    if "kernels" in parts:
        out["kernels"] = phase_kernels(args.batch_size, args.calls)
    if "versions" in parts:
        out["versions"] = phase_versions(x_train, y_train, precision, [int(s) for s in args.attack_steps.split(",")],
                                         [int(b) for b in args.batch_sizes.split(",")], args.seconds, args.rounds)
    if "loops" in parts:
        out["psadv_train"] = phase_loops(args)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("throughput", "robust", "madry", "arithmetic", "roofline", "phase"):
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
    roof = sub.choices["roofline"]
    roof.add_argument("--attack-steps", default="5,40", help="PGD steps of the recipes (5: the default; 40: Madry's)")
    roof.add_argument("--batch-sizes", default="50,100,200,500,1000,2000")
    roof.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    roof.add_argument("--seconds", type=float, default=4.0, help="seconds per measurement")
    roof.add_argument("--peak-size", type=int, default=2048, help="n of the n × n matmul that measures the peak")
    roof.add_argument("--profile-batch", type=int, default=100, help="batch size of the op profile")
    roof.add_argument("--loop-batch", type=int, default=100, help="batch size of the `psadv train` comparison")
    roof.add_argument("--loop-seconds", type=float, default=20.0, help="--time-budget of it (0: skip)")
    ph = sub.choices["phase"]
    ph.add_argument("--batch-size", type=int, default=100, help="batch of the kernel timings")
    ph.add_argument("--calls", type=int, default=100, help="calls per kernel timing")
    ph.add_argument("--attack-steps", default="5,40", help="PGD steps of the version timings")
    ph.add_argument("--batch-sizes", default="100,500", help="batches of the version timings")
    ph.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ph.add_argument("--seconds", type=float, default=3.0, help="seconds per version timing and round")
    ph.add_argument("--rounds", type=int, default=4, help="rounds of the version timings")
    ph.add_argument("--baseline-src", help="an older psadv checkout (its repository root) to run `psadv train` from")
    ph.add_argument("--parts", default="kernels,versions,loops", help="which comparisons to run")
    ph.add_argument("--loop-seconds", type=float, default=20.0, help="--time-budget of each `psadv train`")
    ph.add_argument("--loop-rounds", type=int, default=3, help="rounds of the `psadv train` comparison")
    ph.add_argument("--loop-variants", default="all", help=f"of {', '.join(LOOP_VARIANTS)} (comma-separated), or all")
    ph.add_argument("--loop-order-seed", type=int, default=0, help="seed of the rounds' shuffled order")
    sub.choices["robust"].add_argument("--run-dir", default="runs/bench-robust")
    sub.choices["robust"].add_argument("extra", nargs="*", help="more `psadv train` flags (after --)")
    args = parser.parse_args()
    set_threads(args.threads)
    result = {"throughput": throughput, "robust": robust, "madry": madry, "arithmetic": arithmetic,
              "roofline": roofline, "phase": phase}[args.what](args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
