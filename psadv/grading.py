"""Clean and robust accuracy of a model under a cascade of attacks, batched.

:class:`AccuracyJob` works in pieces (one batch per :meth:`AccuracyJob.step`), so the parameter
server can interleave an evaluation with training and keep consuming the attackers' pushes;
:func:`measure_accuracy` runs one to the end. A job given ``stop`` ends within one attack iteration
of ``stop()`` turning true (:mod:`psadv.stop`): it is then :attr:`AccuracyJob.done`, records nothing
(:meth:`AccuracyJob.result` is None) and :attr:`AccuracyJob.stopped` says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import stop as _stop
from .attacks import Attack
from .attacks.suite import EvalAttack, EvalSettings, PgdFamily, describe_cascade, masking_gap, skip_after_gate


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def as_cascade(attack: Attack | EvalAttack | Sequence[EvalAttack]) -> list[EvalAttack]:
    """A list of evaluation attacks from one :class:`Attack` (PGD and its kin), one attack or a list."""
    if isinstance(attack, Attack):
        settings = EvalSettings(norm=attack.norm, eps=attack.eps, steps=attack.steps, restarts=attack.restarts,
                                step_size=attack.step_size, loss=attack.loss)
        return [PgdFamily(settings, attack.name)]
    if isinstance(attack, EvalAttack):
        return [attack]
    return list(attack)


class AccuracyJob:
    """Clean and robust accuracy of ``model`` on ``(x, y)`` under a cascade of attacks, one batch at a time.

    Each attack runs only on the examples the earlier ones left standing, so an example counts as
    robust only if every attack fails on it. With ``gate`` (cheap attacks, e.g. PGD), the gate first
    runs over all examples, then ``attacks`` on its survivors, batched anew; when ``target`` is set
    and the gate's robust accuracy is already below it, ``attacks`` are skipped (see
    :func:`psadv.attacks.suite.skip_after_gate`). With ``seed``, the i-th batch of the job draws its
    random numbers from ``seed + i`` (and leaves the global generator alone), so the result does not
    depend on what ran before or between the batches.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 attack: Attack | EvalAttack | Sequence[EvalAttack], *, batch_size: int = 500,
                 device: torch.device | str = "cpu", seed: int | None = None,
                 gate: Sequence[EvalAttack] = (), target: float = 0.0, stop: Callable[[], bool] | None = None):
        self.model, self.x, self.y = model, x, y
        self.stop, self.stopped = stop, False
        self.batch_size, self.device, self.seed, self.target = batch_size, torch.device(device), seed, target
        self.stages = [list(gate), as_cascade(attack)] if gate else [as_cascade(attack)]
        self.attacks = [a for stage in self.stages for a in stage]
        self.flipped = [0] * len(self.attacks)
        self.seconds = [0.0] * len(self.attacks)
        self.skipped = False
        self.standing = torch.zeros(len(y), dtype=torch.bool)
        self.stage, self.todo, self.cursor, self.batches = 0, torch.arange(len(y)), 0, 0
        self.position = self.clean = 0

    @property
    def done(self) -> bool:
        """Finished, or cut short by ``stop`` (then :attr:`stopped`)."""
        return self.stopped or self.stage >= len(self.stages)

    @property
    def robust(self) -> int:
        return self.clean - sum(self.flipped)

    def step(self) -> int:
        """Attack the next batch of the current stage; returns how many examples it held (0 when
        ``stop`` cut it short: the batch counts for nothing, and the job is :attr:`done`)."""
        if self.stopped:
            return 0
        try:
            with _stop.stoppable(self.stop):
                _stop.check()
                return self._step()
        except _stop.Stopped:
            self.stopped = True
            return 0

    def _step(self) -> int:
        idx = self.todo[self.cursor:self.cursor + self.batch_size]
        xb, yb = self.x[idx].to(self.device), self.y[idx].to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            if self.seed is None:
                self._batch(idx, xb, yb, None)
            else:
                devices = [self.device] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed + self.batches)
                    generator = torch.Generator(self.device).manual_seed(self.seed + self.batches)
                    self._batch(idx, xb, yb, generator)
        finally:
            self.model.train(was_training)
        self.cursor += len(idx)
        self.batches += 1
        if self.cursor >= len(self.todo):
            self._next_stage()
        return len(idx)

    def _batch(self, idx, xb, yb, generator) -> None:
        if self.stage == 0:
            standing = _correct(self.model, xb, yb)
            self.clean += int(standing.sum())
            self.position += len(idx)
        else:
            standing = torch.ones(len(idx), dtype=torch.bool, device=xb.device)
        first = sum(len(s) for s in self.stages[:self.stage])
        for i, attack in enumerate(self.stages[self.stage], start=first):
            live = standing.nonzero().squeeze(1)
            if len(live) == 0:
                break
            started = time.perf_counter()
            x_adv = attack.run(self.model, xb[live], yb[live], generator)
            still = _correct(self.model, x_adv, yb[live])
            self.seconds[i] += time.perf_counter() - started
            self.flipped[i] += int((~still).sum())
            standing[live] = still
        self.standing[idx] = standing.cpu()

    def _next_stage(self) -> None:
        self.stage += 1
        self.todo, self.cursor = self.standing.nonzero().squeeze(1), 0
        if self.stage < len(self.stages) and skip_after_gate(self.robust / max(len(self.y), 1), self.target):
            self.skipped = True
            self.stage = len(self.stages)
        while not self.done and len(self.todo) == 0:  # nothing left to attack
            self.stage += 1

    def result(self) -> dict | None:
        """None for a job that ``stop`` cut short (a part of an evaluation grades nothing); else
        ``clean_acc``, ``robust_acc`` (the worst case over the attacks), ``attack``, ``examples``;
        per attack (``attacks``) the robust accuracy after it and how many examples it flipped;
        ``masking_gap`` (see :func:`psadv.attacks.suite.masking_gap`)."""
        if self.stopped:
            return None
        n = max(self.position, 1)
        ran = len(self.attacks) if not self.skipped else len(self.stages[0])
        rows, robust = [], self.clean
        for i, attack in enumerate(self.attacks):
            robust -= self.flipped[i]
            rows.append({"name": attack.name, "attack": attack.describe(), "black_box": attack.black_box,
                         "settings": attack.used_settings(), "flipped": self.flipped[i],
                         "robust_acc": robust / n if i < ran else None, "seconds": round(self.seconds[i], 3),
                         "skipped": i >= ran})
        text = describe_cascade(self.attacks)
        if self.skipped:
            text += f" (after {describe_cascade(self.stages[0])}: below the target, the rest skipped)"
        return {"examples": self.position, "clean_acc": self.clean / n, "robust_acc": self.robust / n,
                "attack": text, "attacks": rows, "masking_gap": masking_gap(rows, n)}


