"""The state both trainers share: :class:`Trainer` owns the model, optimizer, schedules, counters,
periodic evaluation, metrics and checkpoints of one run.

The single-process loop (:mod:`psadv.single`) and the MPI parameter server (:mod:`psadv.server`)
both drive it: one code path for configuration, checkpoints and metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from . import __version__, rundir, schedules
from .averaging import LIVE_WEIGHTS, WeightAverage
from .checkpoint.codec import capture_rng_state
from .checkpoint.restore import restoring
from .checkpoint.rotation import CheckpointManager
from .config import Config
from .data import load_dataset
from .devices import autocast, training_layout
from .errors import TrainingDiverged
from .grading import AccuracyJob
from .gradalign import training_loss
from .metrics import MetricsLog
from .models import build_model, flat_state, float_buffers, load_flat_state_
from .pushmodes import push_mode
from .stop import SignalFlag
from .trackers import open_sinks

if TYPE_CHECKING:
    from .runsetup import RunSetup


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
    """Model, optimizer, schedules, counters, evaluation, metrics and checkpoints of one run.

    ``setup``'s run directory is open (:func:`psadv.runsetup.open_run_dir`): the trainer writes the
    run under its lock, and :meth:`close` gives it up."""

    def __init__(self, setup: RunSetup, *, device: torch.device, train_size: int, role: str = "single",
                 attackers: int = 0, stop_requested: Callable[[], bool] | None = None):
        cfg = self.cfg = setup.cfg
        self.attack_schedule = schedules.AttackSchedule(cfg)
        # what cuts an evaluation short within one attack iteration (psadv/stop.py): the runner's
        # signal flag, so a SIGTERM during a strong evaluation never outlives SLURM's grace period
        self.stop_requested = stop_requested
        self.run_dir = setup.run_dir
        self.lock = setup.lock
        self.device = device
        self.model_args = setup.model_args
        self.model = initial_model(cfg, setup.model_args, device)
        self.optimizer = make_optimizer(cfg, self.model)
        # a version of --push gradients --accumulate K (MPI or emulated) takes K batches, one of
        # --push sync a batch of every attacker: an epoch is still one pass over the training set
        attackers = attackers if role == "server" else cfg.emulate_attackers
        k = push_mode(cfg.push).batches_per_version(cfg.accumulate, attackers) if attackers else 1
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
        # written under the run directory's lock, which open_run_dir took and close() gives up
        self.manager = CheckpointManager(setup.lock, keep=cfg.keep_checkpoints)
        self.metrics: MetricsLog | None = None  # opened by start()
        self.final_evaluation: str | None = None  # what became of the final evaluation (end_run)
        self._clock = time.perf_counter()

    def start(self) -> None:
        """Write config.json and open the metrics log, once the loop has restored the rest of the
        checkpoint's state: a resume refused or failed while starting up leaves an existing run's
        config.json and metrics as they were (and :meth:`psadv.rundir.RunDir.abandon` undoes the rest)."""
        cfg = self.cfg
        metrics_path = self.run_dir / rundir.METRICS
        self.metrics = MetricsLog(metrics_path, open_sinks(
            cfg.log, self.run_dir, existing=rundir.read_metrics(metrics_path) if metrics_path.exists() else [],
            start_version=self.state.version, config=cfg.to_dict()))
        rundir.write_json(self.run_dir / rundir.CONFIG, {"config": cfg.to_dict(), "model_name": cfg.model,
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

    def training_attack(self):
        """The adversary of this moment of training (:class:`psadv.schedules.AttackSchedule`)."""
        return self.attack_schedule.at(self.progress())

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
        attack = self.training_attack() if self.cfg.grad_align else None
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
        ``None`` (a job a stop request cut short, :meth:`psadv.grading.AccuracyJob.result`) records nothing."""
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
        rundir.write_json(self.run_dir / rundir.SUMMARY, summary)
        self.close()
        return summary

    def close(self) -> None:
        """Close the metrics log and give up the run's lock (idempotent): at the end, or when the
        run fails, so a caller in the same process can resume it."""
        if self.metrics is not None:
            self.metrics.close()
        self.lock.release()
