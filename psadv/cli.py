"""The ``psadv`` command line: thin click commands over the library.

Every user mistake ends as one line on stderr and a non-zero exit: 2 for usage errors (bad
options, unknown names, an existing run directory, a checkpoint of another model), 1 for a
missing or corrupted file.
"""

from __future__ import annotations

import os

from .threads import quiet_openmp

# Before anything imports torch, whose OpenMP runtime reads its wait policy once, as it loads: idle
# threads then sleep instead of spinning on the cores other work needs (psadv/threads.py).
quiet_openmp(os.environ)

import json  # noqa: E402 - after the OpenMP settings
import math  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import click  # noqa: E402

from . import __version__  # noqa: E402
from .attacks.losses import LOSSES  # noqa: E402
from .attacks.suite import COMPOSITES, EVAL_ATTACKS, EvalRun, EvalSettings  # noqa: E402
from .config import (FIELDS, MAX_SEED, MAX_THREADS, choices_of, parse_number, read_toml,  # noqa: E402
                     recipe_defaults)
from .errors import ConfigError, PsadvError  # noqa: E402


class PsadvGroup(click.Group):
    """A group whose errors print as one line (``psadv: error: …``) with click's exit codes."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name or "psadv", complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except PsadvError as exc:
            _fail(str(exc), exc.exit_code)
        except OSError as exc:
            if exc.errno is None:  # not the system refusing a file: a bug, keep the traceback
                raise
            # the system refused a file (permission, a full disk, a missing directory): the
            # user's environment, not psadv, so one line that names the file
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}", 1)
        except click.Abort:
            _fail("aborted", 130)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


def _fail(message: str, code: int):
    click.echo(f"psadv: error: {message}", err=True)
    sys.exit(code)


class Number(click.ParamType):
    """A finite number or a fraction such as ``8/255`` (ε and step sizes are published in 1/255
    units), at least ``min`` (above it with ``min_open``)."""

    name = "number"

    def __init__(self, min: float | None = None, min_open: bool = False):
        self.min, self.min_open = min, min_open

    def convert(self, value, param, ctx):
        try:
            number = parse_number(value, "it")
        except ConfigError as exc:  # "it must be …, got …": the option is click's to name
            self.fail(f"{value!r} is not {str(exc).split(' must be ', 1)[1].split(', got')[0]}", param, ctx)
        if self.min is not None and (number < self.min or (self.min_open and number == self.min)):
            self.fail(f"{value} is not {'>' if self.min_open else '>='} {self.min:g}", param, ctx)
        return number


def _click_type(name: str):
    f = FIELDS[name]
    choices = choices_of(name)
    if choices:
        return click.Choice(choices, case_sensitive=not f.metadata.get("fold_case"))
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if f.metadata.get("fraction"):
        return Number(min=lo)
    if f.type == "int":
        return click.IntRange(min=lo, max=hi)
    if f.type == "float":
        return click.FloatRange(min=lo, max=hi)
    return click.STRING


def config_options(command):
    """One option per config field (``attack_steps`` -> ``--attack-steps``), default None = not given."""
    for name in reversed(list(FIELDS)):
        f = FIELDS[name]
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default != "" else "none"
        per_dataset = recipe_defaults(name)
        help_text = f"{f.metadata['help']} [default: {default}{'; ' + per_dataset if per_dataset else ''}]"
        if f.type == "bool":
            command = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(command)
        else:
            command = click.option(flag, name, type=_click_type(name), default=None, help=help_text)(command)
    return command


def _finite(ctx, param, value):
    """Reject inf (FloatRange lets it through without a maximum): an infinite step makes NaN images."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def model_option(command):
    """``--model``: the model a file must hold; naming a factory is what lets psadv run its code."""
    return click.option("--model", "expected_model", default=None, metavar="NAME",
                        help="the model the file must hold; a package.module:factory model is imported and "
                             "called (its code run) only if named here")(command)


@click.group(cls=PsadvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="psadv")
def cli():
    """Fast adversarially robust training: weaker adversaries, asynchronous MPI attackers.

    Run `psadv train` in one process, or `mpirun -n N psadv train …` for one parameter server
    and N-1 attackers. `psadv eval` measures robustness, `psadv inspect` reads a checkpoint,
    `psadv plot` draws a run's curves.
    """


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file of options (the command line wins)")
@click.option("--resume", type=click.Path(),
              help="continue a run: its RUN_DIR or a checkpoint file (a package.module:factory model's run "
                   "also needs --model naming it)")
