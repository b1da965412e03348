"""The push modes of ``--push``: what an attacker sends the server, one object a mode, found by name.

A mode owns what depends on it alone: its payload (adversarial examples or a gradient), the options
only it reads (refused with another mode by :func:`psadv.config.check_given`), how the staleness
policy counts its pushes (the largest staleness it accepts, whether ``--lr-damping`` scales its
steps: :mod:`psadv.staleness`), how many attackers' batches make a version, and how long a rank
waiting on the other side may sleep. Packing and applying a push still branch on the mode's name in
:mod:`psadv.server`, :mod:`psadv.attacker` and :mod:`psadv.emulate` (issue 36 moves them here next).

Plain data, no torch: :mod:`psadv.config` reads the registry when it loads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PushMode:
    name: str
    # what a push carries: "examples" (x_adv, y and their indices) or "gradients" (a flat gradient
    # and the float buffers), which decides its wire layout (psadv.wire.push_layout)
    payload: str
    # options only this mode reads; with another mode they are refused unless at their default
    own_options: tuple[str, ...] = ()
    # every attacker computes on the same version: only staleness 0 is accepted, one push per attacker
    # averaged into one step (docs/design/staleness.md)
    synchronous: bool = False

    @property
    def poll_cap(self) -> float:
        """The longest back-off sleep (seconds) of a rank waiting for the other side: a synchronous
        round waits on the server and every attacker in turn, once per version, where the default
        10 ms cap added 23 ms a round on this VM, whose sleeps overshoot; 1 ms costs under 2% of
        an idle core in wake-ups (results/sync-data-parallel.toml)."""
        return 1e-3 if self.synchronous else 1e-2

    @property
    def sends_examples(self) -> bool:
        """Pushes of examples: the server trains on them, and ``--refine-steps`` can continue them."""
        return self.payload == "examples"

    def staleness_limit(self, max_staleness: int) -> int:
        """The largest staleness the server accepts (``--max-staleness``, or 0 when synchronous)."""
        return 0 if self.synchronous else max_staleness

    def damps(self, lr_damping: bool) -> bool:
        """Whether ``--lr-damping`` scales an accepted push's learning rate by 1/max(1, τ)."""
        return lr_damping and "lr_damping" in self.own_options

    def batches_per_version(self, accumulate: int, attackers: int) -> int:
        """Attackers' batches behind one version, for counting epochs: one from every attacker in a
        synchronous round, K with ``--accumulate K`` where the mode reads it, else 1."""
        if self.synchronous:
            return max(1, attackers)
        return accumulate if "accumulate" in self.own_options else 1


EXAMPLES = PushMode("examples", payload="examples")
GRADIENTS = PushMode("gradients", payload="gradients", own_options=("lr_damping", "accumulate", "delay_compensation"))
SYNC = PushMode("sync", payload="gradients", synchronous=True)

PUSH_MODES: dict[str, PushMode] = {mode.name: mode for mode in (EXAMPLES, GRADIENTS, SYNC)}


def push_mode(name: str) -> PushMode:
    """The mode named ``name``; ValueError for another (config's choices refuse it first)."""
    try:
        return PUSH_MODES[name]
    except KeyError:
        raise ValueError(f"unknown push mode {name!r}") from None


def examples_per_step(batch_size: int, push: str, emulated_attackers: int) -> int:
    """The examples of one step of the single-process trainer: ``--batch-size``, or, emulating N
    attackers of a synchronous mode, every attacker's batch of a round (N × ``--batch-size``)
    trained as one: the server's mean of N equal batches' mean gradients, exactly, for a model
    without BatchNorm (whose statistics would be per attacker)."""
    synchronous = push_mode(push).synchronous and emulated_attackers > 0
    return batch_size * emulated_attackers if synchronous else batch_size


def owners(option: str) -> list[PushMode]:
    """The modes that read ``option``; with any other it must stay at its default."""
    return [mode for mode in PUSH_MODES.values() if option in mode.own_options]


OWNED_OPTIONS = tuple(dict.fromkeys(option for mode in PUSH_MODES.values() for option in mode.own_options))
