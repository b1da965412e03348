"""Adversarial training: the state both trainers share, and the single-process loop.

:class:`Trainer` owns the model, optimizer, schedules, counters, periodic evaluation, metrics and
checkpoints. The single-process loop (:func:`train_single`) and the MPI parameter server both
drive it: one code path for configuration, checkpoints and metrics.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__, rundir, schedules
from .attacks import PerturbationMemory, perturb, refine
from .augment import augment_batch
from .averaging import LIVE_WEIGHTS, WeightAverage
from .checkpoint import (Checkpoint, CheckpointManager, IncompatibleCheckpoint, UntrustedFactory,
                         build_recorded_model, capture_rng_state, checkpoint_version, damaged, find_checkpoint,
                         list_checkpoints, load_checkpoint, restore_rng_state, restoring)
from .config import FIELDS, Config, check_recorded, make_config, parse_model_args
from .errors import CheckpointError, ConfigError, TrainingDiverged, UsageError
from .data import FILE_DATASETS, BatchStream, dataset_info, load_dataset, verify_data_file
from .devices import auto_precision, autocast, pick_device, precision_warning, set_threads, training_layout
from .threads import ThreadChoice
from .emulate import Emulation
from .evaluate import AccuracyJob
from .gradalign import training_loss
from .gradpush import GradientPushes
from .metrics import MetricsLog
from .models import build_model, flat_state, float_buffers, is_factory_ref, load_flat_state_, model_args_for
from .trackers import check_installed, open_sinks
from .mpi import SignalFlag


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A checkpoint's optimizer state (moments, step counts) under ``optimizer``'s hyperparameters.

    ``load_state_dict`` also restores the hyperparameters the checkpoint was written with; a resume
    takes them from its config (``--weight-decay``, ``--momentum``, ...), which config.json records,
    so they are put back. The learning rate is the schedule's, set before every step."""
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)


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


def run_dir_of(checkpoint: Checkpoint) -> Path:
    """The run a checkpoint belongs to: RUN/checkpoints/ckpt-*.h5, or a set-aside line's
    RUN/checkpoints/superseded-*/ckpt-*.h5 (resuming that one supersedes the line after it)."""
    parent = checkpoint.path.parent
    if parent.name.startswith("superseded-") and parent.parent.name == "checkpoints":
        return parent.parent.parent
    return parent.parent if parent.name == "checkpoints" else parent


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
    home = run_dir_of(checkpoint) if checkpoint is not None else None
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
                         f"{run_dir_of(setup.checkpoint)}")
    setup.lock = rundir.prepare(setup.run_dir, resume=setup.in_place, overwrite=overwrite)
    if setup.in_place:
        resumed = setup.checkpoint.state.get("version", 0)
        directory = setup.run_dir / "checkpoints"
        newer = [c for c in list_checkpoints(directory) if (checkpoint_version(c) or 0) > resumed]
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


@dataclass
class TrainerState:
    """A run's progress: the checkpoint's ``state`` JSON holds these keys (with the loops' own)."""

    version: int = 0
    examples_seen: int = 0
    elapsed: float = 0.0  # seconds of training before this session started
    time_to_target: float | None = None  # when periodic evaluation first reached --target-robust-acc
    last_eval: dict | None = None
    best_robust_acc: float | None = None
    role: str = "single"

    @classmethod
    def resumed(cls, saved: dict, role: str) -> TrainerState:
        """The progress a checkpoint's state recorded, continued in ``role`` (this session's)."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name != "role" and f.name in saved}, role=role)

    def saved(self, elapsed: float) -> dict:
        """The checkpoint's state, with the elapsed time at saving."""
        return {**asdict(self), "elapsed": elapsed}


def initial_model(cfg: Config, model_args: dict, device: torch.device) -> torch.nn.Module:
    """The run's model before training, from a freshly seeded global generator.

    Seeding here is what makes a run repeatable: the initial weights come from torch's global
    generator seeded with ``cfg.seed``, and the single-process loop's attack random starts continue
    that same stream (its checkpoints save the stream, and a resumed run restores it).
    """
    torch.manual_seed(cfg.seed)
    return training_layout(build_model(cfg.model, **model_args).to(device), cfg.precision)


