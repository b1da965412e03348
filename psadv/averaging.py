"""An exponential moving average of the weights (``--ema-decay``): the model a run delivers.

The average follows the live weights the optimizer trains; evaluation, the checkpoints' ``model/``
group (so ``psadv eval``, ``psadv export`` and :func:`psadv.load_model`) and the final numbers use
it, while training, the training attack and the MPI attackers keep using the live weights. A
checkpoint of an averaging run also holds the live weights, as ``extra/live_weights``, so a resumed
run continues both exactly.
"""

from __future__ import annotations

import copy

import torch

# The checkpoint's extra/ array of an averaging run's live weights (models.flat_state's order).
LIVE_WEIGHTS = "live_weights"


def ema_weight(version: int, decay: float) -> float:
    """The weight of the newest weights in the average once the model is at ``version`` (≥ 1).

    ``1 - decay``, but more while few versions exist: the decay is capped at (1 + v) / (10 + v)
    (TensorFlow's ``num_updates``), so the random initial weights are forgotten within the first
    few dozen versions however slow the average is.
    """
    return 1.0 - min(decay, (1.0 + version) / (10.0 + version))


class WeightAverage:
    """A copy of a model whose floating-point state (parameters and buffers, BatchNorm statistics
    included) moves toward the live model's by :func:`ema_weight` at every version."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), not {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, live: torch.nn.Module, version: int) -> None:
        """Fold in the live weights of ``version``; integer buffers are copied as they are."""
        weight = ema_weight(version, self.decay)
        for mine, theirs in zip(self.model.state_dict().values(), live.state_dict().values()):
            if mine.is_floating_point():
                mine.lerp_(theirs.to(mine.dtype), weight)
            else:
                mine.copy_(theirs)
