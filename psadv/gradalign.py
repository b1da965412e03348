"""The training loss, with GradAlign (Andriushchenko & Flammarion, NeurIPS 2020) when asked for.

One-step adversarial training collapses ("catastrophic overfitting") when the model becomes locally
non-linear inside the ε-ball: the input gradient at ``x`` stops pointing where the gradient a little
further inside the ball points, so one signed-gradient step no longer approximates the inner
maximum, and the model learns to defeat that step rather than the perturbations. GradAlign adds

    λ · (1 − mean cos(∇ₓℓ(x, y), ∇ₓℓ(x + η, y))),   η uniform in the ε-ball,

to the cross-entropy of the adversarial examples, so training keeps the gradients inside the ball
aligned. The gradient at ``x`` is a constant (as in the authors' code); the one at ``x + η`` is
differentiated through (double backpropagation). Those two gradients and the second differentiation
are the regulariser's cost, several plain training steps per batch (``scripts/bench_core.py
throughput`` prices it).

Every trainer builds its loss here: the single process, the MPI server (pushes of examples) and the
attackers (pushes of gradients), so the regulariser means the same everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import THREATS


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool) -> torch.Tensor:
    """∇ₓ of the summed cross-entropy at ``x``; with ``create_graph`` it can itself be differentiated."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x], create_graph=create_graph)
    return grad


def grad_align_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                       norm: str = "linf") -> torch.Tensor:
    """1 − the mean cosine between the input gradients at ``x`` and at a uniform random point of the
    ε-ball around it (pixel range kept), differentiable in the model's parameters. Examples where
    either gradient is exactly zero (nothing to align, e.g. a saturated ReLU net) are left out; with
    none left the penalty is zero."""
    g_clean = input_gradient(model, x, y, create_graph=False).flatten(1)
    x_noisy = THREATS[norm](eps).random_perturb(x.detach())
    g_noisy = input_gradient(model, x_noisy, y, create_graph=True).flatten(1)
    norms_clean, norms_noisy = g_clean.norm(dim=1), g_noisy.norm(dim=1)
    keep = (norms_clean > 0) & (norms_noisy > 0)
    if not bool(keep.any()):
        return g_noisy.sum() * 0.0  # zero, but still part of the graph
    cos = (g_clean[keep] * g_noisy[keep]).sum(1) / (norms_clean[keep] * norms_noisy[keep])
    return 1.0 - cos.mean()


def training_loss(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, *, clean: torch.Tensor | None = None,
                  weight: float = 0.0, eps: float = 0.0,
                  norm: str = "linf") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loss a trainer minimises, the logits of ``x_adv`` and the GradAlign penalty (detached; None
    when off): the mean cross-entropy of the adversarial examples, plus ``weight`` ×
    :func:`grad_align_penalty` around their clean originals ``clean`` when ``weight`` > 0. The penalty
    runs in the model's current mode (training mode, as the cross-entropy), so a model with BatchNorm
    updates its running statistics in its passes too, as in the authors' code."""
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y)
    if weight > 0 and eps > 0:
        if clean is None:
            raise ValueError("GradAlign needs the clean examples the adversarial ones were made from")
        penalty = grad_align_penalty(model, clean, y, eps, norm)
        return loss + weight * penalty, logits, penalty.detach()
    return loss, logits, None
