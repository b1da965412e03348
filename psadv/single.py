"""The single-process trainer: attack each batch, then step on it (``psadv train`` without MPI).

A peer of :mod:`psadv.server`: both drive :class:`psadv.training.Trainer`. :func:`_loop` is the
algorithm, top to bottom; the bookkeeping sits beside it: which model attacks a batch when the
attacker lags the trainer (:class:`Lag`: ``--emulate-staleness``, ``--emulate-attackers``), the
sums behind a train row (:class:`Window`), and the start-up, batches and checkpoints of one run
(:class:`SingleRun`).
"""

from __future__ import annotations

import collections
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import schedules
from .attacks import PerturbationMemory, perturb, refine
from .augment import augment_batch
from .checkpoint.codec import restore_rng_state
from .checkpoint.restore import restoring
from .config import Config
from .console import ProgressBar
from .data import BatchStream, load_dataset
from .devices import pick_device, precision_warning, set_threads, training_layout
from .emulate import Emulation
from .gradalign import training_loss
from .gradpush import GradientPushes
from .metrics import grad_align_field
from .models import build_model, flat_state, float_buffers, load_flat_state_
from .pushmodes import examples_per_step, push_mode
from .runsetup import RunSetup
from .stop import SignalFlag
from .threads import ThreadChoice
from .training import Trainer


def train_single(setup: RunSetup, *, show_progress: bool = True, threads: ThreadChoice | None = None) -> dict:
    """The classic loop: attack the batch with the current (or an S-versions-old) model, step.

    SIGTERM, SIGUSR1 and SIGINT stop it as they stop the parameter server: a checkpoint, the
    summary, exit 0, and ``--resume`` continues the run. ``threads``: the thread count the caller
    has already set (``psadv train`` does, for its start-up line), else chosen here.
    """
    signals = SignalFlag().install()
    try:
        run = SingleRun.start(setup, signals, threads)
        try:
            return _loop(run, ProgressBar(run.trainer, "train", show_progress))
        except BaseException:  # diverged, disk full, interrupted: the files stay, the locks go
            run.trainer.close()
            raise
    finally:
        signals.restore()
        if setup.lock is not None:  # a run that failed half-way: its files stay, its lock goes
            setup.lock.release()


def _loop(run: SingleRun, bar: ProgressBar) -> dict:
    """Attack, then step, until a budget, the target or a signal stops the run; then end it."""
    trainer, lag, memory, cfg = run.trainer, run.lag, run.memory, run.trainer.cfg
    window = Window()
    reason = run.stop_reason()
    while reason is None:
        idx, x, y = run.next_batch()
        attack = trainer.training_attack()
        attacker = lag.attacker()  # the live model, the one of S versions ago, or an emulated attacker's
        with trainer.autocast():
            x_adv = perturb(attacker, x, y, attack, start=memory.starts(idx, x, attack) if memory else None)
        fresher = lag.refines_against()
        if fresher is not None and attack.eps > 0:  # --refine-on attackers: the attacker's refinement
            x_adv = _refine(trainer, fresher, x, y, attack, x_adv)
        if memory is not None:  # what the attacker made: under MPI the server's refinement stays with it
            memory.remember(idx, x, x_adv, attack)
        if cfg.refine_steps and cfg.refine_on == "server" and lag.stale():  # docs/design/staleness.md
            x_adv = _refine(trainer, trainer.model, x, y, attack, x_adv)
        out = lag.step(x_adv, y, x, attack)  # the trainer's step, or an emulated attacker's gradient push
        window.add(out, len(y))
        if not out.get("advanced", True):  # --accumulate: a push taken in, no new version yet
            reason = run.stop_reason()
            continue
        bar.advanced()
        if trainer.due(cfg.log_every):
            window = run.log_train(window, out["lr"], attack, bar)
        reason = run.periodic(bar)
    bar.close()
    return trainer.end_run(reason, run.save, run.signals, summary=lag.summary())


def _refine(trainer: Trainer, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attack,
            x_adv: torch.Tensor) -> torch.Tensor:
    """``--refine-steps`` more PGD steps on ``x_adv``, against ``model``."""
    cfg = trainer.cfg
    with trainer.autocast():
        return refine(model, x, y, schedules.refine_attack(attack, cfg.refine_steps, cfg.refine_step_ratio),
                      start=x_adv)


