"""APGD and APGD-T (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"): PGD that needs no step size.

Each run starts at a random point of the ball with step size η = 2ε and moves with momentum 0.75.
At the checkpoints w_j = ⌈p_j·N⌉ (p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06))
an example's step is halved, and it restarts from its best point so far, when since the previous
checkpoint its loss rose in fewer than 75% of the steps, or when neither its step nor its best loss
changed. APGD maximises cross-entropy (or DLR); APGD-T the targeted DLR loss towards each of the
top ``n_target_classes`` wrong classes in turn.

Like every attack of this package: results lie in the ε-ball and [0, 1], only the input gradient
is computed (``torch.autograd.grad``), the model runs in eval mode and gets its mode back. An example
stops being attacked once it is misclassified, which changes no result and saves its passes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import stop
from .losses import LOSSES, targeted_dlr_loss
from .mode import attacking
from .threats import THREATS, ThreatModel

MOMENTUM = 0.75
RHO = 0.75  # fraction of steps since the last checkpoint that must raise the loss


def checkpoints(steps: int) -> list[int]:
    """The iterations (1..steps) at which APGD decides whether to halve an example's step."""
    p = [0.0, 0.22]  # (the 1e-9 below keeps float error, as in 0.57·100, from rounding a whole number up)
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({w for w in (math.ceil(q * steps - 1e-9) for q in p[1:]) if 0 < w <= steps})


def _loss_and_grad(model, x_adv, y, target, loss_fn, need_grad: bool = True):
    """Per-example loss, its input gradient (None unless ``need_grad``) and the logits, from one forward."""
    if not need_grad:
        with torch.no_grad():
            logits = model(x_adv)
            return loss_fn(logits, y, target), None, logits
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv)
        loss = loss_fn(logits, y, target)
        (grad,) = torch.autograd.grad(loss.sum(), [x_adv])
    return loss.detach(), grad.detach(), logits.detach()


def _single_run(model, x, y, target, loss_fn, threat: ThreatModel, steps: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run from a random start: (adversarial or highest-loss points, fooled mask)."""
    n = len(x)
    out = x.clone()
    fooled_out = torch.zeros(n, dtype=torch.bool, device=x.device)
    origin = torch.arange(n, device=x.device)  # row of the batch each working row belongs to
    view = (-1,) + (1,) * (x.dim() - 1)

    x_k = threat.random_perturb(x, generator)
    loss, grad, logits = _loss_and_grad(model, x_k, y, target, loss_fn)
    s = {"x": x, "y": y, "t": target, "x_k": x_k, "x_prev": x_k, "grad": grad, "loss": loss,
         "x_best": x_k, "grad_best": grad, "loss_best": loss, "loss_best_at_check": loss.clone(),
         "eta": torch.full((n,), 2.0 * threat.eps, device=x.device),
         "reduced_at_check": torch.zeros(n, dtype=torch.bool, device=x.device),
         "rises": torch.zeros(n, device=x.device)}
    fooled = logits.argmax(1) != y
    check_at, last_check = set(checkpoints(steps)), 0
    for k in range(steps + 1):
        stop.check()  # one iteration, not the batch, between a signal and the stop (psadv/stop.py)
        if fooled.any():  # finished rows leave the working set for good
            out[origin[fooled]] = s["x_k"][fooled]
            fooled_out[origin[fooled]] = True
            keep = ~fooled
            origin = origin[keep]
            s = {key: (None if v is None else v[keep]) for key, v in s.items()}
        if len(origin) == 0 or k == steps:
            break
        z = threat.project(threat.step(s["x_k"], s["grad"], s["eta"].view(view)), s["x"])
        if k == 0:  # no momentum out of the start
            x_new = z
        else:
            x_new = threat.project(torch.lerp(s["x_k"], z, MOMENTUM).add_(s["x_k"] - s["x_prev"], alpha=1 - MOMENTUM),
                                   s["x"])
        last = k + 1 == steps  # the last point's gradient would never be used
        loss, grad, logits = _loss_and_grad(model, x_new, s["y"], s["t"], loss_fn, need_grad=not last)
        s["rises"] += loss > s["loss"]
        s["x_prev"], s["x_k"], s["grad"], s["loss"] = s["x_k"], x_new, grad, loss
        better = loss > s["loss_best"]
        s["x_best"] = torch.where(better.view(view), x_new, s["x_best"])
        if not last:
            s["grad_best"] = torch.where(better.view(view), grad, s["grad_best"])
        s["loss_best"] = torch.where(better, loss, s["loss_best"])
        fooled = logits.argmax(1) != s["y"]
        if k + 1 in check_at and not last:  # (after the last step only the points count)
            stalled = s["rises"] < RHO * (k + 1 - last_check)
            stuck = ~s["reduced_at_check"] & (s["loss_best"] <= s["loss_best_at_check"])
            halve = (stalled | stuck) & ~fooled
            s["eta"] = torch.where(halve, s["eta"] / 2, s["eta"])
            hv = halve.view(view)
            s["x_k"] = torch.where(hv, s["x_best"], s["x_k"])
            s["x_prev"] = torch.where(hv, s["x_best"], s["x_prev"])  # no momentum out of a restart
            s["grad"] = torch.where(hv, s["grad_best"], s["grad"])
            s["reduced_at_check"], s["loss_best_at_check"] = halve, s["loss_best"].clone()
            s["rises"] = torch.zeros_like(s["rises"])
            last_check = k + 1
    out[origin] = s["x_best"]
    return out, fooled_out


def _run(model: nn.Module, x, y, targets: list[torch.Tensor | None], loss_fn, norm: str, eps: float, steps: int,
         restarts: int, generator) -> torch.Tensor:
    threat = THREATS[norm](eps)
    with attacking(model):
        x_adv = x.detach().clone()
        standing = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for target in targets:
            for _ in range(restarts):
                idx = standing.nonzero().squeeze(1)
                if len(idx) == 0:
                    return x_adv
                t = None if target is None else target[idx]
                cand, fooled = _single_run(model, x[idx], y[idx], t, loss_fn, threat, steps, generator)
                x_adv[idx] = cand
                standing[idx[fooled]] = False
        return x_adv


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, steps: int = 100,
         restarts: int = 1, loss: str = "ce", generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD maximising ``loss`` (``ce``, ``dlr`` or ``margin``); restarts attack only examples still standing."""
    base = LOSSES[loss]
    return _run(model, x.detach(), y, [None], lambda logits, yy, _t: base(logits, yy), norm, eps, steps,
                restarts, generator)


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, steps: int = 100,
                  n_target_classes: int = 9, restarts: int = 1,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD-T: targeted DLR towards the 2nd, 3rd, … highest clean logit, up to ``n_target_classes``
    targets, each run on the examples the earlier targets left standing."""
    x = x.detach()
    with attacking(model), torch.no_grad():
        ranked = model(x).argsort(dim=1, descending=True)
    n_targets = min(n_target_classes, ranked.shape[1] - 1)
    targets = [ranked[:, r] for r in range(1, n_targets + 1)]
    return _run(model, x, y, targets, targeted_dlr_loss, norm, eps, steps, restarts, generator)
