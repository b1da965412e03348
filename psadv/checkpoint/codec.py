"""The checkpoint codec: the one place that defines the checkpoint file format, and the only code
that reads or writes its files.

A checkpoint is one HDF5 file holding plain numeric datasets and JSON string attributes. No
serialized Python objects are stored, so any HDF5 tool can open a checkpoint and reading one
(:func:`load_checkpoint`, :func:`describe_checkpoint`) never runs code. This layer knows files, not
configurations or models: turning what a file records into a live model (and deciding whether its
code may run) is :mod:`psadv.checkpoint.restore`'s, and a run's numbered checkpoints are
:mod:`psadv.checkpoint.rotation`'s.

Format reference (``format_version`` 1)
---------------------------------------

Root attributes:

``format``          the string ``"psadv-checkpoint"``.
``format_version``  integer, currently 1. Readers refuse files with a newer version.
``model_name``      string: the registered name of the model architecture.
``model_args``      JSON string: keyword arguments the model was built with.
``config``          JSON string: the resolved run configuration.
``state``           JSON string: the trainer's progress. By convention it holds ``version`` (the
                    parameter version counter) and ``examples_seen``; also the schedule position,
                    data stream state, elapsed training time and anything else JSON-able.
``created``         ISO 8601 UTC time of writing.
``psadv_version``   the psadv version that wrote the file.

Every dataset holding a tensor carries the string attribute ``torch_dtype`` (e.g. ``"float32"``).
``bfloat16`` tensors, a dtype numpy lacks, are stored as an int16 view of their bytes and viewed
back on load.

Group ``model/`` (required): one dataset per entry of ``model.state_dict()`` (parameters and
buffers), named by the exact state-dict key (dots included) and kept in state-dict order. Each has
a string attribute ``role``: ``"parameter"`` or ``"buffer"``.

Group ``optimizer/`` (optional): ``optimizer.state_dict()``.

* attribute ``param_groups``: JSON list of the param groups without their tensor values; each
  ``params`` is a list of ints. Tuples (Adam's ``betas``) are encoded as ``{"__tuple__": [...]}``
  so they come back as tuples.
* subgroup ``group_tensors/<group index>/`` (only when a group holds tensors, e.g. a tensor
  learning rate): one dataset per tensor-valued key.
* subgroup ``state/<param index>/``: one dataset per key of that parameter's state. The dataset
  attribute ``kind`` says what to give back: ``"tensor"`` (an array, 0-d for e.g. Adam's ``step``),
  ``"int"``, ``"float"`` or ``"bool"`` (a scalar dataset that was a Python number), or ``"none"``
  (an empty dataset standing for ``None``, e.g. an SGD ``momentum_buffer`` not yet created).

Group ``rng/`` (optional): random generator states, see :func:`capture_rng_state`.

* dataset ``torch``: uint8 array from ``torch.get_rng_state()``.
* datasets ``cuda_<i>``: uint8 array of CUDA device *i*'s generator, when CUDA was available.
* attribute ``numpy_global``: JSON of ``np.random.get_state()`` (the legacy global generator).
* attribute ``python``: JSON of ``random.getstate()``.

The JSON in ``rng/`` uses the same tuple encoding as ``param_groups`` and encodes numpy arrays
as ``{"__ndarray__": [...], "dtype": "<u4"}``.

Group ``extra/`` (optional): named numpy arrays the trainer wants back (a staleness ring buffer,
a histogram, ...), one dataset each. A run with ``--ema-decay`` stores its weight average in
``model/`` (the model it delivers, which every reader loads) and the live weights it trains on in
``extra/live_weights``, one float32 vector (:func:`psadv.models.flat_state`'s order).

Files are written atomically: to a hidden temporary file in the same directory, fsynced, then
renamed over the final name, and the directory is fsynced. A crash never leaves a half-written
checkpoint under a checkpoint name. Only one process writes a run's checkpoints: the one holding
the run directory's lock (:class:`psadv.rundir.RunDir`, which
:class:`psadv.checkpoint.rotation.CheckpointManager` requires).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .. import __version__, untrusted
from ..errors import CheckpointError, io_error_text

# The process's umask, read once at import: reading it means setting it, which would race with
# another thread creating files if done at every save.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

FORMAT = "psadv-checkpoint"
FORMAT_VERSION = 1

_ROOT_JSON_ATTRS = ("model_args", "config", "state")
_ROOT_STR_ATTRS = ("model_name", "created", "psadv_version")
_RNG_JSON = ("numpy_global", "python")  # the rng/ attributes

# What h5py, json and numpy raise when a file's metadata or contents are damaged
# (h5py gives None for links that no longer resolve, hence AttributeError).
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError, OverflowError)


@dataclass
class Checkpoint:
    """Everything read back from a checkpoint file.

    ``model_state`` feeds ``model.load_state_dict`` and ``optimizer_state`` (when present) feeds
    ``optimizer.load_state_dict`` directly; ``rng`` feeds :func:`restore_rng_state`.
    """

    path: Path
    model_name: str
    model_args: dict
    config: dict
    state: dict
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    rng: dict | None
    extra: dict[str, np.ndarray]
    format_version: int
    created: str
    psadv_version: str


# --------------------------------------------------------------------------------------------
# JSON helpers


def _plain_json(value: Any, what: str, path: Path) -> str:
    """JSON for user data (model args, config, state); numpy scalars become Python numbers."""

    def numpy_scalar(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    if not isinstance(value, dict):
        raise CheckpointError(f"cannot save checkpoint {path}: {what} must be a dict, not {type(value).__name__}")
    try:
        return json.dumps(value, default=numpy_scalar)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot save checkpoint {path}: {what} is not JSON-serializable ({exc})") from None


def _encode(obj: Any) -> Any:
    """Turn tuples and numpy arrays into tagged JSON so :func:`_decode` restores them exactly."""
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x) for x in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError("dict keys must be strings")
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} as JSON")


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(x) for x in obj]
    if isinstance(obj, dict):
        if obj.keys() == {"__tuple__"}:
            return tuple(_decode(x) for x in obj["__tuple__"])
        if obj.keys() == {"__ndarray__", "dtype"}:
            return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
        return {k: _decode(v) for k, v in obj.items()}
    return obj


def _tagged_json(value: Any, what: str, path: Path) -> str:
    try:
        return json.dumps(_encode(value))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot save checkpoint {path}: {what} cannot be stored ({exc})") from None


def _attr_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------------------------
# tensors <-> datasets


def _check_name(name: str, what: str, path: Path) -> None:
    if not name or "/" in name or name == ".":
        raise CheckpointError(f"cannot save checkpoint {path}: {what} name {name!r} cannot be an HDF5 name")


def _write_tensor(group: h5py.Group, name: str, tensor: torch.Tensor, path: Path) -> h5py.Dataset:
    if tensor.layout != torch.strided:
        raise CheckpointError(f"cannot save checkpoint {path}: tensor {name!r} has unsupported layout {tensor.layout}")
    t = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    try:
        array = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()  # numpy has no bfloat16
    except TypeError:
        raise CheckpointError(f"cannot save checkpoint {path}: tensor {name!r} has dtype {t.dtype}, "
                              "which psadv checkpoints cannot hold") from None
    ds = group.create_dataset(name, data=array)
    ds.attrs["torch_dtype"] = str(t.dtype).removeprefix("torch.")
    return ds


def _read_array(ds: h5py.Dataset) -> np.ndarray:
    return np.asarray(ds[()])


def _read_tensor(ds: h5py.Dataset) -> torch.Tensor:
    tensor = torch.from_numpy(_read_array(ds))
    dtype_name = _attr_str(ds.attrs["torch_dtype"])
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dataset {ds.name} has unknown torch_dtype {dtype_name!r}")
    if tensor.dtype != dtype:
        tensor = tensor.view(dtype)
    return tensor


def _write_value(group: h5py.Group, name: str, value: Any, path: Path) -> None:
    """One optimizer-state entry, marked with the Python type it must come back as."""
    if isinstance(value, torch.Tensor):
        ds = _write_tensor(group, name, value, path)
        kind = "tensor"
    elif value is None:
        ds = group.create_dataset(name, data=h5py.Empty("f4"))
        kind = "none"
    elif isinstance(value, bool):
        ds = group.create_dataset(name, data=np.bool_(value))
        kind = "bool"
    elif isinstance(value, int):
        ds = group.create_dataset(name, data=np.int64(value))
        kind = "int"
    elif isinstance(value, float):
        ds = group.create_dataset(name, data=np.float64(value))
        kind = "float"
    else:
        raise CheckpointError(
            f"cannot save checkpoint {path}: optimizer state {group.name}/{name} is a {type(value).__name__}, "
            "which psadv checkpoints cannot hold"
        )
    ds.attrs["kind"] = kind


def _read_value(ds: h5py.Dataset) -> Any:
    kind = _attr_str(ds.attrs["kind"])
    if kind == "tensor":
        return _read_tensor(ds)
    if kind == "none":
        return None
    if kind == "bool":
        return bool(ds[()])
    if kind == "int":
        return int(ds[()])
    if kind == "float":
        return float(ds[()])
    raise ValueError(f"dataset {ds.name} has unknown kind {kind!r}")


# --------------------------------------------------------------------------------------------
# random number generators


def capture_rng_state() -> dict:
    """Snapshot every random generator a training run draws from.

    Returns a dict with ``torch`` (uint8 tensor), ``cuda`` (list of uint8 tensors, only when CUDA
    is available), ``numpy_global`` (``np.random.get_state()``) and ``python`` (``random.getstate()``).
    Pass it as ``rng=`` to :func:`save_checkpoint`; ``Checkpoint.rng`` has the same shape.
    """
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_global": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng_state(d: dict) -> None:
    """Put back generator states captured by :func:`capture_rng_state` (or loaded from a checkpoint).

    CUDA states are restored for as many devices as both the snapshot and this machine have.
    """
    torch.set_rng_state(d["torch"])
    if "cuda" in d and torch.cuda.is_available():
        for index, state in enumerate(d["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    np.random.set_state(d["numpy_global"])
    random.setstate(d["python"])


def _write_rng(f: h5py.File, rng: dict, path: Path) -> None:
    group = f.create_group("rng")
    _write_tensor(group, "torch", rng["torch"], path)
    for index, state in enumerate(rng.get("cuda", [])):
        _write_tensor(group, f"cuda_{index}", state, path)
    for key in _RNG_JSON:
        group.attrs[key] = _tagged_json(rng[key], f"rng[{key!r}]", path)


def _read_rng(group: h5py.Group) -> dict:
    rng: dict[str, Any] = {"torch": _read_tensor(group["torch"])}
    cuda_names = sorted((n for n in group if n.startswith("cuda_")), key=lambda n: int(n.removeprefix("cuda_")))
    if cuda_names:
        rng["cuda"] = [_read_tensor(group[n]) for n in cuda_names]
    for key in _RNG_JSON:
        if key in group.attrs:
            rng[key] = _decode(json.loads(_attr_str(group.attrs[key])))
    return rng


# --------------------------------------------------------------------------------------------
# writing


def _write_contents(
    f: h5py.File,
    path: Path,
    *,
    model_name: str,
    model_args: dict,
    config: dict,
    state: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    rng: dict | None,
    extra: dict[str, np.ndarray] | None,
) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = np.int64(FORMAT_VERSION)
    f.attrs["model_name"] = model_name
    f.attrs["model_args"] = _plain_json(model_args, "model_args", path)
    f.attrs["config"] = _plain_json(config, "config", path)
    f.attrs["state"] = _plain_json(state, "state", path)
    f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    f.attrs["psadv_version"] = __version__

    parameter_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    model_group = f.create_group("model", track_order=True)
    for name, value in model.state_dict().items():
        _check_name(name, "state-dict entry", path)
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"cannot save checkpoint {path}: state-dict entry {name!r} is not a tensor")
        ds = _write_tensor(model_group, name, value, path)
        ds.attrs["role"] = "parameter" if name in parameter_names else "buffer"

    if optimizer is not None:
        _write_optimizer(f, optimizer.state_dict(), path)
    if rng is not None:
        _write_rng(f, rng, path)
    if extra:
        extra_group = f.create_group("extra", track_order=True)
        for name, array in extra.items():
            _check_name(name, "extra array", path)
            array = np.asarray(array)
            if array.dtype.kind in "OUV":
                raise CheckpointError(
                    f"cannot save checkpoint {path}: extra array {name!r} has unsupported dtype {array.dtype}"
                )
            extra_group.create_dataset(name, data=array)


def _write_optimizer(f: h5py.File, state_dict: dict, path: Path) -> None:
    group = f.create_group("optimizer")
    plain_groups = []
    for index, param_group in enumerate(state_dict["param_groups"]):
        plain = {}
        for key, value in param_group.items():
            if isinstance(value, torch.Tensor):
                _check_name(key, "optimizer param-group key", path)
                _write_tensor(group.require_group(f"group_tensors/{index}"), key, value, path)
            else:
                plain[key] = value
        plain_groups.append(plain)
    group.attrs["param_groups"] = _tagged_json(plain_groups, "optimizer param_groups", path)
    state_group = group.create_group("state", track_order=True)
    for param_index, param_state in state_dict["state"].items():
        if not isinstance(param_index, int):
            raise CheckpointError(f"cannot save checkpoint {path}: optimizer state key {param_index!r} is not an int")
        sub = state_group.create_group(str(param_index), track_order=True)
        for key, value in param_state.items():
            _check_name(key, "optimizer state key", path)
            _write_value(sub, key, value, path)


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        _fsync_path(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model_name: str,
    model_args: dict,
    config: dict,
    state: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a checkpoint atomically to ``path`` (parent directories are created) and return it.

    ``rng`` is a dict from :func:`capture_rng_state`. If anything fails, no file appears under
    ``path`` and an existing file there is left as it was.
    """
    path = Path(path)
    if not isinstance(model_name, str) or not model_name:
        raise CheckpointError(f"cannot save checkpoint {path}: model_name must be a non-empty string")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
        os.close(fd)
    except OSError as exc:
        raise CheckpointError(f"cannot save checkpoint {path}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    with contextlib.suppress(OSError):  # some shared filesystems have no modes: keep mkstemp's
        # mkstemp makes the file private (0600); a checkpoint gets the mode of every other file of
        # the run, so colleagues sharing a cluster directory can read it
        tmp.chmod(0o666 & ~_UMASK)
    try:
        with h5py.File(tmp, "w") as f:
            _write_contents(
                f,
                path,
                model_name=model_name,
                model_args=model_args,
                config=config,
                state=state,
                model=model,
                optimizer=optimizer,
                rng=rng,
                extra=extra,
            )
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        # h5py reports a failed write (disk full, file too large) as OSError or, when it fails
        # while closing the file, as a RuntimeError that carries the system's errno.
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "errno = " in str(exc)):
            raise CheckpointError(f"cannot save checkpoint {path}: {io_error_text(exc)}") from None
        raise
    try:
        _fsync_dir(path.parent)
    except OSError as exc:
        raise CheckpointError(
            f"cannot save checkpoint {path}: fsync of its directory failed: {_one_line(exc)}"
        ) from None
    return path