@click.option("--overwrite", is_flag=True, help="replace the run already in --run-dir")
@click.option("--trust-config-code", is_flag=True,
              help="import the package.module:factory model that --config names (else only a --model given "
                   "here is imported: a config file does not choose code to run)")
@click.option("--progress/--no-progress", default=True, help="show a progress bar on stderr")
@config_options
def train(config_file, resume, overwrite, trust_config_code, progress, **options):
    """Adversarially train a model.

    One process runs the classic loop (attack each batch, then step). Under MPI with N >= 2
    ranks, rank 0 is the parameter server and ranks 1..N-1 generate adversarial examples.
    Any option can come from --config FILE.toml; options given here override the file.
    """
    from .launch import launch

    overrides = {k: v for k, v in options.items() if v is not None}
    file_values = read_toml(config_file) if config_file else {}
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    launch(overrides, file_values, resume=resume, overwrite=overwrite, show_progress=progress,
           trust_config_code=trust_config_code)


LOSS_NAMES = tuple(LOSSES)


def _default(name: str) -> str:
    """An attack setting's default, for --help: :class:`EvalSettings` holds the defaults that
    ``psadv eval`` and ``psadv.evaluate`` share (and :class:`EvalRun` those of the run)."""
    return f"[default: {getattr(EvalSettings, name)}]"


@cli.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--attack", type=click.Choice(EVAL_ATTACKS), default=EvalRun.attack, show_default=True,
              help="attack, or cascade of attacks (" + ", ".join(f"{k}: {'+'.join(v)}" for k, v in COMPOSITES.items())
              + ")")
# Not given (None) is not the default: an option the chosen attacks do not read is refused.
@click.option("--steps", type=click.IntRange(min=0), default=None,
              help="steps of pgd " + _default("steps"))
@click.option("--restarts", type=click.IntRange(min=1), default=None,
              help="random restarts of pgd and fgsm-rs " + _default("restarts"))
@click.option("--eps", type=Number(min=0), default=None,
              help="ε, a number or a fraction such as 8/255 (default: the checkpoint's); L∞: <= 1, L2: <= sqrt(pixels)")
@click.option("--step-size", type=Number(min=0, min_open=True), default=None,
              help="absolute step size of pgd, fgsm and fgsm-rs, e.g. 2/255 (default: 2.5ε/steps for pgd)")
@click.option("--loss", type=click.Choice(LOSS_NAMES), default=None,
              help="loss of pgd, fgsm and fgsm-rs: cross-entropy, the CW margin, or DLR " + _default("loss"))
@click.option("--apgd-steps", type=click.IntRange(min=1), default=None,
              help="iterations of apgd-ce, apgd-t and fab-t " + _default("apgd_steps"))
@click.option("--targets", type=click.IntRange(min=1), default=None,
              help=f"target classes of apgd-t and fab-t [default: {EvalSettings.targets}, or all other classes "
                   "if fewer]")
@click.option("--queries", type=click.IntRange(min=1), default=None,
              help="queries per example of square " + _default("queries"))
@click.option("--norm", type=click.Choice(["linf", "l2"], case_sensitive=False), default=None,
              help="threat model, Linf or L2 (default: the checkpoint's)")
@click.option("--examples", type=click.IntRange(min=1), default=EvalRun.examples,
              help="first N test examples (default: all)")
@click.option("--batch-size", type=click.IntRange(min=1), default=EvalRun.batch_size, show_default=True)
@click.option("--data-dir", type=click.Path(), default=None, help="dataset directory (default: the checkpoint's)")
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=0, max=MAX_THREADS), default=EvalRun.threads, show_default=True,
              help="torch threads (0 = automatic: the usable cores less those other work keeps busy)")
@click.option("--seed", type=click.IntRange(min=0, max=MAX_SEED), default=EvalRun.seed, show_default=True,
              help="seed of the random draws (batch i uses SEED + i)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--save", is_flag=True,
              help="also write the JSON object to RUN_DIR/final_eval.json (read by scaling-report)")
@click.option("--claim", "claim_file", type=click.Path(dir_okay=False), default=None,
              help="with --attack autoattack: also write a RobustBench-style claim (clean and AutoAttack accuracy, "
                   "dataset, threat model, ε, model, and how it was measured) to this new JSON file")
