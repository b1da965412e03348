"""The server's side of gradient pushes, shared by the MPI server and the single-process emulation.

A gradient push was computed by an attacker at the parameters of version p and is applied at
version V ≥ p (staleness τ = V − p). Two remedies for τ, both options of ``--push gradients``
(design/staleness.md; measured in results/attackers-recipe.toml):

* ``--delay-compensation λ``: the gradient is corrected to first order for the weights it is applied
  to (:func:`psadv.staleness.delay_compensate`), against the parameters of version p, which the
  server keeps for every version it sent that a push may still use (at most ``--max-staleness``
  versions back). A push whose version is no longer kept (right after a resume) is applied as it is.
* ``--accumulate K``: K accepted pushes are averaged into one optimizer step
  (:class:`psadv.staleness.GradientAccumulator`).

Nothing here survives a resume: the snapshots are rebuilt from the next versions sent, and up to
K − 1 pushes accumulated but not yet stepped on are lost, as pushes in flight are.
"""

from __future__ import annotations

import torch

from .models import param_views
from .staleness import GradientAccumulator, delay_compensate


class GradientPushes:
    def __init__(self, trainer, *, accumulate: int = 1, delay_compensation: float = 0.0, keep_versions: int = 32):
        self.trainer = trainer
        self.lam = delay_compensation
        self.accumulator = GradientAccumulator(accumulate)
        self.keep_versions = keep_versions
        self.snapshots: dict[int, torch.Tensor] = {}  # version -> flat state (only with compensation)

    @classmethod
    def of(cls, trainer) -> "GradientPushes":
        """The server side a trainer's config asks for (--accumulate, --delay-compensation; the
        versions kept are those --max-staleness still accepts)."""
        cfg = trainer.cfg
        return cls(trainer, accumulate=cfg.accumulate, delay_compensation=cfg.delay_compensation,
                   keep_versions=cfg.max_staleness)

    def sent(self, version: int, flat) -> None:
        """The parameters of ``version`` went to some attacker (a flat state vector: tensor or array)."""
        if not self.lam or version in self.snapshots:
            return
        self.snapshots[version] = torch.as_tensor(flat).to(self.trainer.device, copy=True)
        for v in [v for v in self.snapshots if v < version - self.keep_versions]:
            del self.snapshots[v]

    def apply(self, grads: list[torch.Tensor], buffers: list[torch.Tensor], examples: int, push_version: int,
              lr_scale: float = 1.0) -> bool:
        """Use one accepted push; True when it completed an optimizer step (the version advanced)."""
        trainer = self.trainer
        device = trainer.device
        grads = [g.to(device) for g in grads]
        then = self.snapshots.get(push_version) if self.lam and push_version < trainer.version else None
        if then is not None:
            model = trainer.model
            grads = delay_compensate(grads, [p.detach() for p in model.parameters()], param_views(model, then),
                                     self.lam, trainer.second_moments())
        step = self.accumulator.add(grads, buffers, examples, lr_scale)
        if step is None:
            return False
        mean, last_buffers, n, scale = step
        trainer.apply_gradients(mean, last_buffers, n, lr_scale=scale)
        return True
