"""The one attack package: threat models, losses, the PGD loop every trainer uses.

* :mod:`.threats` — ε-balls (L∞, L2) intersected with the pixel range, by name in ``THREATS``;
* :mod:`.losses` — per-example attack losses, by name in ``LOSSES``;
* :mod:`.mode` — :func:`attacking`: every attack's model in eval mode with its parameters frozen;
* :mod:`.pgd` — :class:`Attack` and :func:`perturb`: FGSM, FGSM-RS, N-FGSM and PGD as one loop;
* :mod:`.memory` — :class:`PerturbationMemory`: each training example's last perturbation.
"""

from .losses import LOSSES, cross_entropy_loss, margin_loss
from .memory import PerturbationMemory
from .pgd import ATTACKS, Attack, AttackKind, initial_point, perturb, refine, step_size_ratio
from .threats import PIXEL_MAX, PIXEL_MIN, THREATS, L2Threat, LinfThreat, ThreatModel

__all__ = ["ATTACKS", "Attack", "AttackKind", "L2Threat", "LOSSES", "LinfThreat", "PIXEL_MAX", "PIXEL_MIN",
           "PerturbationMemory", "THREATS", "ThreatModel", "cross_entropy_loss", "initial_point", "margin_loss",
           "perturb", "refine", "step_size_ratio"]
