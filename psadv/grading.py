"""Clean and robust accuracy of a model under a cascade of attacks, batched.

:func:`prepare_evaluation` and :meth:`Evaluation.run` are the one evaluation of a model on its test
set behind ``psadv eval`` and ``psadv.evaluate``; the rest grades any examples.

:class:`AccuracyJob` works in pieces (one batch per :meth:`AccuracyJob.step`), so the parameter
server can interleave an evaluation with training and keep consuming the attackers' pushes;
:func:`measure_accuracy` runs one to the end. A job given ``stop`` ends within one attack iteration
of ``stop()`` turning true (:mod:`psadv.stop`): it is then :attr:`AccuracyJob.done`, records nothing
(:meth:`AccuracyJob.result` is None) and :attr:`AccuracyJob.stopped` says why.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import stop as _stop
from .attacks import Attack
from .attacks.suite import (EvalAttack, EvalRun, EvalSettings, PgdFamily, describe_cascade, masking_gap, resolve,
                            skip_after_gate)
from .config import Config, check_eps, parse_number, parse_norm
from .data import changed_data_warning, dataset_info, load_dataset
from .devices import set_threads
from .threads import ThreadChoice


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


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
                 attack: Attack | EvalAttack | Sequence[EvalAttack], *, batch_size: int = EvalRun.batch_size,
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
                     attack: Attack | EvalAttack | Sequence[EvalAttack], *, batch_size: int = EvalRun.batch_size,
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


@dataclasses.dataclass
class Evaluation:
    """A model, its test examples and the cascade that grades them, checked and loaded by
    :func:`prepare_evaluation`; :meth:`run` attacks. torch's threads are the evaluation's from
    preparing until :meth:`run` returns, then the caller's again."""

    model: nn.Module
    cascade: list[EvalAttack]
    x: torch.Tensor
    y: torch.Tensor
    dataset: str
    data_dir: str | None
    classes: int
    test_size: int  # the whole test split; ``len(y)`` of it are graded
    model_name: str
    version: int | None
    batch_size: int
    device: torch.device | str
    seed: int
    threads: ThreadChoice
    threads_before: int

    @property
    def examples(self) -> int:
        return len(self.y)

    def run(self, *, progress: bool = False, stop: Callable[[], bool] | None = None) -> dict:
        """:func:`evaluation_record` of the cascade's grade; :class:`psadv.stop.Stopped` if ``stop()``
        turned true on the way (nothing graded)."""
        try:
            result = measure_accuracy(self.model, self.x, self.y, self.cascade, batch_size=self.batch_size,
                                      device=self.device, progress=progress, seed=self.seed, stop=stop)
        finally:
            torch.set_num_threads(self.threads_before)
        return evaluation_record(result, self.cascade, dataset=self.dataset, model=self.model_name,
                                 version=self.version)


def prepare_evaluation(model: nn.Module, *, recorded: Mapping, model_name: str, version: int | None,
                       device: torch.device | str, dataset: str | None = None, data_dir=None, eps=None,
                       norm: str | None = None, attack: str | None = EvalRun.attack, options: Mapping | None = None,
                       examples: int | None = EvalRun.examples, batch_size: int = EvalRun.batch_size,
                       seed: int = EvalRun.seed, threads: int = EvalRun.threads, check_data: bool = False,
                       spell: Callable[[str], str] = str, warn: Callable[[str], None] = _stderr) -> Evaluation:
    """Everything ``psadv eval`` and ``psadv.evaluate`` check and load before minutes of attacking.

    ``recorded`` is what the model's file says of its training (``dataset``, ``data_dir``, ``eps``,
    ``norm``, ``data_md5``; empty for a bare module): the dataset, ε, norm and data directory the
    caller leaves out (None) are the recorded ones, else :class:`psadv.Config`'s. ``options`` are the
    attacks' :data:`psadv.attacks.suite.OPTIONS` (None: not chosen), checked against the cascade
    ``attack`` (see :func:`psadv.attacks.suite.resolve`). ``eps`` and a ``step_size`` option may be
    fractions such as ``"8/255"``. ``check_data``: warn when an npz/HDF5 file is not the one the
    model trained on. ``spell`` names an option as the caller's user wrote it, in errors; ``warn``
    prints a warning line. ConfigError, DataError: one line."""
    defaults = Config()
    dataset = dataset or recorded.get("dataset") or defaults.dataset
    eps = (parse_number(eps, spell("eps")) if eps is not None else float(recorded["eps"]) if "eps" in recorded
           else defaults.eps)
    norm = parse_norm(norm or recorded.get("norm") or defaults.norm, spell("norm"))
    options = dict(options or {})
    if options.get("step_size") is not None:
        options["step_size"] = parse_number(options["step_size"], spell("step_size"))
    data_dir = data_dir or recorded.get("data_dir") or None
    info = dataset_info(dataset, data_dir)
    check_eps(eps, norm, math.prod(info.shape), option=spell("eps"))
    cascade = resolve(attack, options, norm=norm, eps=eps, classes=info.num_classes)
    test = load_dataset(dataset, "test", data_dir)
    changed = changed_data_warning(dataset, data_dir, recorded.get("data_md5", "")) if check_data else None
    n = min(examples or len(test), len(test))
    before = torch.get_num_threads()
    chosen = set_threads(threads)
    try:
        for line in (chosen.warning, changed):
            if line:
                warn(line)
        model = model.to(device)
    except BaseException:
        torch.set_num_threads(before)
        raise
    return Evaluation(model=model, cascade=cascade, x=torch.tensor(test.x[:n]), y=torch.tensor(test.y[:n]),
                      dataset=dataset, data_dir=data_dir, classes=info.num_classes, test_size=len(test),
                      model_name=model_name, version=version, batch_size=batch_size, device=device, seed=seed,
                      threads=chosen, threads_before=before)
