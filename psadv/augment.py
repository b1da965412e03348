"""Training-batch augmentation: random crop (zero padding 4) and horizontal flip, for CIFAR-10.

Each batch's random draws come from a generator keyed by (seed, stream, epoch, position) of the
batch in its :class:`psadv.data.BatchStream`, not from a running generator: nothing needs saving
in a checkpoint, and a resumed run augments every batch exactly as an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

AUGMENTATIONS = ("none", "crop-flip")
PAD = 4  # the CIFAR-10 convention (He et al. 2016; Wong et al. 2020): pad 4, crop back to 32x32


def batch_generator(seed: int, stream: int, position: dict[str, int]) -> np.random.Generator:
    """The generator of the batch at ``position`` (a BatchStream.state() taken before next())."""
    return np.random.default_rng([seed, stream, position["epoch"], position["position"], 0xA06])


def crop_flip(x: np.ndarray, rng: np.random.Generator, pad: int = PAD) -> np.ndarray:
    """Each image of ``x`` (N, C, H, W) cropped at a random offset from its zero-padded copy, then
    flipped left-right with probability 1/2."""
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    out = np.empty_like(x)
    for i, ((dy, dx), flip) in enumerate(zip(offsets, flips)):
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop[:, :, ::-1] if flip else crop
    return out


def augment_batch(name: str, x: np.ndarray, seed: int, stream: int, position: dict[str, int]) -> np.ndarray:
    """``x`` augmented by ``name`` (one of AUGMENTATIONS) with the batch's own random draws."""
    if name == "none":
        return x
    return crop_flip(x, batch_generator(seed, stream, position))