# --------------------------------------------------------------------------------------------
# reading


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _Reader:
    """Opens and validates a checkpoint; turns every read failure into a CheckpointError."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file: h5py.File | None = None

    def __enter__(self) -> h5py.File:
        path = self.path
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        if path.is_dir():
            raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
        try:
            with open(path, "rb"):  # the system's reason (permission denied, ...), which HDF5 would call corruption
                pass
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {io_error_text(exc)}") from None
        try:
            self.file = h5py.File(path, "r")
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {path} is not a readable HDF5 file (truncated or corrupted?): {_one_line(exc)}"
            ) from None
        try:
            self._validate(self.file)
        except BaseException:
            self.file.close()
            raise
        return self.file

    def _validate(self, f: h5py.File) -> None:
        path = self.path
        try:
            # Before any value is read: no link out of the file, no external storage, no virtual
            # dataset, scalar attributes, and no more declared bytes than the file holds (psadv
            # writes contiguous, unfiltered datasets): a crafted file neither reads another file
            # nor allocates beyond its own size (docs/design/security.md).
            untrusted.check_structure(f, CheckpointError, f"checkpoint {path}", byte_budget=path.stat().st_size,
                                      stored_as_written=True)
            fmt = f.attrs.get("format")
            if fmt is None or _attr_str(fmt) != FORMAT:
                raise CheckpointError(f"{path} is not a psadv checkpoint (no format={FORMAT!r} attribute)")
            version = f.attrs.get("format_version")
            if version is None or np.ndim(version) != 0 or not np.issubdtype(np.asarray(version).dtype, np.integer):
                raise CheckpointError(f"checkpoint {path} has no valid format_version attribute")
            if int(version) > FORMAT_VERSION:
                raise CheckpointError(
                    f"checkpoint {path} has format version {int(version)}, newer than the {FORMAT_VERSION} "
                    f"this psadv {__version__} reads; upgrade psadv"
                )
            if int(version) < 1:
                raise CheckpointError(f"checkpoint {path} has invalid format version {int(version)}")
            for name in _ROOT_JSON_ATTRS + _ROOT_STR_ATTRS:
                if name not in f.attrs:
                    raise CheckpointError(f"checkpoint {path} lacks the {name!r} attribute (corrupted?)")
                untrusted.check_attribute(f, name, CheckpointError, f"checkpoint {path}", "str")
            if not isinstance(f.get("model"), h5py.Group):
                raise CheckpointError(f"checkpoint {path} has no model/ group (corrupted?)")
        except _READ_ERRORS as exc:
            raise CheckpointError(f"checkpoint {path} is corrupted: {_one_line(exc)}") from None

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is not None:
            self.file.close()
        if exc is not None and isinstance(exc, _READ_ERRORS):
            raise CheckpointError(f"checkpoint {self.path} is truncated or corrupted: {_one_line(exc)}") from None


def _root_json(f: h5py.File, name: str, path: Path) -> dict:
    value = json.loads(_attr_str(f.attrs[name]))
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint {path} is corrupted: attribute {name!r} is not a JSON object")
    return value


# The counters of a checkpoint's state that psadv computes with and builds file names from
# (``model-v<version>``): counts, never text such as "480x" or a path (docs/design/security.md).
_STATE_COUNTS = ("version", "examples_seen")


def _check_state(state: dict, path: Path) -> dict:
    """``state`` if its counters are non-negative integers and its elapsed time a finite number
    >= 0 (where present); else :func:`damaged`'s one line."""
    for key in _STATE_COUNTS:
        value = state.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise damaged(path, f"its state's {key} is {value!r}, not a count (an integer >= 0)")
    elapsed = state.get("elapsed", 0.0)
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not math.isfinite(elapsed) \
            or elapsed < 0:
        raise damaged(path, f"its state's elapsed time is {elapsed!r}, not a number of seconds")
    return state


