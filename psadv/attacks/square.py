"""Square attack (Andriushchenko et al. 2020): a black-box attack that needs no gradient.

It keeps, per example, the best point found so far and proposes a change of one random square
window at a time, kept only if it lowers the margin (true logit minus best wrong logit). The
window's side follows the fraction ``p`` of pixels changed, which shrinks on the published schedule
from ``p_init``. Because it never reads a gradient, it sees through gradient masking (a
non-differentiable step, saturated softmax, shattered gradients) where gradient attacks fail.

L∞: the initial point has vertical stripes of ±ε; a proposal sets the window to ±ε per channel.
L2: the initial point is a grid of pseudo-Gaussian bumps; a proposal moves the mass of a second
window into the first, as a fresh bump, and the whole perturbation is rescaled to norm ε.

Only examples not yet misclassified are queried (one forward pass each per iteration); results lie
in the ε-ball and [0, 1]; the model runs in eval mode and gets its mode back.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .. import stop
from .losses import margin_loss
from .mode import attacking
from .threats import PIXEL_MAX, PIXEL_MIN, THREATS

# Square's schedule, for 10,000 queries: p is halved after iterations 10, 50, 200, 500, 1000,
# 2000, 4000, 6000 and 8000; other budgets stretch it linearly.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
MAX_CHANNELS = 62  # an L∞ proposal draws which of the c channel signs to turn as one int64 below 2^c


def p_at(iteration: int, queries: int, p_init: float) -> float:
    """The fraction of pixels a proposal changes at ``iteration`` of ``queries``."""
    scaled = int(iteration / queries * 10000)
    return p_init / 2 ** sum(scaled > h for h in _HALVINGS)


def _margin(model, x, y):
    """True logit minus best wrong logit (negative = fooled); the caller holds ``torch.no_grad``."""
    logits = model(x)
    return -margin_loss(logits, y), logits.argmax(1) != y


def _signs(shape, generator, device) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device, dtype=torch.float32) * 2 - 1


def _randint(high: int, generator, device) -> int:
    return int(torch.randint(0, high, (1,), generator=generator, device=device))


@functools.lru_cache(maxsize=None)
def _bump(rows: int, cols: int) -> torch.Tensor:
    """Concentric rectangles around the centre, weight Σ_{k≥ring} 1/(k+1)², unit L2 norm (cached, as
    every proposal of a side needs it: callers must not modify it in place)."""
    i = (torch.arange(rows) - rows // 2).abs()[:, None]
    j = (torch.arange(cols) - cols // 2).abs()[None, :]
    ring = torch.maximum(i, j)
    rings = max(rows // 2, cols // 2) + 1
    tail = (1.0 / torch.arange(1, rings + 1, dtype=torch.float32) ** 2).flip(0).cumsum(0).flip(0)
    bump = tail[ring]
    return bump / bump.norm()


def _pseudo_gaussian(s: int, generator, device) -> torch.Tensor:
    """An s×s pattern: a bump on the top half, a negative bump on the bottom; transposed half the time."""
    top = s // 2
    pattern = torch.cat([_bump(top, s), -_bump(s - top, s)]) if top else _bump(s, s)
    pattern = pattern / pattern.norm()
    if float(torch.rand(1, generator=generator, device=device)) > 0.5:
        pattern = pattern.t()
    return pattern.to(device)


def _l2_norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _linf_init(x, eps, generator):
    n, c, _, w = x.shape
    return torch.clamp(x + eps * _signs((n, c, 1, w), generator, x.device), PIXEL_MIN, PIXEL_MAX)


def _corners(extent: int, s: int) -> int:
    """How many top (left) places a window of side ``s`` may take: all but the last one it fits, as in
    the authors' code and torchattacks. A window that ends on the last row or column spends the
    budget on image border (empty on MNIST), which weakened L2 Square (results/square-l2-windows.toml)."""
    return max(extent - s, 1)


def _linf_windows(queries: int, h: int, w: int, p_init: float, generator, device) -> list[tuple[int, int, int]]:
    """(side, top row, left column) of the window of each L∞ proposal after the first query, drawn
    at once: the side follows the schedule, the corner is uniform over :func:`_corners`."""
    sides = [min(max(round(math.sqrt(p_at(i, queries, p_init) * h * w)), 1), h - 1) for i in range(queries - 1)]
    room = torch.tensor([[_corners(h, s), _corners(w, s)] for s in sides], dtype=torch.float64).view(-1, 2)
    u = torch.rand(room.shape, generator=generator, device=device, dtype=torch.float64).cpu()
    corners = (u * room).long().tolist()  # u < 1, so each index < its room
    return [(s, vh, vw) for s, (vh, vw) in zip(sides, corners)]


def _linf_window(x_win, old_win, eps, generator):
    """New values of one window: per example and channel, the clean window moved by ±ε and clipped
    to [0, 1] (so inside the ball and the pixel range by construction)."""
    n, c = x_win.shape[:2]
    signs = _signs((n, c, 1, 1), generator, x_win.device)
    new = torch.add(x_win, signs, alpha=eps).clamp_(PIXEL_MIN, PIXEL_MAX)
    # A proposal equal to the current window would waste a query. With ε > 0 a pixel's two choices
    # always differ, so the window differs exactly for the sign vectors other than the one drawn:
    # such an example takes one of those, uniformly (what drawing again until one differs gives).
    same = _unchanged(new, old_win)
    if same.any():
        rows = same.nonzero().squeeze(1)
        flips = torch.randint(1, 2 ** c, (len(rows), 1), generator=generator, device=x_win.device)
        flips = flips >> torch.arange(c, device=x_win.device) & 1  # (rows, c): which signs turn, not none
        turned = signs[rows] * (1 - 2 * flips).view(-1, c, 1, 1)
        new[rows] = torch.add(x_win[rows], turned, alpha=eps).clamp_(PIXEL_MIN, PIXEL_MAX)
    return new


def _unchanged(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per example: whether window ``new`` equals ``old`` within 1e-7."""
    return (new - old).abs_().amax(dim=(-3, -2, -1)) < 1e-7