def measure_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     attack: Attack | EvalAttack | Sequence[EvalAttack], *, batch_size: int = 500,
                     device: torch.device | str = "cpu", progress: bool = False, desc: str = "eval",
                     seed: int | None = None, stop: Callable[[], bool] | None = None) -> dict:
    """Clean and robust accuracy: an :class:`AccuracyJob` run to the end (with a progress bar on request).
    Raises :class:`psadv.stop.Stopped` if ``stop()`` turned true on the way."""
    job = AccuracyJob(model, x, y, attack, batch_size=batch_size, device=device, seed=seed, stop=stop)
    with tqdm(total=len(y), desc=desc, unit="ex", disable=not progress, leave=False) as bar:
        while not job.done:
            bar.update(job.step())
    if job.stopped:
        raise _stop.Stopped
    return job.result()


def evaluation_record(result: dict, attacks: Sequence[EvalAttack], *, dataset: str, model: str, version) -> dict:
    """What ``psadv eval --json`` prints and ``psadv.evaluate`` returns: ``result`` (of
    :meth:`AccuracyJob.result`, each attack's ``settings`` in its row) with the threat model and
    the model named as other tools name them: ``dataset``, ``norm``, ``eps``, ``model`` (its
    architecture), ``version`` (the model's, from its checkpoint; None for a module) and
    ``psadv_version``."""
    from . import __version__

    settings = attacks[0].settings
    return {**result, "dataset": dataset, "norm": settings.norm, "eps": settings.eps, "model": model,
            "version": version, "psadv_version": __version__}
