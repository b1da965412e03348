#!/usr/bin/env python3
"""psadv's default thread count against fixed ones, on an idle machine and next to a competing job.

    python scripts/threads_bench.py --data-dir ../shared/data --out runs/threads-bench [--seconds 15]

For each condition (``idle``: nothing started by this script; ``busy``: one busy-loop process per
usable core, started before and stopped after) and each setting (``default``: no --threads, psadv's
automatic choice; ``1`` and ``2``: --threads N; ``spin``: --threads 2 with OpenMP's own wait policy,
what every psadv did before it set the passive one), it runs the same short
``psadv train --time-budget SECONDS`` and ``psadv eval RUN --attack pgd --examples N`` of that run,
and prints one JSON object per command and, last, one with the versions (psadv, torch, the git
commit), every row and, per condition and command, the default's slowdown against the best
setting (train: versions; eval: seconds attacking). OMP_NUM_THREADS is removed from the children's
environment, as on a fresh shell. Other work on the machine changes the numbers: the load average
before each command is in its row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from psadv.rundir import SUMMARY

ROOT = Path(__file__).resolve().parents[1]
PSADV = [sys.executable, "-m", "psadv.cli"]
SETTINGS = ("default", "1", "2", "spin")
BUSY_LOOP = "while True: pass"


def settings_args(setting: str) -> tuple[list[str], dict]:
    """The --threads flags and the environment changes of a setting."""
    if setting == "default":
        return [], {}
    if setting == "spin":  # present but empty: psadv leaves it, libgomp ignores it and spins as it always did
        return ["--threads", "2"], {"OMP_WAIT_POLICY": "", "KMP_BLOCKTIME": ""}
    return ["--threads", setting], {}


def run(cmd: list[str], env: dict, timeout: float) -> dict:
    """Run ``cmd``; its wall seconds, exit code, stdout and stderr (or a timeout)."""
    print("$ " + shlex.join(cmd[2:] if cmd[:2] == PSADV[:2] else cmd), file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"wall_s": round(time.perf_counter() - start, 1), "timed_out": True, "load_before": round(load, 2)}
    return {"wall_s": round(time.perf_counter() - start, 1), "rc": done.returncode, "stdout": done.stdout,
            "stderr": done.stderr, "load_before": round(load, 2)}


def threads_of(stderr: str) -> int | None:
    """The thread count psadv train's start-up line names."""
    match = re.search(r"; (\d+) threads? \(", stderr)
    return int(match.group(1)) if match else None


def measure(args, condition: str, setting: str, base_env: dict) -> list[dict]:
    flags, extra_env = settings_args(setting)
    env = {**base_env, **extra_env}
    run_dir = Path(args.out) / condition / setting
    train_cmd = [*PSADV, "train", "--data-dir", args.data_dir, "--run-dir", str(run_dir), "--overwrite",
                 "--time-budget", str(args.seconds), "--seed", str(args.seed), "--no-progress", *flags]
    trained = run(train_cmd, env, args.timeout)
    row = {"condition": condition, "setting": setting, "command": "train", "cmd": shlex.join(["psadv", *train_cmd[3:]]),
           "wall_s": trained["wall_s"], "load_before": trained["load_before"]}
    if trained.get("timed_out") or trained["rc"] != 0:
        row["failed"] = "timed out" if trained.get("timed_out") else trained["stderr"].strip().splitlines()[-1:]
        return [row]
    summary = json.loads((run_dir / SUMMARY).read_text())
    last = summary.get("last_eval") or {}
    row.update(threads=threads_of(trained["stderr"]), versions=summary["version"],
               train_seconds=summary["elapsed"], examples_per_s=round(summary["examples_seen"] / summary["elapsed"], 1),
               robust_acc=last.get("robust_acc"), robust_attack=last.get("attack"),
               warned="oversubscribed" in trained["stderr"])
    eval_cmd = [*PSADV, "eval", str(run_dir), "--attack", "pgd", "--examples", str(args.examples), "--json",
                "--no-progress", *flags]
    graded = run(eval_cmd, env, args.timeout)
    erow = {"condition": condition, "setting": setting, "command": "eval", "cmd": shlex.join(["psadv", *eval_cmd[3:]]),
            "wall_s": graded["wall_s"], "load_before": graded["load_before"]}
    if graded.get("timed_out") or graded["rc"] != 0:
        erow["failed"] = "timed out" if graded.get("timed_out") else graded["stderr"].strip().splitlines()[-1:]
    else:
        out = json.loads(graded["stdout"])
        erow.update(threads=out.get("threads"), seconds=out["seconds"], examples=out["examples"],
                    examples_per_s=round(out["examples"] / max(out["seconds"], 1e-9), 2),
                    robust_acc=out["robust_acc"], attack=out["attack"], warned="oversubscribed" in graded["stderr"])
    return [row, erow]


def slowdowns(rows: list[dict]) -> list[dict]:
    """Per condition and command: the default's slowdown against the best setting (train: fewer
    versions in the same budget; eval: more seconds attacking), >= 1."""
    out = []
    for condition in dict.fromkeys(r["condition"] for r in rows):
        for command in ("train", "eval"):
            done = {r["setting"]: r for r in rows if r["condition"] == condition and r["command"] == command
                    and "failed" not in r}
            if "default" not in done:
                continue
            if command == "train":
                best = max(done, key=lambda s: done[s]["versions"])
                ratio = done[best]["versions"] / max(done["default"]["versions"], 1)
            else:  # the attacks' own seconds: start-up, the same for every setting, is left out
                best = min(done, key=lambda s: done[s]["seconds"])
                ratio = done["default"]["seconds"] / max(done[best]["seconds"], 1e-9)
            out.append({"condition": condition, "command": command, "best": best,
                        "default_slowdown": round(ratio, 2)})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="directory holding mnist/")
    parser.add_argument("--out", required=True, help="directory of the runs (replaced run by run)")
    parser.add_argument("--seconds", type=float, default=15.0, help="psadv train --time-budget")
    parser.add_argument("--examples", type=int, default=100, help="psadv eval --examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--conditions", default="idle,busy", help="idle, busy, or both")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before one command counts as failed")
    args = parser.parse_args(argv)
    settings = args.settings.split(",")
    if not set(settings) <= set(SETTINGS):
        parser.error(f"--settings: choose from {', '.join(SETTINGS)}")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                                             "KMP_BLOCKTIME")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    import psadv
    import torch

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows: list[dict] = []
    for condition in args.conditions.split(","):
        loops = []
        if condition == "busy":  # one busy loop per usable core, as another user's job would be
            loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(cores)]
            time.sleep(2)
        try:
            for setting in settings:
                for row in measure(args, condition, setting, env):
                    print(json.dumps(row), flush=True)
                    rows.append(row)
        finally:
            for loop in loops:
                loop.kill()
                loop.wait()
    result = {"psadv": psadv.__version__, "torch": torch.__version__, "commit": commit, "cores": cores,
              "seconds": args.seconds, "examples": args.examples, "rows": rows, "slowdowns": slowdowns(rows)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
