"""Clean and robust accuracy of a model, batched, with the shared attack module.

:class:`AccuracyJob` works in pieces (one batch per :meth:`AccuracyJob.step`), so the parameter
server can interleave an evaluation with training and keep consuming the attackers' pushes;
:func:`measure_accuracy` runs one to the end.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from tqdm import tqdm

from .attacks import Attack, perturb


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


class AccuracyJob:
    """Clean and robust accuracy of ``model`` on ``(x, y)`` under ``attack``, one batch at a time.

    An example counts as robust only if every restart fails to flip it. Restarts after the first
    attack only the examples still standing, which gives the same number at a fraction of the cost.
    With ``seed``, batch i draws its random starts from ``seed + i`` (and leaves the global
    generator alone), so the result does not depend on what ran before or between the batches.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, *,
                 batch_size: int = 500, device: torch.device | str = "cpu", seed: int | None = None):
        self.model, self.x, self.y, self.attack = model, x, y, attack
        self.batch_size, self.device, self.seed = batch_size, torch.device(device), seed
        self._single = dataclasses.replace(attack, restarts=1)
        self.position = self.clean = self.robust = 0

    @property
    def done(self) -> bool:
        return self.position >= len(self.y)

    def step(self) -> int:
        """Evaluate the next batch; returns how many examples it held."""
        start = self.position
        xb = self.x[start:start + self.batch_size].to(self.device)
        yb = self.y[start:start + self.batch_size].to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            if self.seed is None:
                self._batch(xb, yb)
            else:
                devices = [self.device] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed + start // self.batch_size)
                    self._batch(xb, yb)
        finally:
            self.model.train(was_training)
        self.position += len(yb)
        return len(yb)

    def _batch(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        standing = _correct(self.model, xb, yb)
        self.clean += int(standing.sum())
        for _ in range(self.attack.restarts):
            idx = standing.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x_adv = perturb(self.model, xb[idx], yb[idx], self._single)
            standing[idx] = _correct(self.model, x_adv, yb[idx])
        self.robust += int(standing.sum())

    def result(self) -> dict:
        n = max(self.position, 1)
        return {"examples": self.position, "clean_acc": self.clean / n, "robust_acc": self.robust / n,
                "attack": self.attack.describe()}


def measure_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, *, batch_size: int = 500,
             device: torch.device | str = "cpu", progress: bool = False, desc: str = "eval",
             seed: int | None = None) -> dict:
    """Clean and robust accuracy: an :class:`AccuracyJob` run to the end (with a progress bar on request)."""
    job = AccuracyJob(model, x, y, attack, batch_size=batch_size, device=device, seed=seed)
    with tqdm(total=len(y), desc=desc, unit="ex", disable=not progress, leave=False) as bar:
        while not job.done:
            bar.update(job.step())
    return job.result()
