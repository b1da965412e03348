"""Model factories for the tests of ``--model package.module:factory`` (importable from tests/)."""

from torch import nn


def tiny_net(width: int = 8, num_classes: int = 10, in_channels: int = 1, side: int = 28) -> nn.Module:
    """A small conv net for [0, 1] images of ``in_channels`` x ``side`` x ``side``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(width * ((side + 1) // 2) ** 2, num_classes))


def batchnorm_net(num_classes: int = 10) -> nn.Module:
    """A net with BatchNorm buffers (running statistics travel and export with the weights)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 28 * 28, num_classes))


def not_a_module():
    """A factory that returns something else than an nn.Module."""
    return "a string"


def raises(**kwargs):
    """A factory that fails."""
    raise RuntimeError("the factory is broken")


NOT_CALLABLE = 42



def marker_net(marker: str) -> nn.Module:
    """mnist-small, after writing the file ``marker``: a test sees whether psadv called the factory."""
    from pathlib import Path

    from psadv.models import MnistSmall

    Path(marker).write_text("called")
    return MnistSmall()
