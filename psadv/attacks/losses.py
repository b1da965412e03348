"""Per-example attack losses (higher = closer to misclassified), by name in :data:`LOSSES`."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: best wrong logit minus true logit (positive = misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return wrong - true


LOSSES = {"ce": cross_entropy_loss, "margin": margin_loss}
