#!/usr/bin/env python
"""Fault-injection benchmark (not a test; its result is results/fault-benchmark.toml).

Runs N randomized fault scenarios against short MPI jobs (server + attackers) and checks that
nothing is lost:

    python scripts/fault_bench.py --data-dir ../shared/data/mnist --scenarios 50

Each scenario starts ``mpiexec -n 3 psadv train`` with a small version budget and periodic
checkpoints, waits a random time after training has begun, and injects one fault:

=================  ===============================================================================
``kill9``          SIGKILL to a random rank (a node dies): the job must end within seconds
``sigstop``        SIGSTOP a random rank for 2-8 s, then SIGCONT (a stall): the run must finish
``hung-term``      SIGSTOP a random attacker, then SIGTERM to the job: checkpoint, then end
``sigterm``        SIGTERM / SIGUSR1 / SIGINT to ``mpiexec`` (SLURM's and Ctrl-C's way): checkpoint,
``sigusr1``        exit 0
``sigint``
``rank-term``      SIGTERM to one random rank only: the job checkpoints and stops
``disk-full``      the run directory lives on a small tmpfs that fills up: a one-line error
``nan-push``       an attacker pushes NaN examples (``tests/fault_entry.py``): rejected, run finishes
``raise``          an exception on a random rank (``tests/fault_entry.py``): the job ends at once
=================  ===============================================================================

Then it records: did the job end (a *hang* is a job still running 90 s after the fault), how fast,
its exit code, whether the newest checkpoint loads, and whether ``--resume`` (from a copy on a
normal disk for ``disk-full``) reaches the version budget. A *lost checkpoint* is a scenario that
had written a checkpoint (or was told to write one by a signal) and ends with none that loads.
Writes ``OUT/fault_bench.json`` and ``OUT/fault_bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULT_ENTRY = ROOT / "tests" / "fault_entry.py"
KINDS = ("kill9", "sigstop", "hung-term", "sigterm", "sigusr1", "sigint", "rank-term", "disk-full", "nan-push",
         "raise")
RECIPE = ["--batch-size", "50", "--attack-steps", "2", "--eval-every", "0", "--eval-examples", "100",
          "--eval-steps", "2", "--log-every", "10", "--checkpoint-every", "20", "--threads", "1", "--no-progress"]
HANG_SECONDS = 90.0
SIGNALS = {"sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1, "sigint": signal.SIGINT}


def rows(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("kind") == kind:
            out.append(row)
    return out


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def job_cmd(ranks: int, run_dir: Path, data_dir: str, steps: int, fault: str | None) -> list[str]:
    program = [str(FAULT_ENTRY), fault] if fault else ["-m", "psadv.cli"]
    return [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), sys.executable, *program, "train",
            "--data-dir", data_dir, "--run-dir", str(run_dir), "--steps", str(steps), *RECIPE]


def checkpoint_state(run_dir: Path) -> int | None:
    """The version of the newest checkpoint if it loads, else None."""
    from psadv.checkpoint import find_checkpoint, load_checkpoint
    from psadv.errors import CheckpointError

    try:
        return int(load_checkpoint(find_checkpoint(run_dir)).state["version"])
    except CheckpointError:
        return None


def mount_tmpfs(size_kib: int) -> Path | None:
    where = Path(tempfile.mkdtemp(prefix="psadv-full-"))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        where.rmdir()
        return None
    return where


def unmount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)
    shutil.rmtree(where, ignore_errors=True)


def scenario(i: int, kind: str, rng: random.Random, args, out: Path) -> dict:
    ranks, steps = args.ranks, args.steps
    rank = rng.randrange(ranks)
    # a server fault counts versions, an attacker's its own pushes (about steps / attackers of them)
    after = rng.randrange(25, steps - 20) if rank == 0 else rng.randrange(5, steps // (ranks - 1) - 10)
    fault = {"nan-push": f"nan-push,rank={rng.randrange(1, ranks)},after={rng.randrange(2, 30)}",
             "raise": f"raise,rank={rank},after={after}"}.get(kind)
    mount = None
    if kind == "disk-full":
        mount = mount_tmpfs(args.tmpfs_kib)
        if mount is None:
            return {"scenario": i, "kind": kind, "skipped": "cannot mount a tmpfs (needs root)"}
        run_dir = mount / "run"
    else:
        run_dir = out / "runs" / f"{i:03d}-{kind}"
    result: dict = {"scenario": i, "kind": kind, "fault": fault}
    proc = subprocess.Popen(job_cmd(ranks, run_dir, args.data_dir, steps, fault), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    pids: dict[int, int] = {}
    try:
        start = time.monotonic()
        while not rows(run_dir, "train") and proc.poll() is None and time.monotonic() - start < 120:
            time.sleep(0.1)
        world = rows(run_dir, "world")
        pids = {r["rank"]: int(r["pid"]) for r in world[0]["ranks"]} if world else {}
        delay = rng.uniform(0.5, args.max_delay)
        time.sleep(delay)
        injected = time.monotonic()
        target = None
        if proc.poll() is None and pids:
            if kind == "kill9":
                target = rng.randrange(ranks)
                os.kill(pids[target], signal.SIGKILL)
            elif kind == "sigstop":
                target = rng.randrange(ranks)
                os.kill(pids[target], signal.SIGSTOP)
                time.sleep(rng.uniform(2, 8))
                os.kill(pids[target], signal.SIGCONT)
            elif kind == "hung-term":
                target = rng.randrange(1, ranks)
                os.kill(pids[target], signal.SIGSTOP)
                proc.send_signal(signal.SIGTERM)
            elif kind in SIGNALS:
                proc.send_signal(SIGNALS[kind])
            elif kind == "rank-term":
                target = rng.randrange(ranks)
                os.kill(pids[target], signal.SIGTERM)
        result.update(delay=round(delay, 2), target_rank=target,
                      version_at_fault=max((r["version"] for r in rows(run_dir, "train")), default=0))
        try:
            _, err = proc.communicate(timeout=HANG_SECONDS)
            result.update(hang=False, end_seconds=round(time.monotonic() - injected, 2), exit_code=proc.returncode)
        except subprocess.TimeoutExpired:
            result.update(hang=True, end_seconds=None, exit_code=None)
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        errors = [line for line in err.splitlines() if line.startswith("psadv: error:")]
        result.update(error=errors[0][:200] if errors else None, traceback="Traceback" in err)
    finally:
        for pid in pids.values():  # a stopped or orphaned rank must not outlive its scenario
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if mount is not None:  # resume where there is room: a copy on the normal disk
        copy = out / "runs" / f"{i:03d}-{kind}"
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock", ".*tmp*"))
        unmount(mount)
        run_dir = copy
    version = checkpoint_state(run_dir)
    wrote_one = any(run_dir.glob("checkpoints/*.h5")) or kind in ("hung-term", "rank-term", *SIGNALS)
    result.update(checkpoint_version=version, lost_checkpoint=wrote_one and version is None)
    if version is None:  # nothing to resume from: a new run must be possible in the same place
        res = subprocess.run(job_cmd(ranks, run_dir, args.data_dir, steps, None) + ["--overwrite"],
                             capture_output=True, text=True, timeout=600, env=env())
    else:
        res = subprocess.run([shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), sys.executable, "-m",
                              "psadv.cli", "train", "--resume", str(run_dir), "--no-progress"],
                             capture_output=True, text=True, timeout=600, env=env())
    try:
        final = json.loads((run_dir / "summary.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        final = None
    result.update(resume_exit_code=res.returncode, resume_version=final,
                  resume_ok=res.returncode == 0 and final == steps)
    if not result["resume_ok"]:
        (out / "runs" / f"{i:03d}-{kind}.resume.stderr").write_text(res.stderr)
        errors = [line for line in res.stderr.splitlines() if line.startswith("psadv: error:")]
        result["resume_error"] = (errors or res.stderr.strip().splitlines() or [""])[-1][:200]
    return result


def render(results: list[dict], args, seconds: float) -> str:
    ran = [r for r in results if "skipped" not in r]
    lines = ["# psadv fault-injection benchmark", "",
             f"`python scripts/fault_bench.py --scenarios {args.scenarios} --seed {args.seed} --ranks {args.ranks} "
             f"--steps {args.steps}` — {len(ran)} scenarios in {seconds / 60:.1f} min", "",
             f"- hangs: **{sum(r['hang'] for r in ran)}**",
             f"- lost checkpoints: **{sum(r['lost_checkpoint'] for r in ran)}**",
             f"- resumes that reached the budget: **{sum(r['resume_ok'] for r in ran)} / {len(ran)}**",
             f"- tracebacks printed: {sum(r['traceback'] for r in ran)} (bugs only: injected `raise` faults)",
             f"- skipped: {len(results) - len(ran)}", "",
             "| kind | scenarios | hangs | exit codes | s to end (max) | checkpoint loads | resumed to budget |",
             "|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        group = [r for r in ran if r["kind"] == kind]
        if not group:
            continue
        codes = sorted({str(r["exit_code"]) for r in group})
        ends = [r["end_seconds"] for r in group if r["end_seconds"] is not None]
        loads = sum(r["checkpoint_version"] is not None for r in group)
        lines.append(f"| {kind} | {len(group)} | {sum(r['hang'] for r in group)} | {', '.join(codes)} | "
                     f"{max(ends):.1f} | {loads} / {len(group)} | {sum(r['resume_ok'] for r in group)} / {len(group)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--scenarios", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="version budget of every job")
    parser.add_argument("--max-delay", type=float, default=6.0, help="latest fault, seconds after training began")
    parser.add_argument("--tmpfs-kib", type=int, default=3000, help="size of the disk that fills up")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--out", default="runs/fault-bench")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds: {', '.join(unknown)}")
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists; choose another --out")
    (out / "runs").mkdir(parents=True)
    rng = random.Random(args.seed)
    results, start = [], time.monotonic()
    for i in range(args.scenarios):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        r = scenario(i, kind, rng, args, out)
        results.append(r)
        print(json.dumps(r, sort_keys=True), flush=True)
        (out / "fault_bench.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    report = render(results, args, time.monotonic() - start)
    (out / "fault_bench.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
