"""The one sweep launcher: ``psadv train`` once per (push mode, max staleness, attacker count).

``psadv scaling-report --workers``, ``scripts/bench_mpi.py`` and ``scripts/slurm/psadv-sweep.sbatch``
(through ``scaling-report``) launch their runs here. The runs go one after another, never side by
side, so that each has the machine to itself. Workers 0 is the single-process trainer (no
launcher); n ≥ 1 is ``LAUNCHER psadv train`` with n + 1 processes, one server and n attackers.
Each run lives in ``RUNS_DIR/NAME`` with its output in ``RUNS_DIR/NAME.log``; ``RUNS_DIR/sweep.json``
records every command, exit code and duration.

With ``resume`` a sweep carries on where an earlier one stopped (a requeued SLURM job): a run that
finished its budget is kept, one stopped early resumes from its newest checkpoint, one without a
checkpoint starts over. SIGUSR1 and SIGTERM (what SLURM sends before a time limit and on
preemption) are passed on to the running job, which checkpoints and stops, and no further job
starts: the result says which signal stopped the sweep.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import FIELDS
from ..errors import CheckpointError, PsadvError, UsageError
from ..rundir import write_json
from .runs import load_run

# Flags the sweep sets on every run; --push and --max-staleness too where the sweep varies them.
SWEEP_FLAGS = ("--run-dir", "--resume", "--overwrite")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class Sweep:
    """Every combination of push mode, max staleness and attacker count, each run with ``train_args``.

    A push mode or max staleness of None leaves that flag to ``train_args`` (or psadv's default).
    """

    workers: list[int]
    push: list[str | None] = field(default_factory=lambda: ["sync"])  # psadv train's default under MPI
    max_staleness: list[int | None] = field(default_factory=lambda: [None])
    launcher: str = "mpiexec -n {n}"
    time_budget: float | None = None
    steps: int | None = None
    data_dir: str | None = None
    train_args: list[str] = field(default_factory=list)


@dataclass
class SweepResult:
    """One record per planned run (name, attackers, push, max_staleness, run_dir, cmd; after a launch
    returncode, seconds and log; ``kept`` for a run finished earlier), and the signal that stopped
    the sweep early, if one did (the records of runs it never started have no returncode)."""

    jobs: list[dict]
    stopped_by: str | None = None

    @property
    def run_dirs(self) -> list[Path]:
        return [Path(job["run_dir"]) for job in self.jobs if job.get("kept") or "returncode" in job]


def parse_int_list(text: str, what: str, minimum: int = 0) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty")
    if any(v < minimum for v in values):
        raise UsageError(f"{what} values must be >= {minimum}, got {text!r}")
    return sorted(set(values))


def launcher_prefix(template: str, n: int) -> list[str]:
    if "{n}" not in template:
        raise UsageError(f"--launcher {template!r} must contain {{n}} (the number of processes), "
                         "e.g. 'mpiexec -n {n}' or 'srun -n {n}'")
    try:
        prefix = shlex.split(template.format(n=n))
        if prefix:
            return prefix
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"--launcher {template!r}: only {{n}} may appear in braces, and quotes must close "
                         f"({type(exc).__name__}: {exc})") from None
    raise UsageError("--launcher is empty; give a command such as 'mpiexec -n {n}'")


def start_flags(run_dir: Path, *, overwrite: bool, resume: bool) -> list[str] | None:
    """The ``psadv train`` flags that start (or continue) the run in ``run_dir``; None: keep it as it is."""
    if not (resume and run_dir.exists()):
        return ["--run-dir", str(run_dir)] + (["--overwrite"] if overwrite else [])
    if load_run(run_dir).status == "complete":
        return None
    from ..checkpoint.rotation import find_checkpoint  # imports torch: only when there is a run to continue

    try:
        find_checkpoint(run_dir)
    except CheckpointError:  # stopped before its first checkpoint: nothing to continue from
        return ["--run-dir", str(run_dir), "--overwrite"]
    return ["--resume", str(run_dir)]


def reference_flags(train_args: list[str], push: str | None = None) -> list[str]:
    """Flags that make the single-process reference train the recipe of the runs with attackers.

    Their default peak learning rate differs from one process's, and synchronous attackers share a
    batch of their own (``make_config``'s ``attackers``; ``push``: the sweep's first push mode, None
    for psadv's default): unless ``train_args`` or their TOML file set them, the reference gets
    ``--lr`` and ``--batch-size`` as one attacker resolves them.
    """
    from ..cli import train
    from ..config import make_config, read_toml

    params = dict(train.make_context("train", list(train_args), resilient_parsing=True).params)
    file_values = read_toml(params["config_file"]) if params.get("config_file") else {}
    overrides = {k: v for k, v in params.items() if k in FIELDS and v is not None}
    if push is not None:
        overrides["push"] = push
    attacker, alone = make_config(file_values, overrides, attackers=1), make_config(file_values, overrides)
    flags = []
    for name in ("lr", "batch_size"):
        if name not in overrides and name not in file_values and getattr(attacker, name) != getattr(alone, name):
            flags += [f"--{name.replace('_', '-')}", repr(getattr(attacker, name))]
    return flags


def check_train_flags(train_cmd: list[str], attackers: int) -> None:
    """Refuse, before any run starts, the flags a run's ``psadv train`` would refuse: a bad flag
    would otherwise fail every run of the sweep, one launch after another, and still end in a report."""
    import click

    from ..cli import train
    from ..config import make_config, read_toml
    from ..launch import check_mpi_options

    try:
        params = dict(train.make_context("train", list(train_cmd)).params)
    except click.ClickException as exc:
        raise UsageError(f"psadv train flags after --: {exc.format_message()}") from None
    except click.exceptions.Exit:  # --help printed train's help: a sweep of it would do nothing
        raise UsageError("psadv train flags after --: --help is not a flag to train with") from None
    file_values = read_toml(params["config_file"]) if params.get("config_file") else {}
    overrides = {k: v for k, v in params.items() if k in FIELDS and v is not None}
    try:
        cfg = make_config(file_values, overrides, attackers=attackers)
        if attackers:
            check_mpi_options(cfg)
    except PsadvError as exc:
        raise UsageError(f"psadv train flags after --: {exc}") from None


def plan(sweep: Sweep, runs_dir: Path, *, overwrite: bool = False, resume: bool = False) -> list[dict]:
    """The sweep's runs, checked before anything runs: one record per (push, max staleness, workers)."""
    varied = [flag for flag, values in (("--push", sweep.push), ("--max-staleness", sweep.max_staleness))
              if values != [None]]
    for flag in (*SWEEP_FLAGS, *varied):
        if any(a == flag or a.startswith(flag + "=") for a in sweep.train_args):
            raise UsageError(f"{flag} is set by the sweep; leave it out of the psadv train flags after --")
    if sweep.time_budget is None and sweep.steps is None and not any(
            a.split("=")[0] in ("--time-budget", "--steps", "--epochs") for a in sweep.train_args):
        raise UsageError("a sweep needs a budget per run: --time-budget SECONDS or --steps VERSIONS")
    launcher_prefix(sweep.launcher, 2)
    # the same budget and data for every run
    common = ((["--time-budget", str(sweep.time_budget)] if sweep.time_budget is not None else [])
              + (["--steps", str(sweep.steps)] if sweep.steps is not None else [])
              + (["--data-dir", sweep.data_dir] if sweep.data_dir else []))
    # The report draws accuracy against time and finds the time to --target from periodic
    # evaluation, which psadv train leaves off under a time budget without a target.
    given = {a.split("=")[0] for a in sweep.train_args}
    evaluation = (["--eval-every", str(FIELDS["eval_every"].default)]
                  if (sweep.time_budget is not None or "--time-budget" in given) and "--eval-every" not in given
                  else [])
    # the single-process reference trains what the attackers train, so the report compares like with like
    reference = reference_flags(sweep.train_args, sweep.push[0]) if any(sweep.workers) else []
    jobs = []
    for push in sweep.push:
        for S in sweep.max_staleness:
            for n in sweep.workers:
                if n == 0 and (push != sweep.push[0] or S != sweep.max_staleness[0]):
                    continue  # one single-process reference is enough
                name = ("single" if n == 0 else (f"{push}-w{n}" if push else f"w{n}")
                        + (f"-S{S}" if S is not None else ""))
                run_dir = runs_dir / name
                start = start_flags(run_dir, overwrite=overwrite, resume=resume)
                cmd = None
                if start is not None:
                    cmd = [sys.executable, "-m", "psadv.cli", "train", *start, "--no-progress"]
                    if n > 0:
                        cmd = (launcher_prefix(sweep.launcher, n + 1) + cmd + (["--push", push] if push else [])
                               + (["--max-staleness", str(S)] if S is not None else []))
                    flags = common + evaluation + (reference if n == 0 else []) + list(sweep.train_args)
                    check_train_flags(flags + (["--push", push] if push and n else [])
                                      + (["--max-staleness", str(S)] if S is not None and n else []), n)
                    cmd += flags
                jobs.append({"name": name, "attackers": n, "push": push if n else None, "max_staleness": S,
                             "run_dir": str(run_dir), "cmd": cmd})
    return jobs


def check_launcher(sweep: Sweep, jobs: list[dict]) -> None:
    """UsageError if a job with attackers is to run and the launcher's program is not on PATH."""
    program = launcher_prefix(sweep.launcher, 2)[0]
    if any(job["attackers"] and job["cmd"] for job in jobs) and shutil.which(program) is None:
        raise UsageError(f"launcher program {program!r} (from --launcher) is not on PATH")


def run_sweep(sweep: Sweep, runs_dir: Path, *, overwrite: bool = False, resume: bool = False,
              echo=print) -> SweepResult:
    """Run the sweep's ``psadv train`` jobs one after another into ``runs_dir``."""
    runs_dir = Path(runs_dir)
    result = SweepResult(plan(sweep, runs_dir, overwrite=overwrite, resume=resume))
    check_launcher(sweep, result.jobs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    running: list[subprocess.Popen] = []

    def forward(signum, _frame):
        result.stopped_by = signal.Signals(signum).name
        for proc in running:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        for job in result.jobs:
            if result.stopped_by:
                break
            if job["cmd"] is None:
                job["kept"] = True
                echo(f"psadv: {job['run_dir']} finished earlier, kept")
                continue
            echo("$ " + shlex.join(job["cmd"]))
            start = time.perf_counter()
            log = runs_dir / f"{job['name']}.log"
            with open(log, "a" if resume else "w") as fh:  # a continued run keeps its earlier output
                running.append(subprocess.Popen(job["cmd"], stdout=fh, stderr=subprocess.STDOUT))
                if result.stopped_by:  # the signal came before the job was in `running`; a second
                    running[0].send_signal(signal.Signals[result.stopped_by])  # one is harmless
                rc = running[0].wait()
                running.clear()
            job.update(returncode=rc, seconds=round(time.perf_counter() - start, 1), log=str(log))
            if rc != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                echo(f"psadv: warning: {job['name']} exited with code {rc}: {tail[0]}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    write_json(runs_dir / "sweep.json", result.jobs)
    return result
