"""How every attack holds the model: in eval mode, with parameters that need no gradient.

An attack wants the gradient of its loss with respect to the input only. With the parameters'
``requires_grad`` switched off for the attack's length, autograd neither saves nor computes
anything for the weights' gradients, and a layer with its own backward
(:class:`psadv.layers.PhaseConv2d`) skips the weight's gradient too. Together with the phase-form
input gradient that made `psadv train` 1.07× faster; freezing alone measured within the VM's noise
(results/input-gradient.toml). Both the mode and the flags are restored afterwards, also when the
attack raises; parameter gradients already accumulated are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def attacking(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with its trainable parameters frozen; both given back on exit."""
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
