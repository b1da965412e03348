"""Each training example's last perturbation, to start its next attack from.

Adversarial perturbations of one example change little from one epoch to the next, so an attack
that starts where the last one ended needs fewer steps to be as strong (Zheng et al. 2020, ATTA;
the replay of "free" adversarial training). The memory is indexed by the example's position in the
training set; an example not seen yet starts as the attack would without memory (its random start).
Perturbations are kept in float16 (half the memory; 1e-3 relative error, well inside any step).
"""

from __future__ import annotations

import numpy as np
import torch

from .pgd import Attack, attacked_count, initial_point
from .threats import THREATS


class PerturbationMemory:
    def __init__(self, size: int, shape: tuple[int, ...]):
        self.delta = torch.zeros((size, *shape), dtype=torch.float16)
        self.seen = torch.zeros(size, dtype=torch.bool)

    def starts(self, idx: torch.Tensor, x: torch.Tensor, attack: Attack) -> torch.Tensor:
        """Start points for the examples ``idx`` (rows of ``x``): their last perturbation, projected
        onto the attack's ball at today's ε, where they have one; the attack's own start elsewhere."""
        fresh = initial_point(attack, x)
        seen = self.seen[idx].to(x.device)
        if not bool(seen.any()):
            return fresh
        ball = THREATS[attack.norm](attack.eps * attack.kind.reach)
        warm = ball.project(x + self.delta[idx].to(x.device, x.dtype), x)
        return torch.where(seen.view(-1, *([1] * (x.dim() - 1))), warm, fresh)

    def remember(self, idx: torch.Tensor, x: torch.Tensor, x_adv: torch.Tensor, attack: Attack) -> None:
        """Keep the perturbations ``attack`` made. Its clean share (the batch's last examples) was
        not attacked: those examples keep what they had, so a later visit that attacks them starts
        from their last perturbation or a random point, not from the clean point."""
        k = attacked_count(len(x), attack.clean_share)
        idx = idx[:k]
        self.delta[idx] = (x_adv[:k] - x[:k]).detach().to("cpu", torch.float16)
        self.seen[idx] = True

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"perturbations": self.delta.numpy(), "perturbations_seen": self.seen.numpy()}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        delta, seen = arrays["perturbations"], arrays["perturbations_seen"]
        if delta.shape != tuple(self.delta.shape) or seen.shape != tuple(self.seen.shape):
            raise ValueError(f"perturbation memory of shape {delta.shape}, expected {tuple(self.delta.shape)}")
        self.delta = torch.from_numpy(np.ascontiguousarray(delta, dtype=np.float16))
        self.seen = torch.from_numpy(np.ascontiguousarray(seen, dtype=np.bool_))
