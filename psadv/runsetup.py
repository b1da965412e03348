"""Run set-up and resume: the config, run directory and model of a run, resolved and checked before
training starts (:func:`resolve_run`), and the run directory locked and prepared (:func:`open_run_dir`).

Both trainers start from a :class:`RunSetup`: the single-process loop (:mod:`psadv.single`) and,
under MPI, every rank (:mod:`psadv.launch`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import rundir
from .checkpoint.codec import Checkpoint, damaged, load_checkpoint
from .checkpoint.restore import IncompatibleCheckpoint, UntrustedFactory, build_recorded_model
from .checkpoint.rotation import checkpoint_version, find_checkpoint, list_checkpoints
from .config import FIELDS, Config, check_recorded, make_config, parse_model_args
from .data import FILE_DATASETS, dataset_info, load_dataset, verify_data_file
from .devices import auto_precision, pick_device
from .errors import CheckpointError, ConfigError, UsageError
from .models import is_factory_ref, model_args_for
from .pushmodes import push_mode
from .trackers import check_installed


@dataclass
class RunSetup:
    """Everything resolved before training starts."""

    cfg: Config
    run_dir: Path
    model_args: dict
    checkpoint: Checkpoint | None
    # True when the run continues in its checkpoint's own directory; False for a new run, and
    # for a branch (``--resume A --run-dir B``: a new run in B that starts from A's checkpoint).
    in_place: bool = False
    lock: rundir.RunDir | None = None  # set by open_run_dir; held until the run ends


def _load_resume_checkpoint(resume: str) -> Checkpoint:
    """The checkpoint ``--resume`` names; for a run directory its newest one, and if that one is
    unreadable, an error that names the newest older checkpoint to resume from instead."""
    path = find_checkpoint(resume)
    with _older_hint(resume, path):
        return load_checkpoint(path)


@contextlib.contextmanager
def _older_hint(resume: str, path: Path):
    """A checkpoint that does not load, or loads damaged: for a run directory's newest, the error
    names the newest older checkpoint to resume from instead."""
    try:
        yield
    except CheckpointError as exc:
        if isinstance(exc, (IncompatibleCheckpoint, UntrustedFactory)):  # the options', not the file's
            raise
        older = [c for c in list_checkpoints(path.parent) if c != path][-1:] if Path(resume).is_dir() else []
        if older:
            raise CheckpointError(f"{exc}; resume from the previous checkpoint with --resume {older[0]}") from None
        raise


# The config keys a resumed run takes from its checkpoint and checks against the command line.
RESUME_CONFIG = ("model", "dataset", "norm", "eps")


def _resumed_config(checkpoint: Checkpoint) -> dict:
    """The checkpoint's config as the base of the resumed run's; CheckpointError if it is damaged."""
    base = {k: v for k, v in checkpoint.config.items() if k != "run_dir"}
    try:
        check_recorded(base, RESUME_CONFIG)
    except ConfigError as exc:
        raise damaged(checkpoint.path, str(exc)) from None
    unknown = sorted(set(base) - set(FIELDS))
    if unknown:
        raise damaged(checkpoint.path, f"its config has keys this psadv does not know: {', '.join(unknown)}")
    if base["model"] != checkpoint.model_name:
        raise damaged(checkpoint.path, f"its config's model {base['model']} is not its model {checkpoint.model_name}")
    return base


def home_of(checkpoint: Checkpoint) -> Path:
    """Where a resume of ``checkpoint`` continues by default: its run (a set-aside line's too:
    resuming that one supersedes the line after it), or for a file outside any run the directory
    it lies in."""
    return rundir.run_of(checkpoint.path, superseded=True) or checkpoint.path.parent


def resolve_run(overrides: dict, file_values: dict | None = None, *, resume: str | None = None,
                overwrite: bool = False, prepare_dir: bool = True, attackers: int = 0,
                given=None, trust_config_code: bool = False) -> RunSetup:
    """Resolve the config (defaults < checkpoint < file < command line) and the run directory.

    With ``resume`` the architecture comes from the checkpoint; asking for another model or
    dataset is an error, and a ``package.module:factory`` model is built only if ``--model`` on the
    command line (``overrides``) names it: a checkpoint or a shared ``--config`` file is a file, and a
    file does not choose code to run (:func:`psadv.checkpoint.check_trusted`), unless
    ``trust_config_code`` (``--trust-config-code``) trusts the factory that ``file_values`` names
    (docs/design/security.md). ``prepare_dir=False`` resolves without
    touching the disk (MPI attackers, and the server until every rank has checked its inputs: it
    calls :func:`open_run_dir` then).
    ``attackers``: the MPI job's attackers, for :func:`psadv.config.make_config`. ``given``: the
    options the user chose (default: the keys of ``overrides`` and ``file_values``), which
    :func:`psadv.config.check_given` refuses where the rest of the config ignores them.
    """
    file_values = file_values or {}
    asked = {**file_values, **overrides}
    # the factory the user named: on the command line, or in their --config with --trust-config-code
    trusted = overrides.get("model") or (file_values.get("model") if trust_config_code else None)
    if is_factory_ref(str(asked.get("model") or "")) and asked["model"] != trusted:
        raise UsageError(f"the --config file names the factory model {asked['model']}, and importing it runs its "
                         f"code: psadv runs code only when you name it, so pass --model {asked['model']} (or "
                         "--trust-config-code if you trust that file)")
    checkpoint = None
    base: dict = {}
    if resume:
        checkpoint = _load_resume_checkpoint(resume)
        # The run continues where its checkpoint lies (a moved or copied run stays self-contained).
        with _older_hint(resume, checkpoint.path):
            base = _resumed_config(checkpoint)
        base.setdefault("precision", "fp32")  # checkpoints from before --precision trained in float32
        base.setdefault("ema_decay", 0.0)  # nor did those from before --ema-decay average
        for key in ("model", "dataset"):
            if asked.get(key) is not None and asked[key] != base[key]:
                raise IncompatibleCheckpoint(f"checkpoint {checkpoint.path} holds a {base[key]} run "
                                             f"({key} {base[key]!r}), not {key} {asked[key]!r}")
        if asked.get("model_args") is not None and parse_model_args(asked["model_args"]) != checkpoint.model_args:
            raise IncompatibleCheckpoint(f"checkpoint {checkpoint.path} holds a model built with --model-args "
                                         f"{json.dumps(checkpoint.model_args)}, not {asked['model_args']}")
    cfg = make_config(base, file_values, overrides, attackers=attackers, given=asked if given is None else given)
    if checkpoint is not None:
        check_continuable(checkpoint, cfg)
    if cfg.precision == "auto":  # recorded as resolved, so a resume elsewhere keeps the run's arithmetic
        cfg.precision = auto_precision(pick_device(cfg.device))
    home = home_of(checkpoint) if checkpoint is not None else None
    run_dir = Path(cfg.run_dir) if cfg.run_dir else home if home is not None else rundir.default_run_dir()
    cfg.run_dir = str(run_dir)
    in_place = home is not None and run_dir.resolve() == home.resolve()
    if cfg.data_dir:  # recorded as typed, a relative path fails psadv eval or --resume from another directory
        cfg.data_dir = os.path.abspath(os.path.expanduser(cfg.data_dir))
    if cfg.dataset in FILE_DATASETS:  # recorded in the config, so a resume on a changed file is refused
        cfg.data_md5 = verify_data_file(cfg.dataset, cfg.data_dir or None, cfg.data_md5)
    info = dataset_info(cfg.dataset, cfg.data_dir or None)
    # The model is built (and a factory imported) on every rank, before any file is written: a
    # new one is tried on one batch, a checkpoint's must take its tensors.
    if checkpoint is not None:
        model_args = checkpoint.model_args
        with _older_hint(resume, checkpoint.path):
            build_recorded_model(checkpoint.path, cfg.model, model_args, checkpoint.model_state, trust=trusted)
    elif is_factory_ref(cfg.model):
        model_args = model_args_for(cfg.model, info.shape, info.num_classes, parse_model_args(cfg.model_args))
    else:
        model_args = model_args_for(cfg.model, info.shape, info.num_classes)
    setup = RunSetup(cfg, run_dir, model_args, checkpoint, in_place=in_place)
    if prepare_dir:
        # Data problems surface before anything is written (the loads are cached for the run).
        train = load_dataset(cfg.dataset, "train", cfg.data_dir or None)
        load_dataset(cfg.dataset, "test", cfg.data_dir or None)
        if push_mode(cfg.push).synchronous and cfg.emulate_attackers:  # as launch checks real attackers' shards
            check_batch_size(cfg.batch_size, len(train) // cfg.emulate_attackers,
                             f"an emulated attacker's shard with {cfg.emulate_attackers} attackers")
        else:
            check_batch_size(cfg.batch_size, len(train))
        check_installed(cfg.log)
        open_run_dir(setup, overwrite=overwrite)
    return setup


def check_continuable(checkpoint: Checkpoint, cfg: Config) -> None:
    """Refuse (:class:`IncompatibleCheckpoint`) a resumed config that the checkpoint's training state
    cannot continue, before anything is written: its optimizer state is one optimizer's (another one
    fails at its first step), and its data position counts batches of one size."""
    saved = checkpoint.config
    if saved.get("optimizer", cfg.optimizer) != cfg.optimizer:
        raise IncompatibleCheckpoint(f"checkpoint {checkpoint.path} holds the state of --optimizer "
                                     f"{saved['optimizer']}, not {cfg.optimizer}: a resume continues the run's "
                                     "optimizer; leave --optimizer out, or train a new run")
    if saved.get("batch_size", cfg.batch_size) != cfg.batch_size:
        raise IncompatibleCheckpoint(f"checkpoint {checkpoint.path} was trained with --batch-size "
                                     f"{saved['batch_size']}, not {cfg.batch_size}: its data position counts batches "
                                     f"of {saved['batch_size']}; leave --batch-size out, or train a new run")


def check_batch_size(batch_size: int, available: int, where: str = "the training set") -> None:
    if batch_size > available:
        raise ConfigError(f"--batch-size {batch_size} exceeds {where} ({available} examples)")


def open_run_dir(setup: RunSetup, *, overwrite: bool = False) -> None:
    """Lock and prepare the run directory (:func:`psadv.rundir.prepare`).

    A branch must go to a directory that holds no run. Resuming a run in place from a checkpoint
    older than its newest truncates the run's future: the newer checkpoints, the abandoned line's
    summary and metrics rows are moved (never deleted) into ``checkpoints/superseded-<time>/``
    (:meth:`psadv.rundir.RunDir.supersede`), so "latest" is always on the line being trained, the
    keep-K rotation only ever deletes checkpoints of that line, and the report reads one line. Any
    resume in place sets ``final_eval.json`` aside there too: it grades a model that will not be
    the run's final one.
    """
    if setup.checkpoint is not None and not setup.in_place and rundir.holds_run(setup.run_dir):
        raise UsageError(f"--run-dir {setup.run_dir} already holds a run; --resume {setup.checkpoint.path} "
                         f"with another --run-dir starts a new run there from that checkpoint (a branch), so "
                         f"choose an empty --run-dir, or leave --run-dir out to continue in "
                         f"{home_of(setup.checkpoint)}")
    setup.lock = rundir.prepare(setup.run_dir, resume=setup.in_place, overwrite=overwrite)
    if setup.in_place:
        resumed = setup.checkpoint.state.get("version", 0)
        newer = [c for c in list_checkpoints(setup.lock.checkpoints) if (checkpoint_version(c) or 0) > resumed]
        try:
            if newer:
                aside = setup.lock.supersede(resumed, newer)
                print(f"psadv: resuming from version {resumed}: moved {len(newer)} newer checkpoint"
                      f"{'s' if len(newer) > 1 else ''} to {aside}", file=sys.stderr, flush=True)
            # The run's final model is about to change: psadv eval --save's grade of the old one must
            # not pass for the new one's (scaling-report, export).
            elif aside := setup.lock.set_aside(rundir.FINAL_EVAL):
                print(f"psadv: resuming from version {resumed}: moved {rundir.FINAL_EVAL} to {aside} (it grades "
                      f"the model this resume trains on; psadv eval {setup.run_dir} --save grades the new final one)",
                      file=sys.stderr, flush=True)
        except BaseException:
            setup.lock.abandon()
            raise
