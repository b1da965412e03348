"""Schedules as pure functions of training progress p in [0, 1].

Progress is the fraction of the budget used: the largest of versions/total versions and
elapsed/time budget, so the same recipe stretches to any budget and resumes exactly.
"""

from __future__ import annotations

import dataclasses

from .attacks import ATTACKS, Attack
from .attacks.suite import EvalAttack, EvalSettings, build_cascade
from .config import Config, parse_steps_schedule


def total_versions(cfg: Config, batches_per_epoch: int) -> int:
    """The version budget implied by --steps/--epochs (0 when only a time budget is set)."""
    budgets = []
    if cfg.steps:
        budgets.append(cfg.steps)
    if cfg.epochs:
        budgets.append(max(1, round(cfg.epochs * batches_per_epoch)))
    if not budgets and not cfg.time_budget:
        budgets.append(10 * batches_per_epoch)  # the default budget: 10 epochs
    return min(budgets) if budgets else 0


def progress(version: int, elapsed: float, total: int, time_budget: float) -> float:
    fractions = []
    if total:
        fractions.append(version / total)
    if time_budget:
        fractions.append(elapsed / time_budget)
    return min(1.0, max(fractions)) if fractions else 0.0


def lr_at(p: float, cfg: Config) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "piecewise":
        return cfg.lr * (0.1 if p >= 0.5 else 1.0) * (0.1 if p >= 0.75 else 1.0)
    # onecycle: linear warm-up to the peak at 40% of training, then linear decay to 0.
    peak = 0.4
    return cfg.lr * (p / peak if p < peak else max(0.0, (1.0 - p) / (1.0 - peak)))


def eps_at(p: float, cfg: Config) -> float:
    if cfg.eps_ramp <= 0 or p >= cfg.eps_ramp:
        return cfg.eps
    return cfg.eps * p / cfg.eps_ramp


class AttackSchedule:
    """The adversary to train with as a function of progress (ε ramp, steps schedule, relative step
    size), built once per run: ``--attack-steps-schedule`` is read here, not at every batch."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.steps_schedule = parse_steps_schedule(cfg.attack_steps_schedule)

    def steps_at(self, p: float) -> int:
        steps = self.cfg.attack_steps
        for at, k in self.steps_schedule:
            if p >= at:
                steps = k
        return steps

    def at(self, p: float) -> Attack:
        """The training attack at progress ``p``."""
        cfg = self.cfg
        eps = eps_at(p, cfg)
        step_size = cfg.attack_step_ratio * eps if cfg.attack_step_ratio > 0 and eps > 0 else None
        return Attack(name=cfg.attack, eps=eps, steps=self.steps_at(p), step_size=step_size,
                      restarts=cfg.attack_restarts, norm=cfg.norm, clean_share=cfg.clean_share)


def eval_settings(cfg: Config, eps: float | None = None) -> EvalSettings:
    """The settings of periodic evaluation's attacks: the run's full ε (no ramp)."""
    return EvalSettings(norm=cfg.norm, eps=cfg.eps if eps is None else eps, steps=cfg.eval_steps,
                        restarts=cfg.eval_restarts, apgd_steps=cfg.eval_apgd_steps, queries=cfg.eval_queries)


def eval_cascade(cfg: Config, eps: float | None = None) -> tuple[list[EvalAttack], list[EvalAttack]]:
    """Periodic evaluation as (gate, attacks): with --eval-gate and an --eval-attack stronger than
    PGD, the gate is PGD (--eval-steps × --eval-restarts), run first over the whole slice."""
    settings = eval_settings(cfg, eps)
    attacks = build_cascade(cfg.eval_attack, settings)
    if cfg.eval_gate and cfg.eval_attack not in ATTACKS:
        return build_cascade("pgd", settings), attacks
    return [], attacks


def refine_attack(attack, steps: int, step_ratio: float = 0.0):
    """``steps`` more PGD steps for a stale push's examples: of ``step_ratio`` × ε, or (0) of the
    training attack's step size."""
    step_size = step_ratio * attack.eps if step_ratio > 0 else attack.effective_step_size
    return dataclasses.replace(attack, name="pgd", steps=steps, step_size=step_size, restarts=1)