@click.option("--progress/--no-progress", default=True, help="show a progress bar on stderr")
@model_option
def eval_(checkpoint, attack, steps, restarts, eps, step_size, loss, apgd_steps, targets, queries, norm, examples,
          batch_size, data_dir, device, threads, seed, as_json, save, claim_file, progress, expected_model):
    """Clean and robust test accuracy of CHECKPOINT (a checkpoint file, a run directory, or a .safetensors
    that psadv export wrote; give an export of npz/hdf5 data its --data-dir).

    An example is robust only if every attack of the cascade fails on it; each attack runs on the
    examples the earlier ones left standing. The default, `strong`, is APGD-CE, APGD-T and the
    black-box Square attack at the checkpoint's ε; `autoattack` adds FAB-T (AutoAttack's standard
    four). When Square flips more than 1% of the examples that the gradient attacks left robust, a
    warning on stderr reports likely gradient masking. An option that none of the chosen attacks
    reads (--steps with the strong cascade, --queries with pgd) is refused.
    """
    from pathlib import Path

    from .attacks.suite import masking_warning
    from .checkpoint.restore import open_checkpoint
    from .claim import CLAIM_ATTACK, make_claim
    from .devices import pick_device
    from .errors import Interrupted
    from .export import is_safetensors, metadata_version, open_model
    from .grading import prepare_evaluation
    from .rundir import FINAL_EVAL, run_of, write_json
    from .stop import SignalFlag, Stopped

    if claim_file is not None:  # checked before minutes of attacking, and never over an existing file
        if attack != CLAIM_ATTACK:
            raise click.UsageError(f"--claim records AutoAttack's accuracy, as RobustBench lists it: add --attack "
                                   f"{CLAIM_ATTACK} (not {attack})")
        claim_path = Path(claim_file)
        if claim_path.exists():
            raise click.UsageError(f"--claim {claim_path} exists; name a new file")
        if not claim_path.parent.is_dir():
            raise click.UsageError(f"--claim {claim_path}: directory {claim_path.parent} does not exist")
    if Path(checkpoint).is_file() and is_safetensors(Path(checkpoint)):  # an export (psadv export)
        model, meta = open_model(checkpoint, trust_factory=expected_model)  # its metadata checked there
        source, version, run_dir = Path(checkpoint), metadata_version(meta), None
        cfg = {"dataset": meta["dataset"], "norm": meta["norm"], "eps": json.loads(meta["eps"]),
               "data_md5": meta.get("data_md5", "")}
        model_name = meta["model_name"]
    else:
        ckpt, model = open_checkpoint(checkpoint, trust_factory=expected_model)
        source, version, cfg, model_name = ckpt.path, ckpt.state.get("version"), ckpt.config, ckpt.model_name
        # the run whose live line (RUN_DIR/checkpoints/) holds it; the check comes before minutes of attacking
        run_dir = run_of(ckpt.path)
    if save and run_dir is None:
        raise click.UsageError(f"--save writes into the run directory, and {source} is not in one "
                               "(RUN_DIR/checkpoints/)")
    if save:  # final_eval.json grades the run's final model: not one a trainer is still making, nor an older one
        from .checkpoint.rotation import checkpoint_version, list_checkpoints
        from .rundir import lock_existing

        why = "--save records the grade of the run's final model, and"
        try:  # held until the file is written: a resume meanwhile would leave it grading an older model
            lock = lock_existing(run_dir)
        except PsadvError as exc:
            raise click.UsageError(f"{why} {exc}, or leave --save out to grade this checkpoint") from None
        click.get_current_context().call_on_close(lock.release)
        newest = [checkpoint_version(c) for c in list_checkpoints(lock.checkpoints)][-1:]
        if [version] != newest:
            raise click.UsageError(f"{why} {source} holds version {version}, not the newest of "
                                   f"{run_dir} ({newest[0] if newest else 'none'}); evaluate {run_dir} --save, or "
                                   "leave --save out to grade this checkpoint")
    evaluation = prepare_evaluation(
        model, recorded=cfg, model_name=model_name, version=version, device=pick_device(device), eps=eps,
        norm=norm, data_dir=data_dir, attack=attack,
        options=dict(steps=steps, restarts=restarts, step_size=step_size, loss=loss, apgd_steps=apgd_steps,
                     targets=targets, queries=queries),
        examples=examples, batch_size=batch_size, seed=seed, threads=threads, check_data=True,
        spell=lambda name: "--" + name.replace("_", "-"), warn=lambda line: click.echo(line, err=True))
    cascade, n = evaluation.cascade, evaluation.examples
    start = time.perf_counter()
    # A signal ends the evaluation within one attack iteration (psadv/stop.py), with one line and
    # exit 128 + its number: minutes of a strong batch never outlive SLURM's grace period.
    signals = SignalFlag().install()
    try:
        result = evaluation.run(progress=progress and not as_json, stop=signals.stop_requested)
    except Stopped:
        raise Interrupted(f"evaluation of {source} interrupted by {signals.name()} after "
                          f"{time.perf_counter() - start:.0f}s; nothing was recorded", signals.signum) from None
    finally:
        signals.restore()
    result.update(checkpoint=str(source), seconds=round(time.perf_counter() - start, 2),
                  threads=evaluation.threads.threads)
    warning = masking_warning(result["masking_gap"])
    if warning:
        click.echo(warning, err=True)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        click.echo(f"{source}: clean {result['clean_acc']:.2%}, robust {result['robust_acc']:.2%} "
                   f"under {result['attack']} on {n} test examples ({result['seconds']:.0f}s)")
        if len(result["attacks"]) > 1:
            for row in result["attacks"]:
                click.echo(f"  after {row['attack']}: {row['robust_acc']:.2%} ({row['flipped']} flipped, "
                           f"{row['seconds']:.0f}s)")
    if claim_file is not None:  # after printing: a write that fails must not throw away minutes of attacking
        command = _eval_command(source, cascade, data_dir=evaluation.data_dir, examples=n,
                                test_size=evaluation.test_size, seed=seed, model=expected_model)
        claim = make_claim(result, name=(run_dir or source).name, command=command, test_size=evaluation.test_size,
                           classes=evaluation.classes)
        write_json(claim_path, claim)
        click.echo(f"psadv: wrote the claim to {claim_path}", err=True)
    if save:
        write_json(run_dir / FINAL_EVAL, result)


