#!/usr/bin/env python
"""Fault-injection benchmark (not a test; its results are results/fault-benchmark.toml and
results/fault-bench-eval-signals.toml).

Runs N randomized fault scenarios against short MPI jobs (server + attackers) and checks that
nothing is lost:

    python scripts/fault_bench.py --data-dir ../shared/data/mnist --scenarios 120

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
``eval-term``      SIGTERM to ``mpiexec`` during a periodic *strong* evaluation (APGD-CE, APGD-T,
                   Square at a small ε, minutes long): checkpoint, exit 0 within 5 s
``final-eval-term`` SIGTERM during the final strong evaluation, after the final checkpoint: exit 0
                   within 5 s, ``final_evaluation`` "interrupted"
=================  ===============================================================================

A fault that never reached the job (it had ended first, or the evaluation it was meant to cut
short had not begun or had finished) is *not injected*: the scenario is retried with a new random
delay, up to ``--retries`` times, and one still not injected is reported apart, never counted as
passed. Then it records: did the job end (a *hang* is a job still running 90 s after the fault), how fast,
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

from psadv import rundir

ROOT = Path(__file__).resolve().parents[1]
FAULT_ENTRY = ROOT / "tests" / "fault_entry.py"
KINDS = ("kill9", "sigstop", "hung-term", "sigterm", "sigusr1", "sigint", "rank-term", "disk-full", "nan-push",
         "raise", "eval-term", "final-eval-term")
EVAL_KINDS = ("eval-term", "final-eval-term")
# A strong evaluation of minutes: at ε = 0.01 almost nothing flips, so every attack runs to its end.
STRONG_EVAL = ["--eps", "0.01", "--eval-attack", "strong", "--eval-examples", "200"]
EVAL_EVERY = 20
SIGNAL_BOUND_S = 5.0  # a signal during an evaluation must end the job this soon (docs/design/failure-model.md)
RECIPE = ["--batch-size", "50", "--attack-steps", "2", "--eval-every", "0", "--eval-examples", "100",
          "--eval-steps", "2", "--log-every", "10", "--checkpoint-every", "20", "--threads", "1", "--no-progress"]
HANG_SECONDS = 90.0
SIGNALS = {"sigterm": signal.SIGTERM, "sigusr1": signal.SIGUSR1, "sigint": signal.SIGINT}


def rows(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / rundir.METRICS
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


def job_cmd(ranks: int, run_dir: Path, data_dir: str, steps: int, fault: str | None, kind: str = "",
            push: str | None = None) -> list[str]:
    program = [str(FAULT_ENTRY), fault] if fault else ["-m", "psadv.cli"]
    extra = []
    if kind == "eval-term":  # a periodic strong evaluation every EVAL_EVERY versions
        extra = [*STRONG_EVAL, "--eval-every", str(EVAL_EVERY)]
    elif kind == "final-eval-term":  # only the final one
        extra = STRONG_EVAL
    return [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), sys.executable, *program, "train",
            "--data-dir", data_dir, "--run-dir", str(run_dir), "--steps", str(steps), *RECIPE, *extra,
            *(["--push", push] if push else [])]


def summary_of(run_dir: Path) -> dict | None:
    try:
        value = json.loads((run_dir / rundir.SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def was_injected(kind: str, sent: bool, run_dir: Path, err: str) -> bool:
    """Whether the fault reached the job: a signal or kill sent while it ran; for the evaluation
    kinds, one that found the evaluation running (the summary says it was cut short or never
    recorded); for the test-only faults, the job's own trace of them."""
    if kind == "nan-push":
        return bool(rows(run_dir, "rejected"))
    if kind == "raise":
        return "injected fault" in err
    if not sent:
        return False
    if kind in EVAL_KINDS:
        s = summary_of(run_dir) or {}
        if kind == "final-eval-term":
            return str(s.get("final_evaluation", "")).startswith("interrupted")
        return s.get("stop_reason") == "signal SIGTERM" and not rows(run_dir, "eval")
    return True


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
    (out / "runs").mkdir(parents=True, exist_ok=True)
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
    proc = subprocess.Popen(job_cmd(ranks, run_dir, args.data_dir, steps, fault, kind, args.push), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    pids: dict[int, int] = {}
    try:
        start = time.monotonic()
        while not rows(run_dir, "train") and proc.poll() is None and time.monotonic() - start < 120:
            time.sleep(0.1)
        world = rows(run_dir, "world")
        pids = {r["rank"]: int(r["pid"]) for r in world[0]["ranks"]} if world else {}
        delay = rng.uniform(0.5, args.max_delay)
        if kind == "eval-term":  # inside the first periodic evaluation (minutes long)
            while not [r for r in rows(run_dir, "train") if r["version"] >= EVAL_EVERY] and proc.poll() is None \
                    and time.monotonic() - start < 120:
                time.sleep(0.1)
            delay = rng.uniform(0.5, 3.0)
        elif kind == "final-eval-term":  # after the final checkpoint, inside the final evaluation
            from psadv.checkpoint.rotation import checkpoint_name

            final = rundir.checkpoints_dir(run_dir) / checkpoint_name(steps)
            while not final.exists() and proc.poll() is None and time.monotonic() - start < 300:
                time.sleep(0.1)
            delay = rng.uniform(0.5, 3.0)
        time.sleep(delay)
        injected = time.monotonic()
        target = None
        sent = False
        if proc.poll() is None and pids:
            sent = True
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
            elif kind in SIGNALS or kind in EVAL_KINDS:
                proc.send_signal(SIGNALS.get(kind, signal.SIGTERM))
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
        result.update(error=errors[0][:200] if errors else None, traceback="Traceback" in err,
                      injected=was_injected(kind, sent, run_dir, err))
        if kind in EVAL_KINDS and result["end_seconds"] is not None:
            result["within_bound"] = result["end_seconds"] <= SIGNAL_BOUND_S
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
    told_to_write = kind in ("hung-term", "rank-term", *SIGNALS, *EVAL_KINDS)  # a signal makes the job checkpoint
    wrote_one = any(rundir.checkpoints_dir(run_dir).glob("*.h5")) or told_to_write
    result.update(checkpoint_version=version, lost_checkpoint=wrote_one and version is None)
    stopped = summary_of(run_dir)
    # versions trained before the stop that no checkpoint holds (a signal must save them all)
    if stopped is not None and version is not None and kind in (*SIGNALS, *EVAL_KINDS, "hung-term", "rank-term"):
        result["lost_versions"] = max(0, int(stopped.get("version", 0)) - version)
    if version is None:  # nothing to resume from: a new run must be possible in the same place
        res = subprocess.run(job_cmd(ranks, run_dir, args.data_dir, steps, None, kind, args.push) + ["--overwrite"],
                             capture_output=True, text=True, timeout=600, env=env())
    else:
        quick = ["--eval-attack", "pgd"] if kind in EVAL_KINDS else []  # the budget, not minutes of grading
        res = subprocess.run([shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), sys.executable, "-m",
                              "psadv.cli", "train", "--resume", str(run_dir), "--no-progress", *quick],
                             capture_output=True, text=True, timeout=600, env=env())
    try:
        final = json.loads((run_dir / rundir.SUMMARY).read_text())["version"]
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
    hit = [r for r in ran if r.get("injected")]
    missed = [r for r in ran if not r.get("injected")]
    slow = [r for r in hit if r.get("within_bound") is False]
    lines = ["# psadv fault-injection benchmark", "",
             f"`{command_line(args)}` — {len(ran)} scenarios ({len(hit)} injected) in {seconds / 60:.1f} min", "",
             f"- hangs: **{sum(r['hang'] for r in hit)}**",
             f"- lost checkpoints: **{sum(r['lost_checkpoint'] for r in hit)}**",
             f"- versions lost beyond the last checkpoint (signals): **{sum(r.get('lost_versions', 0) for r in hit)}**",
             f"- evaluations a signal did not end within {SIGNAL_BOUND_S:g} s: **{len(slow)}**",
             f"- resumes that reached the budget: **{sum(r['resume_ok'] for r in hit)} / {len(hit)}**",
             f"- tracebacks printed: {sum(r['traceback'] for r in hit)} (bugs only: injected `raise` faults)",
             f"- not injected after {args.retries} retries (not counted above): {len(missed)}",
             f"- skipped: {len(results) - len(ran)}", "",
             "| kind | injected | not injected | hangs | exit codes | s to end (max) | checkpoint loads | "
             "versions lost | resumed to budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        group = [r for r in hit if r["kind"] == kind]
        missing = sum(r["kind"] == kind for r in missed)
        if not group and not missing:
            continue
        codes = sorted({str(r["exit_code"]) for r in group})
        ends = [r["end_seconds"] for r in group if r["end_seconds"] is not None]
        loads = sum(r["checkpoint_version"] is not None for r in group)
        lines.append(f"| {kind} | {len(group)} | {missing} | {sum(r['hang'] for r in group)} | {', '.join(codes)} | "
                     f"{max(ends) if ends else float('nan'):.1f} | {loads} / {len(group)} | "
                     f"{sum(r.get('lost_versions', 0) for r in group)} | {sum(r['resume_ok'] for r in group)} / "
                     f"{len(group)} |")
    return "\n".join(lines) + "\n"


def command_line(args) -> str:
    return (f"python scripts/fault_bench.py --data-dir {args.data_dir} --scenarios {args.scenarios} --seed {args.seed} "
            f"--ranks {args.ranks} --steps {args.steps} --retries {args.retries} --kinds {args.kinds}"
            + (f" --push {args.push}" if args.push else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--scenarios", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="version budget of every job")
    parser.add_argument("--max-delay", type=float, default=6.0, help="latest fault, seconds after training began")
    parser.add_argument("--tmpfs-kib", type=int, default=3000, help="size of the disk that fills up")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--push", default=None, help="--push of every job [psadv's default]")
    parser.add_argument("--retries", type=int, default=3, help="new tries of a scenario whose fault never reached the job")
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
        for attempt in range(args.retries + 1):
            r = scenario(i, kind, rng, args, out if attempt == 0 else out / f"retry-{attempt}")
            r["attempt"] = attempt
            if "skipped" in r or r.get("injected"):
                break
            print(json.dumps({**r, "retrying": attempt < args.retries}, sort_keys=True), flush=True)
        results.append(r)
        print(json.dumps(r, sort_keys=True), flush=True)
        (out / "fault_bench.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    report = render(results, args, time.monotonic() - start)
    (out / "fault_bench.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
