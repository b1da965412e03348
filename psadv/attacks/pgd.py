"""The training attack: one generic PGD loop over the threat models.

Training, the MPI attackers and periodic evaluation call :func:`perturb`. Invariants, each tested:

* the result lies in the threat model's ε-ball around ``x`` and in the pixel range [0, 1] (N-FGSM,
  a training attack, by design reaches 3ε: its ball is ``reach × ε``, see :class:`AttackKind`);
* parameter gradients are untouched (only the input gradient is computed, with
  ``torch.autograd.grad``, which also means nothing accumulates from step to step);
* the model is in eval mode, its parameters frozen, while attacking, and both are restored
  afterwards (:func:`.mode.attacking`);
* with restarts, each example keeps its worst restart (misclassified first, then highest loss).

FGSM, FGSM with random start ("fast" adversarial training), N-FGSM and PGD are the same loop with
different (steps, step size, random start, reach): see :data:`ATTACKS`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import stop
from ..errors import ConfigError
from .losses import LOSSES
from .mode import attacking
from .threats import THREATS, ThreatModel


@dataclass(frozen=True)
class AttackKind:
    """How a named attack sets the generic loop: steps, default step size, random start."""

    fixed_steps: int | None  # None: the user chooses k
    random_start: bool
    default_step_ratio: str  # step size / ε, as a rule of the step count (see step_size_ratio)
    description: str
    start_scale: float = 1.0  # radius of the random start, in units of ε
    # radius of the ball the result is projected onto, in units of ε: 1 for every attack that
    # grades robustness; more only for a training attack whose noise is meant to leave the ball
    reach: float = 1.0


ATTACKS: dict[str, AttackKind] = {
    "none": AttackKind(0, False, "0", "clean training / evaluation, no perturbation"),
    "fgsm": AttackKind(1, False, "1", "one signed-gradient step of size ε (Goodfellow et al.)"),
    "fgsm-rs": AttackKind(1, True, "1.25", "FGSM from a uniform random start, step 1.25ε (Wong et al.)"),
    "pgd": AttackKind(None, True, "2.5/k", "k projected steps from a random start, step 2.5ε/k (Madry et al.)"),
    # de Jorge et al. 2022: noise of 2ε and no projection back to the ε-ball keep single-step
    # training from collapsing (catastrophic overfitting) without extra cost.
    "n-fgsm": AttackKind(1, True, "1", "FGSM of step ε from uniform noise of 2ε, not projected back to the "
                         "ε-ball (N-FGSM; training only)", start_scale=2.0, reach=3.0),
}


def step_size_ratio(kind: AttackKind, steps: int) -> float:
    """Default step size relative to ε for ``steps`` steps."""
    rule = kind.default_step_ratio
    if rule == "2.5/k":
        return 2.5 / max(steps, 1)
    return float(rule)


@dataclass(frozen=True)
class Attack:
    """A fully resolved attack: what :func:`perturb` runs."""

    name: str = "pgd"
    eps: float = 0.3
    steps: int = 10
    step_size: float | None = None  # absolute; None -> the attack's default ratio × ε
    restarts: int = 1
    norm: str = "linf"
    loss: str = "ce"
    # A training recipe's share of each batch left as it is (``--clean-share``): :func:`perturb` and
    # :func:`refine` attack only the first :func:`attacked_count` examples. Evaluation attacks keep 0.
    clean_share: float = 0.0

    def __post_init__(self):
        if self.name not in ATTACKS:
            raise ConfigError(f"unknown attack {self.name!r}; choose one of: {', '.join(ATTACKS)}")
        if self.norm not in THREATS:
            raise ConfigError(f"unknown norm {self.norm!r}; choose one of: {', '.join(THREATS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown attack loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.steps < 0:
            raise ConfigError(f"attack steps must be >= 0, got {self.steps}")
        if self.restarts < 1:
            raise ConfigError(f"attack restarts must be >= 1, got {self.restarts}")
        if self.step_size is not None and not self.step_size > 0:
            raise ConfigError(f"attack step size must be > 0, got {self.step_size}")
        if not 0 <= self.clean_share < 1:
            raise ConfigError(f"the clean share of a batch must be in [0, 1), got {self.clean_share}")

    @property
    def kind(self) -> AttackKind:
        return ATTACKS[self.name]

    @property
    def effective_steps(self) -> int:
        fixed = self.kind.fixed_steps
        return self.steps if fixed is None else fixed

    @property
    def effective_step_size(self) -> float:
        if self.step_size is not None:
            return self.step_size
        return step_size_ratio(self.kind, self.effective_steps) * self.eps

    @property
    def passes(self) -> int:
        """Forward+backward passes per example (the attack's cost)."""
        return self.effective_steps * self.restarts

    def describe(self) -> str:
        if self.name == "none" or self.eps == 0:
            return "clean"
        label = {"pgd": f"PGD-{self.effective_steps}"}.get(self.name, self.name.upper())
        if self.restarts > 1:
            label += f"x{self.restarts}"
        return (f"{label} {self.norm} eps={self.eps:g}" + (" margin" if self.loss == "margin" else "")
                + (f" on {1 - self.clean_share:.0%} of each batch" if self.clean_share else ""))


def attacked_count(n: int, clean_share: float) -> int:
    """How many of a batch of ``n`` an attack with ``clean_share`` perturbs: the first
    ``n - round(clean_share * n)``, at least one. Batches come shuffled, so the first examples are a
    random subset; the trainer that refines a push counts the same way from the push's size."""
    if clean_share <= 0 or n <= 0:
        return n
    return max(1, n - round(clean_share * n))


def initial_point(attack: Attack, x: torch.Tensor) -> torch.Tensor:
    """Where ``attack`` starts without a given start: a random point of its start ball, or ``x``."""
    kind = attack.kind
    if not kind.random_start:
        return x.clone()
    return THREATS[attack.norm](attack.eps * kind.start_scale).random_perturb(x)


def _single_run(model: nn.Module, x, y, attack: Attack, threat: ThreatModel, loss_fn,
                start: torch.Tensor | None = None) -> torch.Tensor:
    x_adv = initial_point(attack, x) if start is None else threat.project(start.detach(), x)
    step_size = attack.effective_step_size
    for _ in range(attack.effective_steps):
        stop.check()  # a signal during an evaluation waits for one step, not the batch (psadv/stop.py)
        # A fresh leaf each step: the gradient is computed anew, never accumulated.
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():  # also when called under torch.no_grad()
            loss = loss_fn(model(x_adv), y).sum()
            (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = threat.project(threat.step(x_adv.detach(), grad, step_size), x)
    return x_adv.detach()


def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
            start: torch.Tensor | None = None) -> torch.Tensor:
    """Adversarial examples for ``(x, y)`` under ``attack``; see the module docstring.

    ``start`` (examples in the ε-ball around ``x``) replaces the first run's random start: the
    attack continues from earlier adversarial examples, e.g. ones made against a stale model.
    A ``clean_share`` leaves the last examples as they are (``x``, whatever ``start`` holds for them).
    """
    if attack.name == "none" or attack.eps == 0 or attack.effective_steps == 0:
        return x.detach().clone() if start is None else start.detach().clone()
    k = attacked_count(len(x), attack.clean_share)
    if k < len(x):
        whole = dataclasses.replace(attack, clean_share=0.0)
        head = perturb(model, x[:k], y[:k], whole, start=None if start is None else start[:k])
        return torch.cat([head, x[k:].detach()])
    threat = THREATS[attack.norm](attack.eps * attack.kind.reach)
    loss_fn = LOSSES[attack.loss]
    with attacking(model):
        best = _single_run(model, x, y, attack, threat, loss_fn, start)
        if attack.restarts > 1:
            with torch.no_grad():
                best_wrong, best_loss = _score(model, best, y, loss_fn)
            for _ in range(attack.restarts - 1):
                cand = _single_run(model, x, y, attack, threat, loss_fn)
                with torch.no_grad():
                    wrong, loss = _score(model, cand, y, loss_fn)
                better = _stronger(wrong, loss, best_wrong, best_loss)
                best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), cand, best)
                best_wrong = best_wrong | wrong
                best_loss = torch.where(better, loss, best_loss)
        return best


def refine(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, start: torch.Tensor) -> torch.Tensor:
    """Continue ``start`` (adversarial examples of ``x`` made earlier, e.g. against a stale model)
    with ``attack`` against ``model``, keeping per example whichever of the two is stronger against
    ``model`` (misclassified first, then higher loss): a refinement never weakens an example. Without
    this guard a large step can land somewhere weaker, and a model trained on such points learns to
    send its gradient there (catastrophic overfitting, as with FGSM)."""
    start = start.detach()
    out = perturb(model, x, y, attack, start=start)
    loss_fn = LOSSES[attack.loss]
    with attacking(model), torch.no_grad():
        better = _stronger(*_score(model, out, y, loss_fn), *_score(model, start, y, loss_fn))
    return torch.where(better.view(-1, *([1] * (x.dim() - 1))), out, start)


def _stronger(wrong, loss, best_wrong, best_loss) -> torch.Tensor:
    """Per example: whether a candidate beats the best so far (misclassified first, then higher loss)."""
    return (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))


def _score(model, x_adv, y, loss_fn):
    logits = model(x_adv)
    return logits.argmax(1) != y, loss_fn(logits, y)