def _l2_init(x, eps, generator):
    n, c, h, w = x.shape
    s = max(h // 5, 1)
    delta = torch.zeros_like(x)
    offset = (h - s * 5) // 2
    for r in range(offset, h - s + 1, s):
        for col in range(offset, w - s + 1, s):
            delta[:, :, r:r + s, col:col + s] += (_pseudo_gaussian(s, generator, x.device)
                                                  * _signs((n, c, 1, 1), generator, x.device))
    return torch.clamp(x + eps * delta / (_l2_norms(delta) + 1e-12), PIXEL_MIN, PIXEL_MAX)


def _l2_proposal(x, x_best, eps, s, generator):
    n, c, h, w = x.shape
    delta = x_best - x
    vh, vw = _randint(_corners(h, s), generator, x.device), _randint(_corners(w, s), generator, x.device)
    vh2, vw2 = _randint(_corners(h, s), generator, x.device), _randint(_corners(w, s), generator, x.device)
    first = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
    second = (slice(None), slice(None), slice(vh2, vh2 + s), slice(vw2, vw2 + s))
    both = torch.zeros((1, 1, h, w), dtype=x.dtype, device=x.device)  # broadcast over examples, channels
    both[first] = 1.0
    both[second] = 1.0
    in_windows = _l2_norms(delta * both)  # the mass the proposal redistributes
    spare = torch.clamp(eps ** 2 - _l2_norms(delta) ** 2, min=0.0)  # budget not yet used
    old = delta[first]
    per_channel = old.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()
    bump = _pseudo_gaussian(s, generator, x.device).view(1, 1, s, s) * _signs((n, c, 1, 1), generator, x.device)
    new = bump + old / (per_channel + 1e-12)
    new = new / (new.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt() + 1e-12) * (spare / c + in_windows ** 2).sqrt()
    delta[second] = 0.0  # (delta is this call's own tensor)
    delta[first] = new
    return torch.clamp(x + eps * delta / (_l2_norms(delta) + 1e-12), PIXEL_MIN, PIXEL_MAX)


def square_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float,
                  queries: int = 5000, p_init: float = 0.8,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Square attack with at most ``queries`` forward passes per example (4-D image batches)."""
    if x.dim() != 4:
        raise ValueError(f"square_attack wants image batches (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] > MAX_CHANNELS:
        raise ValueError(f"square_attack handles up to {MAX_CHANNELS} channels, got {x.shape[1]}")
    x = x.detach()
    with attacking(model), torch.no_grad():  # forward queries only: no graph to build
        return _search(model, x, y, THREATS[norm](eps), norm, queries, p_init, generator)


def _search(model, x, y, threat, norm, queries, p_init, generator) -> torch.Tensor:
    """The random search. The examples still standing are kept gathered (``live`` their rows), so a
    query costs one forward pass and a few window-sized operations; fooled ones leave for good."""
    eps = threat.eps
    h, w = x.shape[-2:]
    out = _linf_init(x, eps, generator) if norm == "linf" else _l2_init(x, eps, generator)
    out = threat.project(out, x)
    margin, fooled = _margin(model, out, y)
    live = (~fooled).nonzero().squeeze(1)
    xs, best, ys, margin = x[live], out[live], y[live], margin[live]
    windows = _linf_windows(queries, h, w, p_init, generator, x.device) if norm == "linf" else None
    for i in range(queries - 1):  # the initial point took the first query
        if len(live) == 0:
            break
        stop.check()  # one query, not 5,000, between a signal and the stop (psadv/stop.py)
        if norm == "linf":
            s, vh, vw = windows[i]
            win = best[:, :, vh:vh + s, vw:vw + s]  # a view: the proposal is queried in place
            old = win.clone()
            new = _linf_window(xs[:, :, vh:vh + s, vw:vw + s], old, eps, generator)
            win.copy_(new)
            m, f = _margin(model, best, ys)
            better = m < margin
            win.copy_(torch.where(better.view(-1, 1, 1, 1), new, old))  # taken back where no better
        else:
            s = max(round(math.sqrt(p_at(i, queries, p_init) * h * w)), 3)
            s = min(s + (s % 2 == 0), h - (h % 2 == 0))  # odd, and inside the image
            cand = threat.project(_l2_proposal(xs, best, eps, s, generator), xs)  # guards the ball against float error
            m, f = _margin(model, cand, ys)
            better = m < margin
            best = torch.where(better.view(-1, 1, 1, 1), cand, best)
        margin = torch.where(better, m, margin)
        done = better & f
        if done.any():
            out[live[done]] = best[done]
            keep = ~done
            live, xs, best, ys, margin = live[keep], xs[keep], best[keep], ys[keep], margin[keep]
    out[live] = best
    return out