class SingleRun:
    """One process's run: its trainer, batches, lagging attacker and reused perturbations."""

    def __init__(self, trainer: Trainer, signals: SignalFlag, stream: BatchStream, x_train: torch.Tensor,
                 y_train: torch.Tensor, lag: Lag, memory: PerturbationMemory | None):
        self.trainer, self.signals, self.stream = trainer, signals, stream
        self.x_train, self.y_train = x_train, y_train
        self.lag, self.memory = lag, memory

    @classmethod
    def start(cls, setup: RunSetup, signals: SignalFlag, threads: ThreadChoice | None) -> SingleRun:
        """Build the run and restore its checkpoint; a failure here leaves no half-made run directory behind."""
        cfg = setup.cfg
        trainer = None
        try:
            if threads is None:
                threads = set_threads(cfg.threads)
                if threads.warning:
                    print(threads.warning, file=sys.stderr)
            device = pick_device(cfg.device)
            if warning := precision_warning(cfg.precision, device):
                print(warning, file=sys.stderr)
            train_set = load_dataset(cfg.dataset, "train", cfg.data_dir or None)
            stream = BatchStream(np.arange(len(train_set)),
                                 examples_per_step(cfg.batch_size, cfg.push, cfg.emulate_attackers), seed=cfg.seed)
            ckpt = setup.checkpoint
            if ckpt is not None:  # checked before the trainer writes into the run directory
                with restoring(ckpt.path):
                    stream.restore(ckpt.state["data_stream"])
            trainer = Trainer(setup, device=device, train_size=len(train_set), stop_requested=signals.stop_requested)
            memory = PerturbationMemory(len(train_set), train_set.x.shape[1:]) if cfg.reuse_perturbations else None
            lag = Lag(cfg, trainer, setup.model_args, device)
            if ckpt is not None:
                with restoring(ckpt.path):
                    if ckpt.rng:
                        restore_rng_state(ckpt.rng)
                    lag.restore(ckpt)
                    if memory is not None and "perturbations" in ckpt.extra:
                        memory.load_arrays(ckpt.extra)
            trainer.start()
        except BaseException:
            if setup.lock is not None:  # undone under the lock, which the trainer's close() gives up
                setup.lock.abandon()
            if trainer is not None:
                trainer.close()
            raise
        return cls(trainer, signals, stream, torch.tensor(train_set.x), torch.tensor(train_set.y), lag, memory)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next batch's indices, augmented examples (keyed by its position) and labels."""
        cfg, device = self.trainer.cfg, self.trainer.device
        position = self.stream.state()
        idx = torch.from_numpy(self.stream.next())
        x = torch.from_numpy(augment_batch(cfg.augment, self.x_train[idx].numpy(), cfg.seed, 0, position)).to(device)
        return idx, x, self.y_train[idx].to(device)

    def stop_reason(self) -> str | None:
        return f"signal {self.signals.name()}" if self.signals.signum else self.trainer.stop_reason()

    def log_train(self, window: Window, lr: float, attack, bar: ProgressBar) -> Window:
        """Write the window's train row; the next window starts now."""
        now = time.perf_counter()
        rate = window.examples / max(now - window.t, 1e-9)
        self.trainer.log_train(lr=lr, attack=attack, rate=rate, epoch=self.stream.epoch, **window.fields(),
                               **self.lag.row())
        bar.show(rate)
        return Window(now)

    def periodic(self, bar: ProgressBar) -> str | None:
        """After a version: the periodic evaluation and checkpoint unless the run stops; why it stops."""
        trainer, cfg = self.trainer, self.trainer.cfg
        reason = self.stop_reason()
        if trainer.due(cfg.eval_every) and reason is None:
            trainer.measure_now(interrupted=self.signals.stop_requested)
            bar.show()
            reason = self.stop_reason()
        if trainer.due(cfg.checkpoint_every) and reason is None:
            self.save()
        return reason

    def save(self) -> Path:
        """A checkpoint: the trainer's, with the data position, the lag's state and the perturbations."""
        extra = self.lag.extra()
        if self.memory is not None:
            extra.update(self.memory.to_arrays())
        state = {"data_stream": self.stream.state(), **self.lag.state()}
        return self.trainer.save(extra=extra, extra_state=state)


