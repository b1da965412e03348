"""N asynchronous attackers emulated in one process: whose push comes next, made with which version.

The MPI parameter server's staleness comes from two rules (see :mod:`psadv.server` and
:mod:`psadv.attacker`): an attacker computes each batch with the newest parameters it holds when it
starts the batch, and the server sends parameters to every attacker every ``refresh_every``
versions, and to one attacker right after rejecting its push. :class:`VirtualAttackers` replays
those rules for N equally fast attackers in their steady-state order (round robin: while the
server keeps up, each push is taken as soon as it is made, so one attacker's pushes are N pushes
apart), deterministically and without MPI or clocks.

Timeline of one push, as on the real system: attacker ``a`` pushes the batch it started with
version ``p``; its send completes when the server takes the push, and before the server has
trained on it the attacker starts its next batch with the newest version it holds; then the server
judges the push (τ = V − p) and, if it applies it and V + 1 is due for a refresh, sends V + 1 to
every attacker. With one attacker and ``refresh_every`` r this gives τ = 1 + ((V − 1) mod r) for
V ≥ 1, a mean of 1 + (r − 1)/2 — 2.5 for the default r = 4, as measured on the real server
(results/emulation-vs-real.toml).

In this regime (the server keeps up, N below the bottleneck model's n*) pushes never wait in the
server's queue, so ``--max-in-flight`` adds no staleness; where the server falls behind, queued
pushes age further, which the emulation does not model. The attack's schedule (ε ramp, steps) follows the
trainer's current progress; a real attacker follows the progress sent with its parameters, at most
a few versions behind.

:class:`SnapshotStore` keeps the parameters of just the versions some attacker still holds or
computes with, each once however many attackers share it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from .models import flat_state, load_flat_state_
from .staleness import StalenessPolicy, window_stats


@dataclass(frozen=True)
class Push:
    attacker: int
    version: int  # the model version the push was computed with


class VirtualAttackers:
    """The order and model versions of N equally fast attackers' pushes (pure: no torch)."""

    def __init__(self, n: int, refresh_every: int, start: int = 0):
        if n < 1 or refresh_every < 1:
            raise ValueError(f"need n >= 1 and refresh_every >= 1, not {n} and {refresh_every}")
        self.n, self.refresh_every = n, refresh_every
        self.turn = 0  # pushes made so far
        # every attacker starts from the model at ``start`` (the server sends it to all at start-up)
        self.held = [start] * n  # the newest version each attacker has received
        self.computing = [start] * n  # the version each attacker's batch in progress uses

    def next_push(self) -> Push:
        """The next push; its attacker starts its next batch with what it holds now."""
        a = self.turn % self.n
        push = Push(a, self.computing[a])
        self.computing[a] = self.held[a]
        self.turn += 1
        return push

    def judged(self, push: Push, version_after: int, applied: bool) -> None:
        """The server applied the push (and is now at ``version_after``) or rejected it."""
        if applied and version_after % self.refresh_every == 0:
            self.held = [version_after] * self.n
        elif not applied:  # the server sends its current parameters to the rejected attacker
            self.held[push.attacker] = version_after

    def versions_in_use(self) -> set[int]:
        return set(self.held) | set(self.computing)

    # --- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {"n": self.n, "refresh_every": self.refresh_every, "turn": self.turn, "held": list(self.held),
                "computing": list(self.computing)}

    def restore(self, state: dict) -> None:
        """Continue from :meth:`state` of a run with the same N (another N starts afresh)."""
        if state.get("n") == self.n:
            self.turn = int(state["turn"])
            self.held = [int(v) for v in state["held"]]
            self.computing = [int(v) for v in state["computing"]]


class SnapshotStore:
    """Parameter snapshots by version: taken when a version is sent, dropped when unused."""

    def __init__(self):
        self.snapshots: dict[int, object] = {}

    def take(self, version: int, flat) -> None:
        self.snapshots.setdefault(version, flat)

    def get(self, version: int):
        return self.snapshots[version]

    def keep_only(self, versions: set[int]) -> None:
        for v in [v for v in self.snapshots if v not in versions]:
            del self.snapshots[v]


