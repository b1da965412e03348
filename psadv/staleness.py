"""The parameter server's staleness policy: which pushes reach the model, and what it counted.

A push computed with model version ``v`` and used when the server is at version ``V`` has
staleness τ = V − v. The policy decides, one push at a time, with plain method calls and no MPI,
clock or file, so the MPI server and a single-process emulator of N attackers can drive the same
object:

* ``examples`` and ``gradients``: a push with τ > S (``--max-staleness``) is rejected;
  ``gradients`` with ``--lr-damping`` scales the learning rate by 1/max(1, τ).
* ``sync``: every attacker computes on the same version, so only τ = 0 is accepted; one gradient
  per attacker is summed and, once all have arrived, averaged into one step.

Two pure helpers for gradient pushes live here too, so that the server and the emulator apply a
stale gradient the same way: :class:`GradientAccumulator` (``--accumulate K``: K accepted pushes
averaged into one optimizer step, which divides the server's optimizer work per push by K and the
staleness in versions of N attackers by about K) and :func:`delay_compensate` (``--delay-compensation
λ``: DC-ASGD's first-order correction of a gradient computed at older weights).

It keeps the staleness histogram and the totals that survive a resume: the checkpoint's ``mpi``
state (``applied``, ``rejected_stale``, ``staleness_sum``, ``staleness_max``) and its
``staleness_hist`` extra array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .pushmodes import push_mode

HIST_BINS = 1024  # histogram bins for τ = 0..1023 at the most, then one bin for larger τ
TOTALS = ("applied", "rejected_stale", "staleness_sum", "staleness_max")


@dataclass(frozen=True)
class Verdict:
    """What to do with one push."""

    tau: int
    accepted: bool
    lr_scale: float = 1.0  # gradients mode with --lr-damping: 1/max(1, τ)


@dataclass(frozen=True)
class SyncStep:
    """A complete synchronous round: the averaged gradient and the examples behind it."""

    gradient: object  # whatever array type the pushes came as
    examples: int


class StalenessPolicy:
    def __init__(self, mode: str, max_staleness: int, attackers: int, *, lr_damping: bool = False):
        self.push = push_mode(mode)  # ValueError for an unknown mode
        self.mode, self.max_staleness, self.attackers, self.lr_damping = mode, max_staleness, attackers, lr_damping
        # In sync mode anything but τ = 0 is rejected: the limit the histogram is cut at is 0.
        limit = self.push.staleness_limit(max_staleness)
        # Bins τ = 0..B-1, then the last bin for τ ≥ B, with B = limit + 1 (so the last bin counts
        # the rejections) capped at HIST_BINS (then it also counts accepted τ ≥ HIST_BINS).
        self.hist = np.zeros(min(limit + 1, HIST_BINS) + 1, dtype=np.int64)
        self.applied = self.rejected_stale = self.staleness_sum = self.staleness_max = 0
        self._sync_sum = None
        self._sync_from: set[int] = set()
        self._sync_examples = 0

    # --- decisions ---------------------------------------------------------------------------
    def judge(self, version: int, push_version: int) -> Verdict:
        """Accept or reject a push of ``push_version`` at server ``version``, and count it."""
        tau = version - push_version
        accepted = tau == 0 if self.push.synchronous else tau <= self.max_staleness
        # A rejection always lands in the last bin, so the numbered bins hold only applied pushes.
        self.hist[min(tau, len(self.hist) - 1) if accepted else -1] += 1
        if not accepted:
            self.rejected_stale += 1
            return Verdict(tau, False)
        self.applied += 1
        self.staleness_sum += tau
        self.staleness_max = max(self.staleness_max, tau)
        damped = self.push.damps(self.lr_damping)
        return Verdict(tau, True, 1.0 / max(1, tau) if damped else 1.0)

    def add_sync(self, sender: int, gradient, examples: int) -> SyncStep | None:
        """Add an accepted sync-mode gradient; the averaged step once every attacker's has arrived.

        The policy keeps ``gradient`` until the round completes: pass an array nobody reuses.
        """
        self._sync_sum = gradient if self._sync_sum is None else self._sync_sum + gradient
        self._sync_from.add(sender)
        self._sync_examples += examples
        if len(self._sync_from) < self.attackers:
            return None
        step = SyncStep(self._sync_sum / self.attackers, self._sync_examples)
        self._sync_sum, self._sync_examples = None, 0
        self._sync_from.clear()
        return step

    # --- checkpoints and summary ----------------------------------------------------------------
    def state(self) -> dict:
        """The totals, as they go into the checkpoint's ``mpi`` state (the histogram is ``hist``)."""
        return {key: int(getattr(self, key)) for key in TOTALS}

    def restore(self, saved: dict, hist: np.ndarray | None) -> None:
        """Continue from a checkpoint's ``mpi`` state and ``staleness_hist`` array.

        A saved histogram with more bins (a larger S then, or a sync run written before
        rejections had their own bin) folds its extra bins into the last one.
        """
        for key in TOTALS:
            if key in saved:
                setattr(self, key, int(saved[key]))
        if hist is not None:
            n = min(len(hist) - 1, len(self.hist) - 1)
            self.hist[:n] = hist[:n]
            self.hist[-1] += int(np.sum(hist[n:]))

    def summary(self) -> dict:
        histogram = {str(tau): int(n) for tau, n in enumerate(self.hist[:-1]) if n}
        if self.hist[-1]:
            histogram[f">{len(self.hist) - 2}"] = int(self.hist[-1])
        return {"max_staleness": self.max_staleness, "staleness_histogram": histogram,
                "staleness_mean": round(self.staleness_sum / self.applied, 4) if self.applied else None,
                "staleness_max": self.staleness_max, "applied": self.applied, "rejected_stale": self.rejected_stale}