def _eval_command(path, cascade, *, data_dir, examples: int, test_size: int, seed: int, model) -> str:
    """The ``psadv eval`` command that measures the same again, every setting spelled out (so a
    change of psadv's defaults does not change what it runs)."""
    s = cascade[0].settings
    args = ["psadv", "eval", str(path), "--attack", "autoattack", "--norm", s.norm, "--eps", repr(s.eps),
            "--apgd-steps", str(s.apgd_steps), "--targets", str(s.targets), "--queries", str(s.queries),
            "--seed", str(seed)]
    args += ["--examples", str(examples)] if examples < test_size else []
    args += ["--data-dir", str(data_dir)] if data_dir else []
    args += ["--model", str(model)] if model else []
    return shlex.join(args)


@cli.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def inspect(checkpoint, as_json):
    """Summarise CHECKPOINT (a file or a run directory): model, version, config, size."""
    from .checkpoint.codec import describe_checkpoint
    from .checkpoint.rotation import find_checkpoint

    info = describe_checkpoint(find_checkpoint(checkpoint))
    if as_json:
        click.echo(json.dumps(info, sort_keys=True, default=str))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key:>16}: {value}")


@cli.command()
@click.argument("source", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["safetensors", "onnx"]), default="safetensors", show_default=True,
              help="safetensors: weights + JSON metadata; onnx: the graph (needs pip install 'psadv[onnx]')")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="file to write [default: RUN_DIR/model-v<version>.<format>]")
@click.option("--overwrite", is_flag=True, help="replace the output file if it exists")
@model_option
def export(source, fmt, output, overwrite, expected_model):
    """Write the model of SOURCE (a run directory, checkpoint or exported .safetensors) for other tools.

    The safetensors file holds the state dict and, in its metadata, the model name and arguments,
    ε, norm, dataset, version and input range [0, 1]; psadv.load_model reads it back, and plain
    safetensors + torch read it without psadv (docs/guides/export-python-api.md).
    """
    from .export import export_model

    click.echo(export_model(source, fmt, output, overwrite=overwrite, trust_factory=expected_model))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "-o", type=click.Path(), default=None, help="directory of the PNGs [default: RUN_DIR/plots]")
def plot(run_dir, out):
    """Plot a run: loss, clean and robust accuracy, ε, learning rate, staleness and examples/s
    against versions (by_version.png) and against wall-clock time (by_time.png)."""
    from .report.plot_run import plot_run

    for path in plot_run(run_dir, out):
        click.echo(f"psadv: wrote {path}")


