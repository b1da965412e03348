"""From a checkpoint file to live objects: the model it records, built only as the caller allows,
and its contents put back into a model, an optimizer and counters.

Reading a checkpoint (:mod:`psadv.checkpoint.codec`) never runs code. Building the model it records
(:func:`build_recorded_model`) can: a ``package.module:factory`` model is the user's code, imported
and called. A file is not trusted to choose code, so that happens only when the caller names the
factory too (``--model``, ``trust_factory``); see :func:`check_trusted`. Contents that read but do
not fit (a missing tensor, arguments the model does not take, a config without ``eps``) are
:func:`psadv.checkpoint.codec.damaged`'s one line.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

from ..config import check_recorded
from ..errors import CheckpointError, ConfigError
from ..models import MODELS, build_factory_model, build_model, is_factory_ref, registry_args_problem
from .codec import Checkpoint, damaged, load_checkpoint, reason_text
from .rotation import find_checkpoint


class IncompatibleCheckpoint(CheckpointError):
    """The checkpoint is fine but holds a different model than the one asked for (exit code 2)."""

    exit_code = 2


class UntrustedFactory(CheckpointError):
    """The file names a ``package.module:factory`` model that the caller did not name (exit code 2):
    building it would run code the file chose."""

    exit_code = 2


# What torch, numpy and the trainer's restore code raise when a file's contents, readable as
# such, do not fit together or with this psadv (a missing state key, a mis-shaped tensor, a value
# of the wrong type, ...). Not AttributeError (psadv's own mistake), and not a device's failure
# (out of memory, a CUDA error): those are not the file's, and keep their traceback.
_RESTORE_ERRORS = (KeyError, IndexError, ValueError, TypeError, RuntimeError, OverflowError)


def _device_failure(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "CUDA" in str(exc))


@contextlib.contextmanager
def restoring(path: str | os.PathLike):
    """Around code that puts a checkpoint's contents back into live objects (model, optimizer,
    counters, data stream, generators, ...): what does not fit becomes :func:`damaged`'s one line."""
    try:
        yield
    except _RESTORE_ERRORS as exc:
        if _device_failure(exc):
            raise
        raise damaged(path, exc) from None


def check_trusted(path: str | os.PathLike, name: str, trust: bool | str | None, what: str = "checkpoint") -> None:
    """Refuse to build a model the caller did not agree to.

    ``trust`` is the model the caller names (``--model``): the file must hold that one, and naming a
    factory is what trusts it. ``True`` trusts whatever the file holds; ``None`` or ``False`` builds
    registry models only, since a factory named in a file is code the file's author chose.
    """
    if isinstance(trust, str) and trust != name:
        raise IncompatibleCheckpoint(f"{what} {path} holds model {name}, not {trust}")
    if is_factory_ref(name) and not (trust is True or trust == name):
        raise UntrustedFactory(f"{what} {path} holds the factory model {name}, and psadv runs a factory named "
                               f"in a file only if you name it too: pass --model {name} (in Python: "
                               f"trust_factory={name!r}) if you trust that code")


def build_recorded_model(path: str | os.PathLike, name: str, args: dict, state: dict[str, torch.Tensor], *,
                         trust: bool | str | None = None, what: str = "checkpoint") -> torch.nn.Module:
    """The model a file records (``name`` built with ``args``, loaded with ``state``), in eval mode.

    Where every file's model becomes a live one: a factory only as :func:`check_trusted` allows, and
    arguments or tensors that do not fit give :func:`damaged`'s one line.
    """
    model = recorded_architecture(path, name, args, trust=trust, what=what)
    return load_recorded_state(model, path, name, state, what)


def recorded_architecture(path: str | os.PathLike, name: str, args: dict, *, trust: bool | str | None = None,
                          what: str = "checkpoint") -> torch.nn.Module:
    """The model a file records, built but not loaded: its state dict says which tensors, of which
    shapes, the file must hold (read before any of them is: :func:`psadv.export.open_model`)."""
    check_trusted(path, name, trust, what)
    if not is_factory_ref(name) and name not in MODELS:
        raise damaged(path, f"unknown model {name!r}", what)
    with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: leave the caller's generator
        if is_factory_ref(name):
            model = build_factory_model(name, args)  # its errors say what the factory did
        else:
            if problem := registry_args_problem(name, args):
                raise damaged(path, problem, what)
            try:
                model = build_model(name, **args)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise damaged(path, f"model {name} cannot be built with arguments {json.dumps(args)}: "
                                    f"{reason_text(exc)}", what) from None
    return model


def load_recorded_state(model: torch.nn.Module, path: str | os.PathLike, name: str, state: dict[str, torch.Tensor],
                        what: str = "checkpoint") -> torch.nn.Module:
    """``model`` loaded with a file's ``state``, in eval mode; :func:`damaged` if they do not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise damaged(path, f"its tensors do not fit model {name}: {reason_text(exc)}", what) from None
    bad = [key for key, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:  # psadv checks a model before it saves one: NaN here is damage, not a run to resume or grade
        raise damaged(path, f"tensor {bad[0]} holds NaN or infinity", what)
    return model.eval()


# What psadv eval and an export's metadata read from a checkpoint's config.
READ_CONFIG = ("dataset", "norm", "eps")


def open_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", *,
                    trust_factory: bool | str | None = None) -> tuple[Checkpoint, torch.nn.Module]:
    """A checkpoint (a file, or a run directory's newest) and its model in eval mode on ``device``.

    The config values its readers need are checked here, once; ``trust_factory`` is
    :func:`check_trusted`'s ``trust``.
    """
    ckpt = load_checkpoint(find_checkpoint(path))
    try:
        check_recorded(ckpt.config, READ_CONFIG)
    except ConfigError as exc:
        raise damaged(ckpt.path, str(exc)) from None
    model = build_recorded_model(ckpt.path, ckpt.model_name, ckpt.model_args, ckpt.model_state, trust=trust_factory)
    return ckpt, model.to(device)
