"""Evaluation attacks by name, and the rules that read a cascade of them.

A name maps to an :class:`EvalAttack` (``run(model, x, y, generator) -> x_adv``) of the PGD family
(:class:`PgdFamily`) or of the table :data:`SINGLE` (:class:`NamedAttack`), or to a composite: a
cascade, run in order, each attack on the examples the earlier ones left standing, so
an example counts as robust only if every attack fails on it (the worst case over the attacks).

* ``autoattack``: the standard AutoAttack of Croce & Hein (2020): APGD-CE, APGD-T, FAB-T, Square.
* ``strong``: the default of ``psadv eval``: AutoAttack without FAB-T, which costs about as much
  as APGD-T again (9 targets × 100 iterations) and is there for models whose losses APGD-T cannot
  climb; Square stays because it is the one black-box attack, the check against gradient masking
  (on a psadv MNIST model it left fewer examples standing than APGD-T: results/strong-eval-cost.toml).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import string
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .apgd import apgd, apgd_targeted
from .losses import LOSSES
from .pgd import ATTACKS, Attack, perturb
from .square import square_attack

# Square flipping more than this fraction of the test examples beyond what the gradient attacks
# left is more than the noise of a random search: the gradients are not to be trusted.
MASKING_THRESHOLD = 0.01


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What every evaluation attack may need; each reads its own fields."""

    norm: str = "linf"
    eps: float = 0.3
    steps: int = 50  # PGD (and fgsm/fgsm-rs, which fix their own)
    restarts: int = 10
    step_size: float | None = None
    loss: str = "ce"
    apgd_steps: int = 100  # APGD-CE, APGD-T and FAB-T iterations (AutoAttack's standard)
    targets: int = 9  # target classes of APGD-T and FAB-T
    queries: int = 5000  # Square's budget per example (AutoAttack's standard)
    p_init: float = 0.8  # Square's initial fraction of changed pixels, as AutoAttack sets it

    def __post_init__(self):
        for name in ("apgd_steps", "targets", "queries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.p_init <= 1:
            raise ConfigError(f"p_init must be in (0, 1], got {self.p_init}")
        if self.step_size is not None and not (math.isfinite(self.step_size) and self.step_size > 0):
            # an infinite step makes NaN images, which no model classifies: a bogus 0% robust
            raise ConfigError(f"step size must be a finite number > 0, got {self.step_size}")


@dataclasses.dataclass(frozen=True)
class EvalRun:
    """How ``psadv eval`` and ``psadv.evaluate`` run a cascade over the test set, beside what each
    attack reads (:class:`EvalSettings`): the one source of the defaults that the command's options,
    the function's keywords and :func:`psadv.grading.prepare_evaluation` read (tests/test_eval_options.py
    fails when one of them says otherwise). Not the device: the command picks one (``auto``), the
    function keeps the caller's module on the CPU unless told, as it moves the module it is given."""

    attack: str = "strong"  # the module docstring says why the strong cascade, not AutoAttack's four
    examples: int | None = None  # the whole test set: a slice's grade is another number
    # examples attacked at once: a CPU's cache and memory; a GPU wants more (--batch-size 10000 in
    # docs/guides/evaluation.md). A seeded grade depends on it (batch i draws from seed + i).
    batch_size: int = 500
    seed: int = 0  # fixed, so the same command grades the same number
    threads: int = 0  # 0 = automatic: the usable cores less those other work keeps busy (psadv/threads.py)


# The settings a user chooses per attack (``psadv eval --steps`` …, ``psadv.evaluate(steps=…)``), in
# the order the refusal names them, with what each one sets: an option no attack of the cascade
# reads is refused (check_given), as ``psadv train`` refuses one its config ignores.
OPTIONS = {
    "steps": "sets the steps of PGD",
    "restarts": "sets the random restarts of PGD and FGSM-RS",
    "step_size": "sets the step of PGD, FGSM and FGSM-RS",
    "loss": "sets the loss of PGD, FGSM and FGSM-RS",
    "apgd_steps": "sets the iterations of APGD-CE, APGD-T and FAB-T",
    "targets": "sets the target classes of APGD-T and FAB-T",
    "queries": "sets the queries of Square",
}


class EvalAttack(abc.ABC):
    """One evaluation attack with its settings; ``run`` returns points of the ε-ball around ``x``."""

    name: str
    black_box = False
    reads: tuple[str, ...] = ()  # the OPTIONS it reads (ε and the norm: every attack)

    def __init__(self, settings: EvalSettings):
        self.settings = settings

    @abc.abstractmethod
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Adversarial examples for ``(x, y)``, random draws from ``generator`` (or the global one)."""

    @abc.abstractmethod
    def label(self) -> str:
        """Short name with the budget, e.g. ``APGD-CE-100``."""

    def describe(self) -> str:
        return f"{self.label()} {self.settings.norm} eps={self.settings.eps:g}"

    def used_settings(self) -> dict:
        """The settings this attack ran with, as the evaluation JSON records them."""
        return {"norm": self.settings.norm, "eps": self.settings.eps,
                **{name: getattr(self.settings, name) for name in self.reads}}


class PgdFamily(EvalAttack):
    """``none``, ``fgsm``, ``fgsm-rs``, ``pgd``: :func:`psadv.attacks.perturb`; a restart attacks only
    the examples still standing (same result as keeping each example's worst restart, cheaper).
    Draws from the global generator, which :class:`psadv.grading.AccuracyJob` seeds per batch."""

    def __init__(self, settings: EvalSettings, name: str):
        super().__init__(settings)
        self.name = name
        s = settings
        self.attack = Attack(name=name, eps=s.eps, steps=s.steps, restarts=s.restarts, step_size=s.step_size,
                             norm=s.norm, loss=s.loss)
        self._single = dataclasses.replace(self.attack, restarts=1)
        kind = ATTACKS[name]
        # fgsm and fgsm-rs fix their steps; a restart without a random start repeats the same run
        self.reads = () if name == "none" else (*(("steps",) if kind.fixed_steps is None else ()),
                                                *(("restarts",) if kind.random_start else ()), "step_size", "loss")

    def run(self, model, x, y, generator=None):
        x_adv = x.detach().clone()
        standing = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.attack.restarts):
            idx = standing.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x_adv[idx] = perturb(model, x[idx], y[idx], self._single)
            with torch.no_grad():
                standing[idx] = model(x_adv[idx]).argmax(1) == y[idx]
        return x_adv

    def label(self):
        return self.attack.describe()

    def describe(self):
        return self.attack.describe()


def _fab_t(*args, **kwargs) -> torch.Tensor:
    from .fab import fab_attack  # written apart; imported only when FAB-T runs

    return fab_attack(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class EvalKind:
    """What makes one evaluation attack: the function, its budget and its label.

    ``attack(model, x, y, norm=, eps=, generator=, **budget(settings))`` is called as AutoAttack's
    attacks are; ``label`` is formatted with the settings, and the :data:`OPTIONS` it names are the
    ones the attack reads (so the label and the refusal of unread options cannot disagree)."""

    attack: Callable[..., torch.Tensor]
    budget: Callable[[EvalSettings], dict]
    label: str
    black_box: bool = False

    @property
    def reads(self) -> tuple[str, ...]:
        return tuple(field for _, field, _, _ in string.Formatter().parse(self.label) if field in OPTIONS)


# The evaluation attacks beside the PGD family, by name: adding one is one row here.
SINGLE: dict[str, EvalKind] = {
    "apgd-ce": EvalKind(apgd, lambda s: {"steps": s.apgd_steps, "loss": "ce"}, "APGD-CE-{apgd_steps}"),
    "apgd-t": EvalKind(apgd_targeted, lambda s: {"steps": s.apgd_steps, "n_target_classes": s.targets},
                       "APGD-T-{apgd_steps}x{targets}"),
    "fab-t": EvalKind(_fab_t, lambda s: {"steps": s.apgd_steps, "n_target_classes": s.targets},
                      "FAB-T-{apgd_steps}x{targets}"),
    "square": EvalKind(square_attack, lambda s: {"queries": s.queries, "p_init": s.p_init}, "Square-{queries}",
                       black_box=True),
}


class NamedAttack(EvalAttack):
    """An attack of :data:`SINGLE` with its settings."""

    def __init__(self, settings: EvalSettings, name: str):
        super().__init__(settings)
        self.name, self.kind = name, SINGLE[name]
        self.black_box, self.reads = self.kind.black_box, self.kind.reads

    def run(self, model, x, y, generator=None):
        s = self.settings
        return self.kind.attack(model, x, y, norm=s.norm, eps=s.eps, generator=generator, **self.kind.budget(s))

    def label(self):
        return self.kind.label.format(**dataclasses.asdict(self.settings))


COMPOSITES: dict[str, tuple[str, ...]] = {
    "autoattack": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "strong": ("apgd-ce", "apgd-t", "square"),
}
# PGD-family attacks that stay in the ε-ball (N-FGSM leaves it by design: training only)
GRADED = tuple(name for name, kind in ATTACKS.items() if kind.reach == 1)
EVAL_ATTACKS: tuple[str, ...] = (*GRADED, *SINGLE, *COMPOSITES)


def build_cascade(name: str, settings: EvalSettings) -> list[EvalAttack]:
    """The attacks ``name`` stands for, in the order they run."""
    if name in GRADED:
        return [PgdFamily(settings, name)]
    if name in SINGLE:
        return [NamedAttack(settings, name)]
    if name in COMPOSITES:
        return [NamedAttack(settings, part) for part in COMPOSITES[name]]
    raise ConfigError(f"unknown evaluation attack {name!r}; choose one of: {', '.join(EVAL_ATTACKS)}")


def check_given(name: str, cascade: Sequence[EvalAttack], given) -> None:
    """Refuse an option the user gave (``given``: names of :data:`OPTIONS`) that no attack of the
    cascade ``name`` reads: it would be silently ignored, and the result would claim less than the
    user asked for (``--steps 20`` with the strong cascade is not PGD-20). ConfigError, one line."""
    read = {option for attack in cascade for option in attack.reads}
    for option, what in OPTIONS.items():
        if option in given and option not in read:
            parts = f" ({'+'.join(COMPOSITES[name])})" if name in COMPOSITES else ""
            raise ConfigError(f"--{option.replace('_', '-')} {what}, and --attack {name}{parts} does not "
                              "read it: leave it out, or choose an attack that does")


def resolve(attack: str | None, given: dict, *, norm: str, eps: float, classes: int) -> list[EvalAttack]:
    """The cascade of ``psadv eval`` and ``psadv.evaluate``, the one place their defaults live
    (:class:`EvalSettings`): ``given`` holds the :data:`OPTIONS` the user chose (None: not chosen),
    checked against what the cascade reads. A model of ``classes`` classes has ``classes - 1`` to
    target: by default at most 9 (AutoAttack's), and asking for more is an error."""
    from ..config import parse_norm

    name = attack or EvalRun.attack
    if name not in EVAL_ATTACKS:
        raise ConfigError(f"--attack: unknown value {name!r}; choose one of: {', '.join(EVAL_ATTACKS)}")
    chosen = {key: value for key, value in given.items() if value is not None}
    if chosen.get("targets", 0) > classes - 1:
        raise ConfigError(f"--targets {chosen['targets']}: a model of {classes} classes has {classes - 1} other "
                          "classes to target")
    if chosen.get("loss") is not None and chosen["loss"] not in LOSSES:
        raise ConfigError(f"--loss: unknown value {chosen['loss']!r}; choose one of: {', '.join(LOSSES)}")
    settings = EvalSettings(norm=parse_norm(norm), eps=eps,
                            **{"targets": min(EvalSettings.targets, classes - 1), **chosen})
    cascade = build_cascade(name, settings)
    check_given(name, cascade, chosen)
    return cascade


def describe_cascade(attacks: Sequence[EvalAttack]) -> str:
    if len(attacks) == 1:
        return attacks[0].describe()
    s = attacks[0].settings
    return f"{' + '.join(a.label() for a in attacks)} {s.norm} eps={s.eps:g}"


def masking_gap(per_attack: Sequence[dict], examples: int) -> float | None:
    """Fraction of the examples the black-box attacks flipped that the gradient attacks had left
    robust: in a cascade, robust accuracy after the gradient attacks minus the worst case. None
    unless the cascade has both kinds (``per_attack`` rows: ``black_box``, ``flipped``)."""
    kinds = {row["black_box"] for row in per_attack if not row.get("skipped")}
    if kinds != {True, False}:
        return None
    return sum(row["flipped"] for row in per_attack if row["black_box"]) / max(examples, 1)


def masking_warning(gap: float | None, threshold: float = MASKING_THRESHOLD) -> str | None:
    """The one-line warning for a gap above ``threshold`` (a fraction of the examples), else None."""
    if gap is None or gap <= threshold:
        return None
    return (f"psadv: warning: the black-box attack flipped {gap:.2%} of the examples that the gradient attacks "
            f"left robust (more than {threshold:.0%}): likely gradient masking; gradient-only robust accuracy "
            "over-claims, trust the worst case")


def skip_after_gate(gate_robust_acc: float, target: float) -> bool:
    """Whether the expensive attacks can be skipped: the worst case is at most the cheap gate's
    robust accuracy, so below ``target`` there the target is missed whatever they find."""
    return target > 0 and gate_robust_acc < target
