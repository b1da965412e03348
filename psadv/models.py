"""Model registry: a name maps to a constructor and the input shape it expects.

Checkpoints store the registry name and the constructor arguments, so a resumed or evaluated
run rebuilds exactly the architecture it trained (``build_model(name, **args)``). A name of the
form ``package.module:factory`` is the user's own model instead: a callable returning an
``nn.Module`` for inputs in [0, 1], imported (also from the current directory, searched last) and called with
the ``--model-args`` JSON object as keyword arguments. Building one runs that code, so a factory
that a file names is built only through :func:`psadv.checkpoint.build_recorded_model`, which
requires the caller to name it too.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .layers import PhaseConv2d


class MnistSmall(nn.Sequential):
    """The MNIST net of fast adversarial training (Wong et al. 2020): two strided convs, fc100."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__(
            # the input gradient of every attack step passes through the first conv: PhaseConv2d
            # computes it faster where that pays (psadv/layers.py), values and weights as nn.Conv2d's
            PhaseConv2d(in_channels, 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )


class MnistMadry(nn.Sequential):
    """The MNIST challenge net of Madry et al. 2018: conv32 5x5, pool, conv64 5x5, pool, fc1024."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 1024),
            nn.ReLU(),
            nn.Linear(1024, num_classes),
        )


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 for 32x32 images; input in [0, 1], normalised inside the model."""

    # CIFAR-10 channel statistics; keeping them in the model keeps attacks in pixel space.
    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2471, 0.2435, 0.2616)

    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        mean = torch.tensor(self.MEAN[:in_channels] if in_channels == 3 else [0.5] * in_channels)
        std = torch.tensor(self.STD[:in_channels] if in_channels == 3 else [0.5] * in_channels)
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1((x - self.mean) / self.std))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.linear(out)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # (C, H, W) the architecture is built for
    description: str


MODELS: dict[str, ModelSpec] = {
    "mnist-small": ModelSpec(MnistSmall, (1, 28, 28), "fast-adversarial MNIST net (conv16-conv32-fc100)"),
    "mnist-madry": ModelSpec(MnistMadry, (1, 28, 28), "Madry MNIST challenge net (conv32-conv64-fc1024)"),
    "preact-resnet18": ModelSpec(PreActResNet18, (3, 32, 32), "PreAct-ResNet-18 for CIFAR-10 (GPU runs)"),
}


