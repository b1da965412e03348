"""Clean and robust accuracy of a model, batched, with the shared attack module."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from tqdm import tqdm

from .attacks import Attack, perturb


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, *, batch_size: int = 500,
             device: torch.device | str = "cpu", progress: bool = False, desc: str = "eval") -> dict:
    """Accuracy on clean inputs and under ``attack`` (worst case over its restarts).

    An example counts as robust only if every restart fails to flip it. Restarts after the first
    attack only the examples still standing, which gives the same number at a fraction of the cost.
    """
    was_training = model.training
    model.eval()
    single = dataclasses.replace(attack, restarts=1)
    n, clean, robust = len(y), 0, 0
    try:
        with tqdm(total=n, desc=desc, unit="ex", disable=not progress, leave=False) as bar:
            for start in range(0, n, batch_size):
                xb = x[start:start + batch_size].to(device)
                yb = y[start:start + batch_size].to(device)
                standing = _correct(model, xb, yb)
                clean += int(standing.sum())
                for _ in range(attack.restarts):
                    idx = standing.nonzero().squeeze(1)
                    if len(idx) == 0:
                        break
                    x_adv = perturb(model, xb[idx], yb[idx], single)
                    standing[idx] = _correct(model, x_adv, yb[idx])
                robust += int(standing.sum())
                bar.update(len(yb))
    finally:
        model.train(was_training)
    return {"examples": n, "clean_acc": clean / n, "robust_acc": robust / n, "attack": attack.describe()}