class Window:
    """The single-process loop's sums between two train rows."""

    def __init__(self, start: float | None = None):
        self.t = time.perf_counter() if start is None else start
        self.examples, self.loss, self.acc, self.n = 0, 0.0, 0.0, 0
        self.align: list[float] = []

    def add(self, out: dict, examples: int) -> None:
        self.examples += examples
        self.loss += out["loss"]
        self.acc += out["acc"]
        self.n += 1
        if out["grad_align"] is not None:
            self.align.append(out["grad_align"])

    def fields(self) -> dict:
        """The train row's means over the window."""
        return {"loss": self.loss / self.n, "adv_acc": self.acc / self.n, **grad_align_field(self.align)}


class Lag:
    """Which model attacks each batch, and how its examples come back, when the attacker lags the
    trainer: the model of S versions ago (``--emulate-staleness``, :class:`StaleRing`), or an
    emulated attacker's snapshot (``--emulate-attackers``, :class:`psadv.emulate.Emulation`, whose
    ``--push gradients`` the server's way, :class:`psadv.gradpush.GradientPushes`). Neither: the
    live model attacks and the trainer steps."""

    def __init__(self, cfg: Config, trainer: Trainer, model_args: dict, device: torch.device):
        self.trainer = trainer
        self.ring = StaleRing(cfg.emulate_staleness) if cfg.emulate_staleness else None
        # synchronous attackers all compute with the current version: no lag, only a larger batch
        # (pushmodes.examples_per_step)
        self.synchronous = push_mode(cfg.push).synchronous and cfg.emulate_attackers > 0
        emulating = cfg.emulate_attackers > 0 and not self.synchronous
        separate = self.ring is not None or emulating
        self.model = (training_layout(build_model(cfg.model, **model_args).to(device), cfg.precision)
                      if separate else trainer.model)
        self.emulation = Emulation(cfg, trainer.model, self.model, trainer.version) if emulating else None
        self.attackers = cfg.emulate_attackers
        self.pushes = (GradientPushes.of(trainer) if self.emulation is not None and self.emulation.mode == "gradients"
                       else None)

    def restore(self, ckpt) -> None:
        if self.ring and "stale_ring" in ckpt.extra:
            self.ring.load_array(ckpt.extra["stale_ring"])
        if self.emulation:
            self.emulation.restore(ckpt.state.get("emulation"), ckpt.extra)

    def attacker(self) -> torch.nn.Module:
        """The model that attacks the next batch."""
        if self.ring:
            self.ring.push(self.trainer.model)
            load_flat_state_(self.model, self.ring.oldest())
        if self.emulation:
            self.emulation.attack_model_for_next_batch(self.trainer.version)
        return self.model

    def refines_against(self) -> torch.nn.Module | None:
        """With ``--refine-on attackers``: the emulated attacker's fresher model to refine against."""
        return self.emulation.model_to_refine_against() if self.emulation else None

    def stale(self) -> bool:
        """Whether the batch's attacker was older than the model it trains."""
        return self.ring.staleness() > 0 if self.ring else self.emulation is not None and self.emulation.push_tau > 0

    def step(self, x_adv: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, attack) -> dict:
        """The trainer's step on the examples, or the emulated attacker's gradient push, applied as the
        server would."""
        if self.pushes is not None:
            out = _emulated_gradient_push(self.trainer, self.model, self.emulation, self.pushes, x_adv, y, clean,
                                          attack)
        else:
            out = self.trainer.step(x_adv, y, clean=clean)
        if self.emulation:
            self.emulation.applied(self.trainer.version)
        return out

    def row(self) -> dict:
        """The train row's staleness fields."""
        if self.emulation:
            return self.emulation.window_row()
        return {"staleness": self.ring.staleness() if self.ring else 0}

    def extra(self) -> dict:
        """The checkpoint's arrays."""
        return {"stale_ring": self.ring.to_array()} if self.ring else self.emulation.extra() if self.emulation else {}

    def state(self) -> dict:
        """The checkpoint's state keys."""
        return {"emulation": self.emulation.state()} if self.emulation else {}

    def summary(self):
        """The summary's own fields, as a callable for :meth:`psadv.training.Trainer.end_run`."""
        if self.synchronous:
            return lambda: {"emulated_attackers": self.attackers, "push": "sync", "staleness_max": 0}
        return self.emulation.summary if self.emulation else None


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