_FACTORY_REF = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_factory_ref(name: str) -> bool:
    """Whether ``name`` has the form ``package.module:factory`` (a user's model, not a registry name)."""
    return bool(_FACTORY_REF.match(name))


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def import_factory(ref: str) -> Callable[..., nn.Module]:
    """The callable ``package.module:factory`` names; ConfigError (one line) if it cannot be had.

    The current directory is searched too, so a factory beside the command works from the ``psadv``
    script as ``python -m`` would run it, but *last*: a stray ``safetensors.py`` or ``torch.py``
    there must never shadow a package psadv imports later (docs/design/security.md).
    """
    module_name, _, attr = ref.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(f"--model {ref}: cannot import module {module_name!r} (not found on the Python path "
                              "or in the current directory; set PYTHONPATH)") from None
        raise ConfigError(f"--model {ref}: importing module {module_name!r} failed: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module is broken: say how, in one line
        raise ConfigError(f"--model {ref}: importing module {module_name!r} failed: {_one_line(exc)}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"--model {ref}: {getattr(target, '__name__', module_name)!r} has no attribute "
                              f"{part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"--model {ref}: {attr!r} is not callable (it is of type {type(target).__name__}); "
                          "name a function or class that returns an nn.Module")
    return target


def build_factory_model(ref: str, args: dict) -> nn.Module:
    """Call the factory ``ref`` with keyword ``args``; ConfigError unless it returns an nn.Module."""
    factory = import_factory(ref)
    try:
        model = factory(**args)
    except Exception as exc:  # noqa: BLE001 - the user's factory failed: one line, not a traceback
        raise ConfigError(f"--model {ref}: calling it with --model-args '{json.dumps(args)}' raised {_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {ref}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_factory_model(ref: str, args: dict, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Build the factory's model and run one dummy batch: its output must be (batch, num_classes).

    Done before anything is written to a run directory, and on every MPI rank. The global random
    generators are left as they were (the run seeds its own model later).
    """
    batch = 2  # more than one example, so BatchNorm in training mode would work too
    with torch.random.fork_rng(devices=[]):
        model = build_factory_model(ref, args)
        shape_text = "x".join(map(str, input_shape))
        try:
            with torch.no_grad():
                out = model.eval()(torch.zeros(batch, *input_shape))
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"--model {ref}: a batch of {batch} {shape_text} inputs fails in its forward pass: "
                              f"{_one_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"--model {ref}: a batch of {batch} {shape_text} inputs gives output {got}, but the "
                          f"dataset needs ({batch}, {num_classes}) (one logit per class)")


def model_args_for(name: str, input_shape: tuple[int, int, int], num_classes: int,
                   factory_args: dict | None = None) -> dict:
    """Constructor arguments of model ``name`` for a dataset; error if the shapes don't fit.

    A factory model (``module:attr``) gets exactly ``factory_args`` (``--model-args``), checked by
    building it and running one dummy batch.
    """
    if is_factory_ref(name):
        args = dict(factory_args or {})
        check_factory_model(name, args, tuple(input_shape), num_classes)
        return args
    spec = get_spec(name)
    if tuple(input_shape) != spec.input_shape:
        want = "x".join(map(str, spec.input_shape))
        got = "x".join(map(str, input_shape))
        fitting = [n for n, m in MODELS.items() if m.input_shape == tuple(input_shape)]
        hint = f"; models for {got} inputs: {', '.join(fitting)}" if fitting else ""
        raise ConfigError(f"model {name} expects {want} inputs, but the dataset has {got}{hint}")
    return {"in_channels": int(input_shape[0]), "num_classes": int(num_classes)}


def registry_args_problem(name: str, args: dict) -> str | None:
    """What is wrong with a file's arguments for registry model ``name`` (its builders take
    ``in_channels`` and ``num_classes``, integers in bounds: a crafted num_classes of 10**12 would
    allocate terabytes in the last layer), or None."""
    from .untrusted import MAX_CHANNELS, MAX_CLASSES

    bounds = {"in_channels": (1, MAX_CHANNELS), "num_classes": (2, MAX_CLASSES)}
    why = f"model {name} cannot be built with arguments {json.dumps(args)[:200]}"
    unknown = sorted(set(args) - set(bounds))
    if unknown:
        return f"{why}: unexpected keyword argument {unknown[0]!r}"
    for key, value in args.items():
        low, high = bounds[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"{why}: {key} must be an integer from {low} to {high}"
    return None


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or package.module:factory")
    return MODELS[name]


def build_model(name: str, **args) -> nn.Module:
    """Build model ``name`` (registered, or a ``module:factory``) with ``args`` (as stored in checkpoints).

    Names from the user only: a name read from a file goes through
    :func:`psadv.checkpoint.build_recorded_model`, which builds a factory only if the caller names it.
    """
    if is_factory_ref(name):
        return build_factory_model(name, args)
    return get_spec(name).build(**args)


def float_state(model: nn.Module) -> list[torch.Tensor]:
    """The model's floating-point parameters and buffers, in state-dict order.

    This is what a copy of the model needs to compute like the original: it travels to attackers
    as one flat buffer and fills the staleness ring buffer.
    """
    return [t for t in model.state_dict().values() if t.is_floating_point()]


def float_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The model's floating-point buffers (BatchNorm statistics), in a fixed order."""
    return [b for b in model.buffers() if b.is_floating_point()]


def flat_state(model: nn.Module) -> torch.Tensor:
    """:func:`float_state` concatenated into one detached float32 vector."""
    return torch.cat([t.detach().reshape(-1).float() for t in float_state(model)])


def param_views(model: nn.Module, vector: torch.Tensor) -> list[torch.Tensor]:
    """The slices of a :func:`flat_state` vector that hold ``model.parameters()``, in that order and
    shaped like them (views: no copy), for arithmetic on parameters kept as flat snapshots."""
    offsets, offset = {}, 0
    for name, t in model.state_dict(keep_vars=True).items():
        if t.is_floating_point():
            offsets.setdefault(id(t), offset)
            offset += t.numel()
    return [vector[offsets[id(p)]:offsets[id(p)] + p.numel()].view_as(p) for p in model.parameters()]


@torch.no_grad()
def load_flat_state_(model: nn.Module, vector: torch.Tensor) -> None:
    """Copy a vector made by :func:`flat_state` (of the same architecture) into ``model``."""
    offset = 0
    for t in float_state(model):
        n = t.numel()
        t.copy_(vector[offset:offset + n].view_as(t))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"state vector has {vector.numel()} values, model needs {offset}")
