"""The one attack package: threat models, losses, the PGD loop every trainer uses.

* :mod:`.threats` — ε-balls (L∞, L2) intersected with the pixel range, by name in ``THREATS``;
* :mod:`.losses` — per-example attack losses, by name in ``LOSSES``;
* :mod:`.pgd` — :class:`Attack` and :func:`perturb`: FGSM, FGSM-RS and PGD as one loop.
"""

from .losses import LOSSES, cross_entropy_loss, margin_loss
from .pgd import ATTACKS, Attack, AttackKind, perturb, step_size_ratio
from .threats import PIXEL_MAX, PIXEL_MIN, THREATS, L2Threat, LinfThreat, ThreatModel

__all__ = ["ATTACKS", "Attack", "AttackKind", "L2Threat", "LOSSES", "LinfThreat", "PIXEL_MAX", "PIXEL_MIN",
           "THREATS", "ThreatModel", "cross_entropy_loss", "margin_loss", "perturb", "step_size_ratio"]