class Trainer:
    """Model, optimizer, schedules, counters, evaluation, metrics and checkpoints of one run."""

    def __init__(self, setup: RunSetup, *, device: torch.device, train_size: int, role: str = "single",
                 stop_requested: Callable[[], bool] | None = None):
        cfg = self.cfg = setup.cfg
        # what cuts an evaluation short within one attack iteration (psadv/stop.py): the runner's
        # signal flag, so a SIGTERM during a strong evaluation never outlives SLURM's grace period
        self.stop_requested = stop_requested
        self.run_dir = setup.run_dir
        self.lock = setup.lock
        self.device = device
        self.model_args = setup.model_args
        self.model = initial_model(cfg, setup.model_args, device)
        self.optimizer = make_optimizer(cfg, self.model)
        # a version of --push gradients --accumulate K (MPI or emulated) takes K batches: an epoch
        # is still one pass over the training set
        k = cfg.accumulate if cfg.push == "gradients" and (role == "server" or cfg.emulate_attackers) else 1
        self.batches_per_epoch = max(1, train_size // (cfg.batch_size * k))
        self.total_versions = schedules.total_versions(cfg, self.batches_per_epoch)
        test = load_dataset(cfg.dataset, "test", cfg.data_dir or None)
        n_eval = min(cfg.eval_examples, len(test))
        self.eval_x = torch.tensor(test.x[:n_eval])
        self.eval_y = torch.tensor(test.y[:n_eval])
        self.state = TrainerState(role=role)
        ckpt = setup.checkpoint
        if ckpt is not None:
            with restoring(ckpt.path):
                self.model.load_state_dict(ckpt.model_state)  # the weight average, if the run kept one
                if ckpt.optimizer_state is not None:
                    load_optimizer_state(self.optimizer, ckpt.optimizer_state)
                self.state = TrainerState.resumed(ckpt.state, role)
        # Averaging from a checkpoint that was not starts the average at its weights.
        self.average = WeightAverage(self.model, cfg.ema_decay) if cfg.ema_decay else None
        if ckpt is not None and LIVE_WEIGHTS in ckpt.extra:
            with restoring(ckpt.path):
                load_flat_state_(self.model, torch.from_numpy(ckpt.extra[LIVE_WEIGHTS]).to(device))
        self.manager = CheckpointManager(self.run_dir / "checkpoints", keep=cfg.keep_checkpoints)
        self.metrics: MetricsLog | None = None  # opened by start()
        self.final_evaluation: str | None = None  # what became of the final evaluation (end_run)
        self._clock = time.perf_counter()

    def start(self) -> None:
        """Write config.json and open the metrics log, once the loop has restored the rest of the
        checkpoint's state: a resume refused or failed while starting up leaves an existing run's
        config.json and metrics as they were (and :meth:`psadv.rundir.RunDir.abandon` undoes the rest)."""
        cfg = self.cfg
        metrics_path = self.run_dir / "metrics.jsonl"
        self.metrics = MetricsLog(metrics_path, open_sinks(
            cfg.log, self.run_dir, existing=rundir.read_metrics(metrics_path) if metrics_path.exists() else [],
            start_version=self.state.version, config=cfg.to_dict()))
        rundir.write_json(self.run_dir / "config.json", {"config": cfg.to_dict(), "model_name": cfg.model,
                                                         "model_args": self.model_args, "psadv_version": __version__})

    # --- counters and schedules -------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.state.version

    @property
    def graded_model(self) -> torch.nn.Module:
        """The model the run delivers: evaluation grades it and checkpoints store it as their model.
        The weight average with --ema-decay, else the live model the optimizer trains."""
        return self.average.model if self.average else self.model

    def elapsed(self) -> float:
        """Wall-clock seconds of training so far, across resumes."""
        return self.state.elapsed + time.perf_counter() - self._clock

    def progress(self) -> float:
        return schedules.progress(self.version, self.elapsed(), self.total_versions, self.cfg.time_budget)

    def attack(self):
        return schedules.training_attack(self.progress(), self.cfg)

    def autocast(self):
        """The context of the training arithmetic (``--precision``): the training attack and step."""
        return autocast(self.cfg.precision, self.device)

    def stop_reason(self) -> str | None:
        if self.total_versions and self.version >= self.total_versions:
            return "version budget"
        if self.cfg.time_budget and self.elapsed() >= self.cfg.time_budget:
            return "time budget"
        if self.cfg.target_robust_acc and self.state.time_to_target is not None:
            return "robust-accuracy target"
        return None

    # --- updates ----------------------------------------------------------------------------
    def _set_lr(self, scale: float = 1.0) -> float:
        lr = schedules.lr_at(self.progress(), self.cfg) * scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self, x_adv: torch.Tensor, y: torch.Tensor, clean: torch.Tensor | None = None) -> dict:
        """One optimizer step on adversarial examples; the model version advances by one. ``clean``:
        the examples they were made from, which --grad-align needs."""
        lr = self._set_lr()
        self.model.train()
        # GradAlign's ball is the training attack's, ε ramp included; without it no schedule is read
        attack = self.attack() if self.cfg.grad_align else None
        with self.autocast():
            loss, logits, penalty = training_loss(self.model, x_adv, y, clean=clean, weight=self.cfg.grad_align,
                                                  eps=attack.eps if attack else 0.0,
                                                  norm=attack.norm if attack else "linf")
        loss_value = loss.item()
        if not math.isfinite(loss_value):  # before the step: the model stays as it was
            raise self.diverged(f"the training loss is {loss_value} (learning rate {lr:g})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        out = self._advance(len(y), lr, loss_value, (logits.argmax(1) == y).float().mean().item())
        return {**out, "grad_align": None if penalty is None else penalty.item()}

    def apply_gradients(self, grads: list[torch.Tensor], buffers: list[torch.Tensor], examples: int,
                        lr_scale: float = 1.0) -> dict:
        """One optimizer step with gradients computed elsewhere (asynchronous SGD); ``buffers`` are the
        float buffers (BatchNorm statistics) of the forward pass behind them, copied into the model."""
        with torch.no_grad():
            for b, value in zip(float_buffers(self.model), buffers):
                b.copy_(value.view_as(b))
        lr = self._set_lr(lr_scale)
        for p, g in zip(self.model.parameters(), grads):
            p.grad = g.to(p.device).view_as(p).clone()
        self.optimizer.step()
        return self._advance(examples, lr, None, None)

    def second_moments(self) -> list[torch.Tensor | None] | None:
        """Adam's bias-corrected moving mean of g² per parameter (None before its first step), for
        delay compensation's adaptive λ; None for an optimizer without one (SGD)."""
        if not isinstance(self.optimizer, torch.optim.Adam):
            return None
        beta2 = self.optimizer.param_groups[0]["betas"][1]
        out = []
        for p in self.model.parameters():
            state = self.optimizer.state.get(p) or {}
            if "exp_avg_sq" not in state:
                out.append(None)
                continue
            out.append(state["exp_avg_sq"] / (1 - beta2 ** float(state["step"])))
        return out

    def diverged(self, what: str) -> TrainingDiverged:
        latest = self.manager.latest()
        if latest:
            return TrainingDiverged(f"training diverged at version {self.version}: {what}; the last good checkpoint, "
                                    f"{latest}, is kept; lower --lr (or check the data) and --resume {self.run_dir}")
        # Nothing to resume: the directory is reused, its metrics (the divergence's evidence) replaced.
        return TrainingDiverged(f"training diverged at version {self.version}: {what}; no checkpoint had been written, "
                                f"so there is nothing to resume: lower --lr (or check the data) and train again with "
                                f"--overwrite --run-dir {self.run_dir}")

    def check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if any parameter or buffer is NaN or infinite (of the
        live model or of its average)."""
        for model in dict.fromkeys((self.model, self.graded_model)):
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise self.diverged(f"model tensor {name!r} holds NaN or infinite values")

    def _advance(self, examples: int, lr: float, loss, acc) -> dict:
        self.state.version += 1
        self.state.examples_seen += examples
        if self.average:
            self.average.update(self.model, self.state.version)
        return {"lr": lr, "loss": loss, "acc": acc}

    # --- evaluation, metrics, checkpoints ---------------------------------------------------
    def slice_accuracy_job(self, model: torch.nn.Module | None = None, batch_size: int = 500,
                           stop: Callable[[], bool] | None = None) -> AccuracyJob:
        """Measuring ``model`` (default: :attr:`graded_model`) on the held-out evaluation slice, in pieces;
        ``stop`` (default: :attr:`stop_requested`) cuts it short within one attack iteration.

        Its random starts come from its own seeded generator: how often a run evaluates never
        changes its training, and every evaluation attacks from the same starts. A gated strong
        evaluation skips its strong attacks while PGD is below --target-robust-acc.
        """
        gate, attacks = schedules.eval_cascade(self.cfg)
        return AccuracyJob(model or self.graded_model, self.eval_x, self.eval_y, attacks,
                           batch_size=batch_size, device=self.device, seed=self.cfg.seed + 1, gate=gate,
                           target=self.cfg.target_robust_acc, stop=stop or self.stop_requested)

    def record_eval(self, result: dict | None, version: int, time_at_version: float,
                          examples_at_version: int | None = None) -> dict | None:
        """Record a measurement of the model of ``version`` (target, best, eval row), reached ``time_at_version`` seconds in.
        ``None`` (a job a stop request cut short, :meth:`psadv.evaluate.AccuracyJob.result`) records nothing."""
        if result is None:
            return None
        self.state.last_eval = {**result, "version": version, "time": time_at_version}
        best = self.state.best_robust_acc
        self.state.best_robust_acc = result["robust_acc"] if best is None else max(best, result["robust_acc"])
        target = self.cfg.target_robust_acc
        if target and self.state.time_to_target is None and result["robust_acc"] >= target:
            self.state.time_to_target = time_at_version
        self.metrics.write("eval", version=version, time=round(time_at_version, 3),
                           eval_seconds=round(self.elapsed() - time_at_version, 3),
                           examples_seen=self.state.examples_seen if examples_at_version is None
                           else examples_at_version, **result)
        return result

    def measure_now(self, progress: bool = False, interrupted: Callable[[], bool] | None = None) -> dict | None:
        """Measure the live model on the evaluation slice now, to the end, and record it; None (nothing
        recorded) if ``interrupted()`` turns true on the way, so a signal never waits for a long one."""
        version, started = self.version, self.elapsed()
        interrupted = interrupted or self.stop_requested or (lambda: False)
        job = self.slice_accuracy_job(stop=interrupted)
        with tqdm(total=len(self.eval_y), desc=f"eval v{version}", unit="ex", disable=not progress,
                  leave=False) as bar:
            while not job.done:
                if interrupted():
                    return None
                bar.update(job.step())
        return self.record_eval(job.result(), version, started)

    def due(self, every: int) -> bool:
        return every > 0 and self.version % every == 0

    def log_train(self, *, lr: float | None, attack, rate: float, **fields) -> dict:
        """A train row: the fields both loops share (``attack`` is the adversary the window trained
        against, ``rate`` its examples/s), then the loop's own ``fields``."""
        return self.metrics.write("train", version=self.version, time=round(self.elapsed(), 3),
                                  examples_seen=self.state.examples_seen, progress=round(self.progress(), 5), lr=lr,
                                  eps=attack.eps, attack=attack.describe(), attack_steps=attack.effective_steps,
                                  examples_per_s=round(rate, 1), **fields)

    def end_run(self, reason: str, save: Callable[[], object], signals: SignalFlag, *,
                measure: Callable[[Callable[[], bool]], bool] | None = None,
                summary: Callable[[], dict] | None = None) -> dict:
        """How every run ends: ``save`` the last checkpoint, measure the final model on the evaluation
        slice (``measure``, default :meth:`measure_final`), then write the summary, with the loop's own
        ``summary()`` fields.

        The checkpoint comes first, so a second Ctrl-C, a kill or a failure during a long final
        evaluation loses no training. A run stopped by a signal skips the evaluation, and a signal
        during it cuts it short; the summary's ``final_evaluation`` says which. A measurement the
        checkpoint lacks is saved again with it, so a resume carries on the whole record (the best
        robust accuracy, the time to target)."""
        save()
        recorded = self.state.last_eval
        if reason.startswith("signal"):
            self.final_evaluation = f"skipped ({reason})"
        elif (measure or self.measure_final)(signals.stop_requested):
            self.final_evaluation = "measured"
        else:
            self.final_evaluation = f"interrupted (signal {signals.name()})"
        if self.state.last_eval is not recorded:
            save()
        return self.finish(reason, extra_summary=summary() if summary else None)

    def measure_final(self, interrupted: Callable[[], bool]) -> bool:
        """Measure the model of the current version unless the last evaluation did; False if
        ``interrupted()`` cut it short."""
        last = self.state.last_eval
        if last is not None and last["version"] == self.version:
            return True
        return self.measure_now(interrupted=interrupted) is not None

    def save(self, extra: dict | None = None, extra_state: dict | None = None) -> Path:
        # A NaN model never replaces a good checkpoint (nor makes the rotation delete one).
        self.check_finite()
        state = {**self.state.saved(self.elapsed()), **(extra_state or {})}
        if self.average:  # model/ holds the average, which readers want; a resume needs both
            extra = {**(extra or {}), LIVE_WEIGHTS: flat_state(self.model).cpu().numpy()}
        return self.manager.save(self.version, model_name=self.cfg.model, model_args=self.model_args,
                                 config=self.cfg.to_dict(), state=state, model=self.graded_model,
                                 optimizer=self.optimizer, rng=capture_rng_state(), extra=extra)

    def finish(self, reason: str, extra_summary: dict | None = None) -> dict:
        summary = {"stop_reason": reason, "version": self.version, "examples_seen": self.state.examples_seen,
                   "elapsed": round(self.elapsed(), 3), "time_to_target": self.state.time_to_target,
                   "target_robust_acc": self.cfg.target_robust_acc or None, "last_eval": self.state.last_eval,
                   "best_robust_acc": self.state.best_robust_acc,
                   **({"final_evaluation": self.final_evaluation} if self.final_evaluation else {}),
                   **(extra_summary or {})}
        self.metrics.write("end", **summary)
        rundir.write_json(self.run_dir / "summary.json", summary)
        self.close()
        return summary

    def close(self) -> None:
        """Close the metrics log and give up the run's locks (idempotent): at the end, or when the
        run fails, so a caller in the same process can resume it."""
        if self.metrics is not None:
            self.metrics.close()
        self.manager.close()
        if self.lock is not None:
            self.lock.release()


class StaleRing:
    """The model states of the last S+1 versions, to attack with the state from S versions ago."""

    def __init__(self, staleness: int):
        self.ring: collections.deque[torch.Tensor] = collections.deque(maxlen=staleness + 1)

    def push(self, model: torch.nn.Module) -> None:
        self.ring.append(flat_state(model))

    def oldest(self) -> torch.Tensor:
        return self.ring[0]

    def staleness(self) -> int:
        return len(self.ring) - 1

    def to_array(self) -> np.ndarray:
        return torch.stack(list(self.ring)).cpu().numpy()

    def load_array(self, array: np.ndarray) -> None:
        self.ring.clear()
        self.ring.extend(torch.from_numpy(np.ascontiguousarray(row)) for row in array)


def train_single(setup: RunSetup, *, show_progress: bool = True, threads: ThreadChoice | None = None) -> dict:
    """The classic loop: attack the batch with the current (or an S-versions-old) model, step.

    SIGTERM, SIGUSR1 and SIGINT stop it as they stop the parameter server: a checkpoint, the
    summary, exit 0, and ``--resume`` continues the run. ``threads``: the thread count the caller
    has already set (``psadv train`` does, for its start-up line), else chosen here.
    """
    signals = SignalFlag().install()
    try:
        return _train_single(setup, signals, show_progress, threads)
    finally:
        signals.restore()
        if setup.lock is not None:  # a run that failed half-way: its files stay, its lock goes
            setup.lock.release()


def _train_single(setup: RunSetup, signals: SignalFlag, show_progress: bool, threads: ThreadChoice | None) -> dict:
    cfg = setup.cfg
    trainer = None
    try:  # start-up: a failure here leaves no half-made run directory behind
        if threads is None:
            threads = set_threads(cfg.threads)
            if threads.warning:
                print(threads.warning, file=sys.stderr)
        device = pick_device(cfg.device)
        if warning := precision_warning(cfg.precision, device):
            print(warning, file=sys.stderr)
        train_set = load_dataset(cfg.dataset, "train", cfg.data_dir or None)
        x_train, y_train = torch.tensor(train_set.x), torch.tensor(train_set.y)
        stream = BatchStream(np.arange(len(train_set)), cfg.batch_size, seed=cfg.seed)
        ckpt = setup.checkpoint
        if ckpt is not None:  # checked before the trainer writes into the run directory
            with restoring(ckpt.path):
                stream.restore(ckpt.state["data_stream"])
        trainer = Trainer(setup, device=device, train_size=len(train_set), stop_requested=signals.stop_requested)
        memory = PerturbationMemory(len(train_set), train_set.x.shape[1:]) if cfg.reuse_perturbations else None
        ring = StaleRing(cfg.emulate_staleness) if cfg.emulate_staleness else None
        separate = ring is not None or cfg.emulate_attackers > 0
        attack_model = (training_layout(build_model(cfg.model, **setup.model_args).to(device), cfg.precision)
                        if separate else trainer.model)
        emulation = (Emulation(cfg, trainer.model, attack_model, trainer.version) if cfg.emulate_attackers
                     else None)
        gradient_pushes = (GradientPushes.of(trainer) if emulation is not None and emulation.mode == "gradients"
                           else None)
        if ckpt is not None:
            with restoring(ckpt.path):
                if ckpt.rng:
                    restore_rng_state(ckpt.rng)
                if ring and "stale_ring" in ckpt.extra:
                    ring.load_array(ckpt.extra["stale_ring"])
                if emulation:
                    emulation.restore(ckpt.state.get("emulation"), ckpt.extra)
                if memory is not None and "perturbations" in ckpt.extra:
                    memory.load_arrays(ckpt.extra)
        trainer.start()
    except BaseException:
        if setup.lock is not None:  # undone under the lock, which the trainer's close() gives up
            setup.lock.abandon()
        if trainer is not None:
            trainer.close()
        raise

    try:
        def stop_reason() -> str | None:
            return f"signal {signals.name()}" if signals.signum else trainer.stop_reason()

        window = _window()
        bar = ProgressBar(trainer, "train", show_progress)
        reason = stop_reason()
        while reason is None:
            position = stream.state()
            idx = torch.from_numpy(stream.next())
            x = torch.from_numpy(augment_batch(cfg.augment, x_train[idx].numpy(), cfg.seed, 0, position)).to(device)
            y = y_train[idx].to(device)
            attack = trainer.attack()
            if ring:
                ring.push(trainer.model)
                load_flat_state_(attack_model, ring.oldest())
            if emulation:
                emulation.attack_model_for_next_batch(trainer.version)
            with trainer.autocast():
                x_adv = perturb(attack_model, x, y, attack, start=memory.starts(idx, x, attack) if memory else None)
            fresher = emulation.model_to_refine_against() if emulation else None
            if fresher is not None and attack.eps > 0:  # --refine-on attackers: the attacker's refinement
                with trainer.autocast():
                    x_adv = refine(fresher, x, y, schedules.refine_attack(attack, cfg.refine_steps,
                                                                          cfg.refine_step_ratio), start=x_adv)
            if memory is not None:  # what the attacker made: under MPI the server's refinement stays with it
                memory.remember(idx, x, x_adv)
            stale = ring.staleness() > 0 if ring else emulation is not None and emulation.push_tau > 0
            if cfg.refine_steps and cfg.refine_on == "server" and stale:
                with trainer.autocast():
                    x_adv = refine(trainer.model, x, y, schedules.refine_attack(attack, cfg.refine_steps,
                                                                                  cfg.refine_step_ratio), start=x_adv)
            if gradient_pushes is not None:  # the virtual attacker's gradient, applied as the server would
                out = _emulated_gradient_push(trainer, attack_model, emulation, gradient_pushes, x_adv, y, x, attack)
            else:
                out = trainer.step(x_adv, y, clean=x)
            if emulation:
                emulation.applied(trainer.version)
            window["examples"] += len(y)
            window["loss"] += out["loss"]
            window["acc"] += out["acc"]
            window["n"] += 1
            if out["grad_align"] is not None:
                window["align"].append(out["grad_align"])
            if not out.get("advanced", True):  # --accumulate: a push taken in, no new version yet
                reason = stop_reason()
                continue
            bar.advanced()

            if trainer.due(cfg.log_every):
                now = time.perf_counter()
                rate = window["examples"] / max(now - window["t"], 1e-9)
                trainer.log_train(lr=out["lr"], attack=attack, rate=rate, epoch=stream.epoch,
                                  loss=window["loss"] / window["n"], adv_acc=window["acc"] / window["n"],
                                  **grad_align_field(window["align"]),
                                  **(emulation.window_row() if emulation else
                                     {"staleness": ring.staleness() if ring else 0}))
                bar.show(rate)
                window = _window(now)
            reason = stop_reason()
            if trainer.due(cfg.eval_every) and reason is None:
                trainer.measure_now(interrupted=signals.stop_requested)
                bar.show()
                reason = stop_reason()
            if trainer.due(cfg.checkpoint_every) and reason is None:
                _save_single(trainer, stream, ring, emulation, memory)
        bar.close()
        return trainer.end_run(reason, lambda: _save_single(trainer, stream, ring, emulation, memory), signals,
                               summary=emulation.summary if emulation else None)
    except BaseException:  # diverged, disk full, interrupted: the files stay, the locks go
        trainer.close()
        raise


def _emulated_gradient_push(trainer: Trainer, attack_model: torch.nn.Module, emulation: Emulation,
                            pushes: GradientPushes, x_adv: torch.Tensor, y: torch.Tensor, clean: torch.Tensor,
                            attack) -> dict:
    """What an attacker of ``--push gradients`` computes (psadv.attacker), on the emulated attacker's
    snapshot, then the server's use of it; the batch's loss and accuracy are the attacker's."""
    cfg = trainer.cfg
    attack_model.train()
    with trainer.autocast():
        loss, logits, penalty = training_loss(attack_model, x_adv, y, clean=clean, weight=cfg.grad_align,
                                              eps=attack.eps, norm=attack.norm)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise trainer.diverged(f"the training loss is {loss_value}")
    grads = torch.autograd.grad(loss, list(attack_model.parameters()))
    pushes.sent(emulation.push.version, emulation.snapshot_of_push())
    advanced = pushes.apply([g.float() for g in grads], [b.detach().float() for b in float_buffers(attack_model)],
                            len(y), emulation.push.version, emulation.lr_scale)
    return {"loss": loss_value, "acc": (logits.argmax(1) == y).float().mean().item(), "advanced": advanced,
            "grad_align": None if penalty is None else penalty.item(), "lr": trainer.optimizer.param_groups[0]["lr"]}


def _window(start: float | None = None) -> dict:
    """The single-process loop's sums between two train rows."""
    return {"t": time.perf_counter() if start is None else start, "examples": 0, "loss": 0.0, "acc": 0.0, "n": 0,
            "align": []}


def grad_align_field(penalties: list[float]) -> dict:
    """A train row's ``grad_align``: the window's mean GradAlign penalty, 1 − the mean cosine of the
    input gradients (near 0: aligned; near 1: unrelated), when the window computed any."""
    return {"grad_align": round(sum(penalties) / len(penalties), 5)} if penalties else {}


def _save_single(trainer: Trainer, stream: BatchStream, ring: StaleRing | None,
                 emulation: Emulation | None, memory: PerturbationMemory | None) -> Path:
    extra = {"stale_ring": ring.to_array()} if ring else emulation.extra() if emulation else {}
    if memory is not None:
        extra.update(memory.to_arrays())
    state = {"data_stream": stream.state(), **({"emulation": emulation.state()} if emulation else {})}
    return trainer.save(extra=extra, extra_state=state)


class ProgressBar:
    """The progress bar of both loops: versions, with examples/s and the last robust accuracy.

    Under a time budget the bar runs over the run's progress (:meth:`Trainer.progress`: the larger
    of the time and version fractions), so it shows the share done and the time left; the version
    count moves into its text."""

    SCALE = 1000  # steps of the bar under a time budget

    def __init__(self, trainer: Trainer, desc: str, show: bool, file=None):
        self.trainer = trainer
        self.timed = bool(trainer.cfg.time_budget)
        self.text = ""
        if self.timed:
            self.bar = tqdm(total=self.SCALE, initial=self._position(), desc=desc, disable=not show,
                            dynamic_ncols=True, file=file,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} left{postfix}")
            self._postfix()
        else:
            self.bar = tqdm(total=trainer.total_versions or None, initial=trainer.version, unit="v", desc=desc,
                            disable=not show, dynamic_ncols=True, file=file)

    def _position(self) -> int:
        return min(self.SCALE, int(self.trainer.progress() * self.SCALE))

    def _postfix(self) -> None:
        version = f"v{self.trainer.version}"
        self.bar.set_postfix_str(f"{version} {self.text}" if self.text else version, refresh=False)

    def advanced(self) -> None:
        if self.timed:
            self._postfix()
            self.bar.update(self._position() - self.bar.n)
        else:
            self.bar.update(1)

    def show(self, rate: float | None = None) -> None:
        """Refresh the text: ``rate`` examples/s (after a train row), the last robust accuracy."""
        last = self.trainer.state.last_eval
        parts = [f"{rate:,.0f} ex/s"] if rate else []
        if last:
            parts.append(f"robust {last['robust_acc']:.1%} @v{last['version']}")
        self.text = " ".join(parts)
        if self.timed:
            self._postfix()
            self.bar.refresh()
        else:
            self.bar.set_postfix_str(self.text)

    def close(self) -> None:
        self.bar.close()


def adversary_line(cfg: Config) -> str:
    """The training adversary in words, for the start-up line: what the flags, the config file,
    the dataset's recipe and the defaults came to."""
    if cfg.attack == "none" or cfg.eps == 0:
        return "adversary: none (clean training)"
    name = f"PGD-{cfg.attack_steps}" if cfg.attack == "pgd" else cfg.attack.upper()
    if cfg.attack == "pgd" and cfg.attack_steps_schedule:
        name = f"PGD (steps {cfg.attack_steps_schedule})"
    text = f"adversary: {name} {cfg.norm} eps={cfg.eps:g}"
    text += f" step={cfg.attack_step_ratio:g}ε" if cfg.attack_step_ratio else ""  # else the attack's published step
    if cfg.attack_restarts > 1:
        text += f" x{cfg.attack_restarts} restarts"
    text += f", GradAlign λ={cfg.grad_align:g}" if cfg.grad_align else ""
    text += ", reused perturbations" if cfg.reuse_perturbations else ""
    return text + (", bfloat16 arithmetic" if cfg.precision == "bf16" else "")


def budget_line(cfg: Config) -> str:
    """What a time budget covers, for the start-up line: the training loop's wall-clock time
    (periodic evaluations and checkpoints included), not start-up nor the final evaluation."""
    if not cfg.time_budget:
        return ""
    return (f"time budget {cfg.time_budget:g}s of training, periodic evaluations included (start-up and the "
            "final evaluation come on top)")


def summary_line(summary: dict) -> str:
    text = f"stopped ({summary['stop_reason']}) at version {summary['version']} after {summary['elapsed']:.0f}s"
    last = summary.get("last_eval")
    final = summary.get("final_evaluation", "")
    if final.startswith("interrupted"):
        text += f"; final evaluation {final}"
    if last:
        text += (f"; clean {last['clean_acc']:.2%}, robust {last['robust_acc']:.2%} "
                 f"({last['attack']}, {last['examples']} test examples"
                 + (f", version {last['version']}" if last["version"] != summary["version"] else "") + ")")
    else:
        text += "; not evaluated"
    if summary.get("time_to_target") is not None:
        text += f"; reached target {summary['target_robust_acc']:.0%} after {summary['time_to_target']:.0f}s"
    return text
