"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), as AutoAttack runs it.

FAB searches for the *smallest* perturbation that changes the prediction. Each step linearises
``g = logit[target] − logit[true]`` at the current iterate, projects both the iterate and the clean
input onto the hyperplane ``g = 0`` intersected with the pixel box (the minimal-norm move, in closed
form: :func:`project_linf`, :func:`project_l2`), and moves to a convex combination of the two
projections, overshooting by ``ETA``. Whenever the iterate is adversarial it is recorded if it is
the closest one yet and pulled back towards the clean input by ``BETA``.

The targeted version linearises a single logit difference, so each step needs one forward and one
backward pass (the untargeted FAB needs the Jacobian of all logits, one backward per class).
:func:`fab_attack` runs it once per target, the ``n_target_classes`` highest-scoring wrong classes
in turn, on the examples still robust; an example is broken when a run finds an adversarial point
within ε. The first run per target starts at the clean input and each further restart at a random
point at distance ε/2 (AutoAttack's ``FABAttack``; its standard version uses one run per target).

One deliberate difference from the reference loop: an example leaves a run as soon as it has an
adversarial point within ε. The run would only shrink that point further, which cannot change
whether the example is broken, so robust accuracy is the same and broken examples cost nothing more.

Invariants, as for :func:`.pgd.perturb`: the result is in the ε-ball and in [0, 1]; the model is
in eval mode while attacking and its mode is restored; only input gradients are computed
(``torch.autograd.grad``), fresh at every step, so parameter gradients are untouched.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import stop
from ..errors import ConfigError
from .mode import attacking
from .threats import PIXEL_MAX, PIXEL_MIN, THREATS

ALPHA_MAX = 0.1  # largest weight of the clean input's projection in a step (paper, AutoAttack)
ETA = 1.05  # overshoot past the linearised boundary, so that the step usually crosses it (paper)
BETA = 0.9  # pull-back towards the clean input after an adversarial iterate (paper)
RANDOM_START_SCALE = 0.5  # restarts start at distance RANDOM_START_SCALE·ε (AutoAttack's FAB)


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def _norms(flat: torch.Tensor, norm: str) -> torch.Tensor:
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row (0 where a row has none)."""
    return mask.to(torch.uint8).argmax(1)


def _shift_right(t: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``t`` moved one column right per row, ``first`` (one value per row) filling column 0."""
    return torch.cat([first[:, None], t[:, :-1]], dim=1)


def project_linf(p: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest-‖·‖∞ ``d`` with ``<w, d> = −c`` and ``p + d`` in the pixel box.

    Rows are points ``p`` (flattened), hyperplane normals ``w`` and offsets ``c = <w, p> − b``.
    Moving every coordinate by ``ρ`` against ``sign(w)`` (as far as the box allows) closes the gap
    by ``Σ |w_i| min(ρ, room_i)``, piecewise linear and increasing in ρ; the smallest ρ closing ``c``
    is found among the sorted rooms. Where the box cannot reach the hyperplane, every coordinate
    goes as far as it can towards it.
    """
    flip = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w, c = w * flip[:, None], c * flip
    lo, hi = PIXEL_MIN - p, PIXEL_MAX - p
    moving = w != 0
    # Room to move against sign(w); beyond any real room (≤ 1) for coordinates that do not count.
    room = torch.where(moving, torch.where(w > 0, -lo, hi), 2.0).clamp_min(0.0)
    room, order = room.sort(dim=1)
    weight = w.abs().gather(1, order)
    closed_full = torch.cumsum(weight * room, dim=1)  # by the coordinates whose room is used up
    weight_total = weight.sum(1)
    weight_rest = weight_total[:, None] - torch.cumsum(weight, dim=1)
    closed_at_room = closed_full + room * weight_rest
    reach = closed_at_room >= c[:, None]
    k = _first_true(reach)[:, None]
    closed_before = _shift_right(closed_full, torch.zeros_like(c)).gather(1, k).squeeze(1)
    weight_from = _shift_right(weight_rest, weight_total).gather(1, k).squeeze(1)
    rho = (c - closed_before) / weight_from.clamp_min(1e-30)
    rho = torch.where(reach.any(1), rho, torch.ones_like(rho)).clamp_min(0.0)
    return torch.clamp(-rho[:, None] * torch.sign(w), lo, hi)


def project_l2(p: torch.Tensor, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest-‖·‖₂ ``d`` with ``<w, d> = −c`` and ``p + d`` in the pixel box.

    The minimiser is ``d(λ) = clip(−λ w, box)`` for the λ ≥ 0 with ``<w, d(λ)> = −c``;
    ``<w, d(λ)>`` is piecewise linear and decreasing in λ, bending where a coordinate reaches the
    box, so λ is found among the sorted bends. Where the box cannot reach the hyperplane, every
    coordinate goes as far as it can towards it.
    """
    flip = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w, c = w * flip[:, None], c * flip
    lo, hi = PIXEL_MIN - p, PIXEL_MAX - p
    moving = w != 0
    limit = torch.where(w > 0, lo, hi)  # where -λw stops
    bend = torch.where(moving, (-limit / torch.where(moving, w, 1.0)).clamp_min(0.0), math.inf)
    bend, order = bend.sort(dim=1)
    finite = torch.isfinite(bend)
    bend_value = torch.where(finite, bend, 0.0)
    sq = (w * w).gather(1, order)
    saturated = torch.cumsum((w * limit).gather(1, order), dim=1)  # <w, d> of saturated coordinates
    sq_total = sq.sum(1)
    sq_rest = sq_total[:, None] - torch.cumsum(sq, dim=1)
    at_bend = saturated - bend_value * sq_rest
    reach = at_bend <= -c[:, None]
    k = _first_true(reach)[:, None]
    saturated_before = _shift_right(saturated, torch.zeros_like(c)).gather(1, k).squeeze(1)
    sq_from = _shift_right(sq_rest, sq_total).gather(1, k).squeeze(1)
    lam = (c + saturated_before) / sq_from.clamp_min(1e-30)
    last_bend = bend_value.amax(1)
    lam = torch.where(reach.any(1), lam, last_bend).clamp_min(0.0)
    return torch.clamp(-lam[:, None] * w, lo, hi)


PROJECTIONS = {"linf": project_linf, "l2": project_l2}


def _gap_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor):
    """``logit[target] − logit[y]`` at ``x`` and its input gradient: one forward, one backward."""
    rows = torch.arange(len(x), device=x.device)
    x = x.detach().requires_grad_(True)  # a fresh leaf: the gradient is computed anew each step
    with torch.enable_grad():
        logits = model(x)
        gap = logits[rows, target] - logits[rows, y]
        (grad,) = torch.autograd.grad(gap.sum(), [x])
    return gap.detach(), grad


def _fab_step(x1: torch.Tensor, x0: torch.Tensor, gap: torch.Tensor, grad: torch.Tensor,
              norm: str) -> torch.Tensor:
    """One FAB step from iterate ``x1`` (clean input ``x0``) on the linearised boundary."""
    n = len(x1)
    x1f, x0f, w = x1.flatten(1), x0.flatten(1), grad.flatten(1)
    # The linearisation gap + <w, z − x1> is zero on the boundary; its value at x0:
    gap0 = gap + (w * (x0f - x1f)).sum(1)
    d = PROJECTIONS[norm](torch.cat([x1f, x0f]), torch.cat([w, w]), torch.cat([gap, gap0]))
    sizes = _norms(d, norm).clamp_min(1e-8)
    d1, d0 = d[:n], d[n:]
    alpha = (sizes[:n] / (sizes[:n] + sizes[n:])).clamp(0.0, ALPHA_MAX)[:, None]
    moved = (x1f + ETA * d1) * (1 - alpha) + (x0f + ETA * d0) * alpha
    return moved.clamp(PIXEL_MIN, PIXEL_MAX).view_as(x1)


def _random_start(x: torch.Tensor, norm: str, eps: float, generator) -> torch.Tensor:
    if norm == "linf":
        t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    size = _per_example(_norms(t.flatten(1), norm).clamp_min(1e-12), x)
    return (x + RANDOM_START_SCALE * eps * t / size).clamp(PIXEL_MIN, PIXEL_MAX)


def _targeted_run(model, x0, y, target, *, norm, eps, steps, start):
    """One FAB run towards ``target``: the closest adversarial point found per example and its
    distance (inf where none); examples leave the run once they have one within ``eps``."""
    best = x0.clone()
    best_dist = torch.full((len(x0),), math.inf, device=x0.device)
    live = torch.arange(len(x0), device=x0.device)
    x0l, yl, tl, x1 = x0, y, target, start
    for _ in range(steps):
        stop.check()  # one step, not the batch, between a signal and the stop (psadv/stop.py)
        gap, grad = _gap_and_grad(model, x1, yl, tl)
        x1 = _fab_step(x1, x0l, gap, grad, norm)
        with torch.no_grad():
            adv = model(x1).argmax(1) != yl
        if not adv.any():
            continue
        dist = _norms((x1 - x0l).flatten(1), norm)
        closer = adv & (dist < best_dist[live])
        best[live[closer]] = x1[closer]
        best_dist[live[closer]] = dist[closer]
        x1 = torch.where(_per_example(adv, x1), x0l + BETA * (x1 - x0l), x1)
        keep = best_dist[live] > eps
        if not keep.all():
            if not keep.any():
                break
            live, x0l, yl, tl, x1 = (t[keep] for t in (live, x0l, yl, tl, x1))
    return best, best_dist


def fab_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
               steps: int = 100, n_target_classes: int = 9, restarts: int = 1,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """FAB-T adversarial examples for ``(x, y)`` in the ``norm`` ball of radius ``eps``.

    Per example: an adversarial point within ε (and in [0, 1]) where some run found one, else
    ``x``. Only examples the model classifies correctly are attacked. ``restarts`` runs per
    target, the first from ``x``, the others from random starts drawn with ``generator``.
    """
    if norm not in THREATS:
        raise ConfigError(f"unknown norm {norm!r}; choose one of: {', '.join(THREATS)}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"eps must be a finite number >= 0, got {eps}")
    if steps < 0:
        raise ConfigError(f"FAB steps must be >= 0, got {steps}")
    if restarts < 1:
        raise ConfigError(f"FAB restarts must be >= 1, got {restarts}")
    if n_target_classes < 1:
        raise ConfigError(f"FAB target classes must be >= 1, got {n_target_classes}")
    x, y = x.detach(), y.detach()
    adv = x.clone()
    if eps == 0 or steps == 0 or len(x) == 0:
        return adv
    with attacking(model):
        with torch.no_grad():
            logits = model(x)
        classes = logits.shape[1]
        if n_target_classes > classes - 1:
            raise ConfigError(f"FAB target classes must be <= {classes - 1} (the model has "
                              f"{classes} classes), got {n_target_classes}")
        robust = logits.argmax(1) == y
        by_logit = logits.argsort(dim=1, descending=True)  # column 0 is the (correct) prediction
        for rank in range(1, n_target_classes + 1):
            for restart in range(restarts):
                todo = robust.nonzero().squeeze(1)
                if len(todo) == 0:
                    return adv
                x0, y0 = x[todo], y[todo]
                start = x0 if restart == 0 else _random_start(x0, norm, eps, generator)
                found, dist = _targeted_run(model, x0, y0, by_logit[todo, rank],
                                            norm=norm, eps=eps, steps=steps, start=start)
                hit = (dist <= eps).nonzero().squeeze(1)
                if len(hit):
                    with torch.no_grad():  # counted only if the point is misclassified as returned
                        hit = hit[model(found[hit]).argmax(1) != y0[hit]]
                    adv[todo[hit]] = found[hit]
                    robust[todo[hit]] = False
        return adv
