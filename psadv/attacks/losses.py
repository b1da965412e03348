"""Per-example attack losses (higher = closer to misclassified), by name in :data:`LOSSES`."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: best wrong logit minus true logit (positive = misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return wrong - true


def _sorted_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits.sort(dim=1, descending=True).values


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020): the margin divided by the spread of the top
    logits, so rescaling the logits (a common form of gradient masking) does not change it."""
    top = _sorted_logits(logits)
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: how far logit ``target`` is above the true one, scale-free (positive = fooled
    towards ``target``). Needs at least four classes."""
    top = _sorted_logits(logits)
    true = logits.gather(1, y[:, None]).squeeze(1)
    aimed = logits.gather(1, target[:, None]).squeeze(1)
    return (aimed - true) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


LOSSES = {"ce": cross_entropy_loss, "margin": margin_loss, "dlr": dlr_loss}