class Emulation:
    """``--emulate-attackers N`` in the single-process trainer.

    Each batch is attacked with the snapshot of the version its virtual attacker computes with,
    judged by the MPI server's own :class:`~psadv.staleness.StalenessPolicy`, and trained on when
    applied. A rejected push costs no attack here (nothing would use it), so an emulated run costs
    one attack per applied batch, like a plain single-process run. With ``--push gradients`` the
    gradient is computed on that snapshot too, as a real attacker does, and applied by the server's
    own :class:`~psadv.gradpush.GradientPushes` (delay compensation against the snapshot,
    ``--accumulate``).
    """

    def __init__(self, cfg, model: torch.nn.Module, attack_model: torch.nn.Module, version: int):
        self.schedule = VirtualAttackers(cfg.emulate_attackers, cfg.refresh_every, start=version)
        self.mode = "gradients" if cfg.push == "gradients" else "examples"
        # --refine-on attackers: an attacker refines its batch against the newest parameters it holds
        # when its attack ends. While it takes that last step (about one pass in the attack's k + 1)
        # the server, keeping up, applies about N / (k + 1) other pushes: the refinement sees the last
        # refresh at or before V − lead, where V is the version that judges the push.
        self.refines = self.mode == "examples" and cfg.refine_steps > 0 and cfg.refine_on == "attackers"
        from .attacks import ATTACKS

        passes = (ATTACKS[cfg.attack].fixed_steps or cfg.attack_steps) + 1
        self.lead = math.ceil(cfg.emulate_attackers / passes)
        self.refine_model = copy.deepcopy(attack_model) if self.refines else None
        self.refine_version: int | None = None  # the version the push in hand is refined against
        self.refine_loaded: int | None = None  # the version refine_model holds
        self.policy = StalenessPolicy(self.mode, cfg.max_staleness, cfg.emulate_attackers, lr_damping=cfg.lr_damping)
        self.lr_scale = 1.0  # the policy's lr scale for the push in hand (gradients with --lr-damping)
        self.model, self.attack_model = model, attack_model
        self.store = SnapshotStore()
        self.store.take(version, flat_state(model))
        self.loaded: int | None = None
        self.push: Push | None = None
        self.push_tau = 0
        self.window: list[int] = []  # τ of the pushes applied since the last metrics row
        self.rejected_window = 0

    def attack_model_for_next_batch(self, version: int) -> torch.nn.Module:
        """The model the next applied push was computed with (pushes judged stale are skipped)."""
        while True:
            push = self.schedule.next_push()
            made_for = self._refined_version(push, version) if self.refines else push.version
            verdict = self.policy.judge(version, made_for)
            if verdict.accepted:
                break
            self.rejected_window += 1
            self.schedule.judged(push, version, applied=False)
            self.store.take(version, flat_state(self.model))
        self.push, self.push_tau, self.lr_scale = push, verdict.tau, verdict.lr_scale
        self.refine_version = made_for if made_for > push.version else None
        self.window.append(verdict.tau)
        if self.loaded != push.version:
            load_flat_state_(self.attack_model, self.store.get(push.version))
            self.loaded = push.version
        return self.attack_model

    def _refined_version(self, push: Push, version: int) -> int:
        """The parameters the attacker of ``push`` holds when its attack ends (see ``lead``)."""
        r = self.schedule.refresh_every
        last_refresh = max(0, version - self.lead) // r * r
        return max(push.version, min(self.schedule.held[push.attacker], last_refresh))

    def model_to_refine_against(self) -> torch.nn.Module | None:
        """--refine-on attackers: the model the push in hand is refined against (None: nothing newer)."""
        if self.refine_version is None:
            return None
        if self.refine_loaded != self.refine_version:
            load_flat_state_(self.refine_model, self.store.get(self.refine_version))
            self.refine_loaded = self.refine_version
        return self.refine_model

    def snapshot_of_push(self):
        """The flat parameters the push in hand was computed with."""
        return self.store.get(self.push.version)

    def applied(self, version: int) -> None:
        """The trainer used the push (stepped on it, or accumulated it): the server is at ``version``."""
        self.schedule.judged(self.push, version, applied=True)
        if version % self.schedule.refresh_every == 0:
            self.store.take(version, flat_state(self.model))
        keep = self.schedule.versions_in_use()
        if self.refines:  # the refresh a refinement may still pick up
            keep |= {v for v in self.store.snapshots if v >= version - self.lead - self.schedule.refresh_every}
        self.store.keep_only(keep)

    def window_row(self) -> dict:
        """Staleness since the last call, for a metrics row."""
        taus, rejected = self.window, self.rejected_window
        self.window, self.rejected_window = [], 0
        return {**window_stats(taus), "rejected_stale": self.policy.rejected_stale, "rejected_in_window": rejected}

    def summary(self) -> dict:
        return {"emulated_attackers": self.schedule.n, **self.policy.summary()}

    # --- checkpoints -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"schedule": self.schedule.state(), "policy": self.policy.state()}

    def extra(self) -> dict[str, np.ndarray]:
        versions = sorted(self.store.snapshots)
        return {"emulation_versions": np.array(versions, dtype=np.int64),
                "emulation_snapshots": torch.stack([self.store.get(v) for v in versions]).cpu().numpy(),
                "staleness_hist": self.policy.hist}

    def restore(self, state: dict | None, extra: dict) -> None:
        """Continue an emulation from a checkpoint of a run with the same N (else start afresh)."""
        if not state or "emulation_versions" not in extra:
            return
        self.schedule.restore(state["schedule"])
        if self.schedule.turn == 0:
            return
        self.policy.restore(state["policy"], extra.get("staleness_hist"))
        self.store.snapshots.clear()
        for v, flat in zip(extra["emulation_versions"], extra["emulation_snapshots"]):
            self.store.take(int(v), torch.from_numpy(np.ascontiguousarray(flat)))