def _read_optimizer(group: h5py.Group) -> dict:
    param_groups = _decode(json.loads(_attr_str(group.attrs["param_groups"])))
    if "group_tensors" in group:
        for index, tensors in group["group_tensors"].items():
            for key, ds in tensors.items():
                param_groups[int(index)][key] = _read_tensor(ds)
    state = {int(index): {key: _read_value(ds) for key, ds in sub.items()} for index, sub in group["state"].items()}
    return {"state": state, "param_groups": param_groups}


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and validate a checkpoint.

    Model tensors are moved to ``map_location``; optimizer state stays on the CPU
    (``optimizer.load_state_dict`` moves it next to each parameter) and RNG states stay on the CPU
    (where the setters need them). Any problem with the file raises :class:`CheckpointError`.
    """
    reader = _Reader(path)
    with reader as f:
        model_state = {name: _read_tensor(ds).to(map_location) for name, ds in f["model"].items()}
        return Checkpoint(
            path=reader.path,
            model_name=_attr_str(f.attrs["model_name"]),
            model_args=_root_json(f, "model_args", reader.path),
            config=_root_json(f, "config", reader.path),
            state=_check_state(_root_json(f, "state", reader.path), reader.path),
            model_state=model_state,
            optimizer_state=_read_optimizer(f["optimizer"]) if "optimizer" in f else None,
            rng=_read_rng(f["rng"]) if "rng" in f else None,
            extra={name: _read_array(ds) for name, ds in f["extra"].items()} if "extra" in f else {},
            format_version=int(f.attrs["format_version"]),
            created=_attr_str(f.attrs["created"]),
            psadv_version=_attr_str(f.attrs["psadv_version"]),
        )


def _scalar_leaves(value: dict, prefix: str = "") -> dict:
    """Flatten nested dicts to dotted keys, keeping only scalar leaves (no lists)."""
    leaves: dict[str, Any] = {}
    for key, item in value.items():
        dotted = f"{prefix}{key}"
        if isinstance(item, dict):
            leaves.update(_scalar_leaves(item, f"{dotted}."))
        elif item is None or isinstance(item, (bool, int, float, str)):
            leaves[dotted] = item
    return leaves


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """A JSON-able summary of a checkpoint for ``psadv inspect``, without loading its tensors.

    Keys: ``path``, ``format``, ``format_version``, ``model_name``, ``model_args``, ``version``,
    ``examples_seen``, ``parameter_count`` (elements in parameters), ``buffer_count`` (elements in
    buffers), ``tensor_count`` (model state-dict entries), ``tensor_bytes``, ``has_optimizer``,
    ``has_rng``, ``extra`` (names), ``state`` and ``config`` (scalar leaves, nested keys dotted),
    ``created``, ``psadv_version`` and ``file_size`` (bytes).
    """
    reader = _Reader(path)
    with reader as f:
        parameter_count = buffer_count = tensor_bytes = 0
        datasets = list(f["model"].values())
        for ds in datasets:
            count = int(np.prod(ds.shape, dtype=np.int64))
            tensor_bytes += count * ds.dtype.itemsize
            if _attr_str(ds.attrs.get("role", "buffer")) == "parameter":
                parameter_count += count
            else:
                buffer_count += count
        state = _check_state(_root_json(f, "state", reader.path), reader.path)
        return {
            "path": str(reader.path),
            "format": FORMAT,
            "format_version": int(f.attrs["format_version"]),
            "model_name": _attr_str(f.attrs["model_name"]),
            "model_args": _root_json(f, "model_args", reader.path),
            "version": state.get("version"),
            "examples_seen": state.get("examples_seen"),
            "parameter_count": parameter_count,
            "buffer_count": buffer_count,
            "tensor_count": len(datasets),
            "tensor_bytes": tensor_bytes,
            "has_optimizer": "optimizer" in f,
            "has_rng": "rng" in f,
            "extra": list(f["extra"]) if "extra" in f else [],
            "state": _scalar_leaves(state),
            "config": _scalar_leaves(_root_json(f, "config", reader.path)),
            "created": _attr_str(f.attrs["created"]),
            "psadv_version": _attr_str(f.attrs["psadv_version"]),
            "file_size": reader.path.stat().st_size,
        }


# --------------------------------------------------------------------------------------------
# contents that read but do not fit


def reason_text(exc: BaseException) -> str:
    """What went wrong, in one line, from an exception that a file's contents caused."""
    if isinstance(exc, KeyError) and exc.args:
        return f"missing {exc.args[0]!r}"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # load_state_dict says what is wrong on the lines after its first ("Error(s) in loading ...")
    text = " ".join(lines[1:] if isinstance(exc, RuntimeError) and len(lines) > 1 else lines[:1])
    return text or type(exc).__name__


def damaged(path: str | os.PathLike, reason: BaseException | str, what: str = "checkpoint") -> CheckpointError:
    """The one-line error for a file that reads fine but whose contents psadv cannot use."""
    text = reason if isinstance(reason, str) else reason_text(reason)
    return CheckpointError(f"{what} {path} is corrupted or incompatible: {text}")
