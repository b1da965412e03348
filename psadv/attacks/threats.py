"""Threat models: an ε-ball around the clean input, intersected with the pixel range [0, 1].

Each norm is a small class (projection, steepest-ascent step, random start), looked up by name in
:data:`THREATS`; every attack of this package moves through them.
"""

from __future__ import annotations

import abc

import torch

PIXEL_MIN, PIXEL_MAX = 0.0, 1.0


class ThreatModel(abc.ABC):
    """An ε-ball around the clean input, intersected with the valid pixel range."""

    def __init__(self, eps: float):
        self.eps = float(eps)

    @abc.abstractmethod
    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The nearest point of the ball (and pixel range) to ``x_adv``."""

    @abc.abstractmethod
    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float | torch.Tensor) -> torch.Tensor:
        """One ascent step along the norm's steepest direction (unprojected); ``step_size`` is a number
        or a per-example tensor shaped to broadcast over the pixels, e.g. (N, 1, 1, 1)."""

    @abc.abstractmethod
    def random_perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random point of the ball around ``x`` (drawn from ``generator``, default the global one)."""


class LinfThreat(ThreatModel):
    """‖δ‖∞ ≤ ε: sign-gradient steps, clipping projection, uniform random start."""

    def project(self, x_adv, x):
        delta = torch.clamp(x_adv - x, -self.eps, self.eps)
        return torch.clamp(x + delta, PIXEL_MIN, PIXEL_MAX)

    def step(self, x_adv, grad, step_size):
        return x_adv + step_size * grad.sign()

    def random_perturb(self, x, generator=None):
        return self.project(x + torch.empty_like(x).uniform_(-self.eps, self.eps, generator=generator), x)


class L2Threat(ThreatModel):
    """‖δ‖₂ ≤ ε per example: normalised-gradient steps, radial projection, uniform-in-ball start."""

    @staticmethod
    def _norms(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))

    def project(self, x_adv, x):
        delta = x_adv - x
        scale = torch.clamp(self.eps / (self._norms(delta) + 1e-12), max=1.0)
        return torch.clamp(x + delta * scale, PIXEL_MIN, PIXEL_MAX)

    def step(self, x_adv, grad, step_size):
        return x_adv + step_size * grad / (self._norms(grad) + 1e-12)

    def random_perturb(self, x, generator=None):
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / (self._norms(direction) + 1e-12)
        dims = x[0].numel()
        radius = self.eps * torch.rand(x.shape[0], generator=generator, device=x.device) ** (1.0 / dims)
        return self.project(x + direction * radius.view(-1, *([1] * (x.dim() - 1))), x)


THREATS: dict[str, type[ThreatModel]] = {"linf": LinfThreat, "l2": L2Threat}