def window_stats(taus: list[int]) -> dict:
    """Mean and max staleness of the pushes applied in one metrics window (None when there were none)."""
    return {"staleness_mean": round(float(np.mean(taus)), 3) if taus else None,
            "staleness_max": int(max(taus)) if taus else None}


class GradientAccumulator:
    """``--accumulate K``: sum K accepted gradient pushes, then one step on their mean.

    :meth:`add` copies what it is given (a receive buffer goes back to the pool right after), and
    returns ``(mean gradients, buffers of the last push, examples, mean lr scale)`` once K have
    arrived, else None. With K = 1 every push is one step, as before.
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"need k >= 1, not {k}")
        self.k = k
        self.sum: list | None = None
        self.count = self.examples = 0
        self.lr_scale = 0.0

    def add(self, grads: list, buffers: list, examples: int, lr_scale: float = 1.0):
        if self.sum is None:
            self.sum = [g.clone() for g in grads]
        else:
            for total, g in zip(self.sum, grads):
                total.add_(g)
        self.count += 1
        self.examples += examples
        self.lr_scale += lr_scale
        if self.count < self.k:
            return None
        step = ([total / self.k for total in self.sum], [b.clone() for b in buffers], self.examples,
                self.lr_scale / self.k)
        self.sum, self.count, self.examples, self.lr_scale = None, 0, 0, 0.0
        return step


def delay_compensate(grads: list, now: list, then: list, lam: float, second_moments: list | None = None) -> list:
    """DC-ASGD's correction of gradients computed at the weights ``then`` for use at ``now``.

    g(now) ≈ g(then) + H·(now − then), with the Hessian H approximated by λ·g⊙g (Zheng et al., 2017,
    "Asynchronous SGD with delay compensation"). With ``second_moments`` (Adam's bias-corrected
    moving mean of g², one tensor or None per parameter) λ is scaled by 1/√v per coordinate, the
    paper's adaptive variant, so one λ suits any gradient scale. Pure: new tensors, inputs untouched.
    """
    out = []
    for i, (g, w, w0) in enumerate(zip(grads, now, then)):
        h = g * g
        if second_moments is not None and second_moments[i] is not None:
            h = h / (second_moments[i].sqrt() + 1e-8)
        out.append(g + lam * h * (w - w0))
    return out