class TrailingArgsCommand(click.Command):
    """A command whose arguments after ``--`` are kept apart (in ``ctx.meta["trailing"]``)."""

    def parse_args(self, ctx, args):
        if "--" in args:
            cut = args.index("--")
            args, ctx.meta["trailing"] = args[:cut], args[cut + 1:]
        return super().parse_args(ctx, args)


@cli.command("scaling-report", cls=TrailingArgsCommand)
@click.argument("run_dirs", nargs=-1, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(), help="report directory (sweep runs go to OUT/runs)")
@click.option("--target", type=click.FloatRange(0, 1), default=0.89, show_default=True,
              help="robust accuracy for the time-to-target numbers")
@click.option("--baseline", default=None, help="run name to compare every run's time to target with")
@click.option("--overwrite", is_flag=True, help="replace the report in OUT (and, in a sweep, its runs)")
@click.option("--resume", is_flag=True,
              help="sweep: continue the sweep in OUT (keep finished runs, resume stopped ones) and replace its report")
@click.option("--workers", default=None, help="sweep: attacker counts, e.g. 1,2,4,8 (0 = one process, no MPI)")
@click.option("--max-staleness", "max_staleness", default=None, help="sweep: --max-staleness values, e.g. 8,32")
@click.option("--push", default=None, help="sweep: push modes, e.g. sync,examples [default: sync]")
@click.option("--launcher", default=None, show_default="mpiexec -n {n}",
              help="sweep: launcher template; {n} = attackers + 1 processes")
@click.option("--time-budget", type=click.FloatRange(min=0, min_open=True), default=None, help="sweep: seconds per run")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="sweep: versions per run")
@click.option("--data-dir", type=click.Path(), default=None, help="sweep: dataset directory")
@click.option("--title", default="psadv scaling report", show_default=True, help="the report's heading")
def scaling_report(run_dirs, out, target, baseline, overwrite, resume, workers, max_staleness, push, launcher,
                   time_budget, steps, data_dir, title):
    """Report throughput, speedup, accuracy over time, staleness and the server bottleneck.

    RUN_DIRS are run directories or directories of them. With --workers, first launch a sweep
    (one run per push mode, max staleness and attacker count, one after another) into OUT/runs;
    flags after `--` go to every `psadv train`. Writes OUT/report.md, report.html, report.json
    and PNG plots. SIGUSR1 or SIGTERM during a sweep checkpoints the running job and stops the
    sweep without a report; the same command with --resume continues it.
    """
    from .report import scaling_report as run_report

    trailing = click.get_current_context().meta.get("trailing", [])
    result = run_report(list(run_dirs), out, target=target, baseline=baseline, overwrite=overwrite, resume=resume,
                        workers=workers, max_staleness=max_staleness, push=push, launcher=launcher,
                        time_budget=time_budget, steps=steps, data_dir=data_dir, train_args=trailing, title=title,
                        echo=lambda line: click.echo(line, err=True))
    if "stopped_by" in result:
        click.echo(f"psadv: sweep stopped by {result['stopped_by']} after {result['launched']} of {result['planned']} "
                   "runs, no report written; the same command with --resume continues it")
        return
    incomplete = [r["name"] for r in result["runs"] if r["status"] != "complete"]
    click.echo(f"psadv: report of {len(result['runs'])} runs in {out}/report.md"
               + (f" ({len(incomplete)} not complete: {', '.join(incomplete)})" if incomplete else ""))


def main():
    try:
        cli()
    finally:
        _after_the_command()


def _after_the_command() -> None:
    """Stop signals once the command has ended and saved what it had.

    One process ignores them: a Ctrl-C or SIGTERM while the interpreter exits (torch's teardown takes a
    moment) would only turn a clean end into a kill by the signal. A rank of an MPI job keeps their
    default action instead: its exit waits in MPI_Finalize for every other rank, where no Python
    handler runs, so a rank that hangs there (stopped, swapped out) would make an ignoring job
    unkillable but by SIGKILL; the fault benchmark's hung-term scenarios at the end of training hung
    exactly so (results/fault-bench-100.toml). Dying by the signal loses nothing at that point."""
    import signal

    from .stop import STOP_SIGNALS

    mpi = sys.modules.get("mpi4py.MPI")  # never imported here: importing it would start MPI
    shared_exit = (mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized()
                   and mpi.COMM_WORLD.Get_size() > 1)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL if shared_exit else signal.SIG_IGN)


if __name__ == "__main__":
    main()
