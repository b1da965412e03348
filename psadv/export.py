"""Models that leave psadv: safetensors and ONNX export, and :func:`load_model`.

Checkpoints stay HDF5 (:mod:`psadv.checkpoint`); the exchange format is **safetensors**: the
model's state dict (parameters and buffers under their ``state_dict()`` keys) and, in the header's
``__metadata__`` (string values, JSON where a value is not a plain string), what a user of the
weights needs to know:

``format``          ``"psadv-model"``; ``format_version``: ``"1"``.
``model_name``      the registry name (``mnist-small``, ...) or ``package.module:factory``.
``model_args``      JSON object: the keyword arguments the model is built with.
``eps``, ``norm``   the threat model it was trained against (JSON number; ``linf`` or ``l2``).
``dataset``         the training dataset (``data_md5`` too for ``npz``/``hdf5`` files).
``input_range``     ``"[0, 1]"``: inputs are pixels in [0, 1], any normalisation is inside the model.
``input_shape``     JSON ``[C, H, W]``; ``num_classes``: the number of logits (when known).
``version``         the model version (optimizer steps) of the checkpoint it came from.
``psadv_version``   the psadv that exported it; ``trained_with``: the one that wrote the checkpoint.
``final_eval``      JSON of ``psadv eval --save`` (``RUN/final_eval.json``), when that measured this
                    very version.

:func:`load_model` reads an exported file, a checkpoint or a run directory back into an
``nn.Module`` in eval mode, without MPI; a ``package.module:factory`` model only with
``trust_factory`` (:func:`psadv.checkpoint.check_trusted`: the file does not get to choose code
to run). ONNX export (``pip install 'psadv[onnx]'``) writes the
same metadata as the ONNX model's ``metadata_props``, with a dynamic batch dimension.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import re
import struct
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .checkpoint.codec import Checkpoint, damaged
from .checkpoint.restore import READ_CONFIG, load_recorded_state, open_checkpoint, recorded_architecture
from .config import check_recorded
from .errors import CheckpointError, ConfigError, PsadvError, StorageError, UsageError, io_error_text
from .models import MODELS
from .rundir import FINAL_EVAL, run_of

FORMAT = "psadv-model"
FORMAT_VERSION = "1"
FORMATS = ("safetensors", "onnx")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file: a little-endian u64 header size, then ``{``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < (100 << 20)


def _input_shape(cfg: dict, model_name: str, model_args: dict) -> tuple[int, ...] | None:
    """(C, H, W) the model takes: the registry's, else the dataset's (a data file only if it is there)."""
    from .data import DATASETS, dataset_info

    if model_name in MODELS:
        return (int(model_args.get("in_channels", MODELS[model_name].input_shape[0])),
                *MODELS[model_name].input_shape[1:])
    if cfg.get("dataset") in DATASETS:
        return DATASETS[cfg["dataset"]].shape
    try:
        return dataset_info(cfg.get("dataset", ""), cfg.get("data_dir") or None).shape
    except PsadvError:  # the training file is gone: the metadata goes without a shape
        return None


def checkpoint_metadata(ckpt: Checkpoint, model: nn.Module) -> dict[str, str]:
    """The ``__metadata__`` of an export of ``ckpt`` (whose model ``model`` is, built and loaded)."""
    cfg = ckpt.config
    version = ckpt.state.get("version")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_name": ckpt.model_name,
            "model_args": json.dumps(ckpt.model_args, sort_keys=True), "eps": json.dumps(cfg["eps"]),
            "norm": cfg["norm"], "dataset": cfg["dataset"], "input_range": "[0, 1]", "version": str(version),
            "psadv_version": __version__, "trained_with": ckpt.psadv_version}
    if cfg.get("data_md5"):
        meta["data_md5"] = cfg["data_md5"]
    shape = _input_shape(cfg, ckpt.model_name, ckpt.model_args)
    if shape is not None:
        meta["input_shape"] = json.dumps(list(shape))
        with torch.no_grad():
            meta["num_classes"] = str(model(torch.zeros(1, *shape)).shape[1])
    run_dir = run_of(ckpt.path)
    final = _final_eval(run_dir) if run_dir is not None else None
    if final is not None and final.get("version") == version:
        meta["final_eval"] = json.dumps(final, sort_keys=True)
    return meta


def _final_eval(run_dir: Path) -> dict | None:
    try:
        value = json.loads((run_dir / FINAL_EVAL).read_text())
    except (OSError, ValueError):  # none, or unreadable: the export goes without it
        return None
    return value if isinstance(value, dict) else None


# Metadata keys an export never writes (open_model adds them for a checkpoint, from this machine):
# in a file they would steer where psadv reads or writes, so a file's own are dropped.
LOCAL_KEYS = ("source", "data_dir")


def _checked_metadata(meta: dict, path: Path) -> tuple[str, dict]:
    """The model name and arguments of an export's metadata, after checking every value psadv
    computes with: the format, a version that is a count, ε, norm and dataset (docs/design/security.md)."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file without psadv's metadata (format={FORMAT!r}); "
                              "load its tensors with safetensors.torch.load_file into your own model")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has psadv-model format version {str(meta.get('format_version'))[:40]!r}; "
                              f"this psadv {__version__} reads version {FORMAT_VERSION}")
    try:
        args = json.loads(meta["model_args"])
        name = meta["model_name"]
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise damaged(path, f"bad psadv metadata ({_short(exc)})", "model file") from None
    if not isinstance(args, dict):
        raise damaged(path, f"its model_args {meta['model_args'][:80]} are not a JSON object", "model file")
    if "version" in meta and metadata_version(meta) is None:
        raise damaged(path, f"its version {meta['version'][:40]!r} is not a count (an integer >= 0)", "model file")
    recorded = {key: meta[key] for key in READ_CONFIG if key in meta}
    try:
        if "eps" in recorded:
            recorded["eps"] = json.loads(recorded["eps"])
        check_recorded(recorded, READ_CONFIG)
    except (ConfigError, ValueError, RecursionError) as exc:
        raise damaged(path, _short(exc), "model file") from None
    return name, args


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def metadata_version(meta: dict) -> int | None:
    """An export's ``version`` as an integer, or None when it has none or it is not a count."""
    text = meta.get("version")
    return int(text) if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) < 19 else None


def _load_safetensors(path: Path, device: str | torch.device,
                      trust_factory: bool | str | None) -> tuple[nn.Module, dict[str, str]]:
    """The model of an export: its metadata checked, its model built, and then only the tensors that
    model has, of its shapes, read (a crafted header cannot make psadv allocate more than the model)."""
    from safetensors import SafetensorError, safe_open

    what = "model file"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = {k: v for k, v in (handle.metadata() or {}).items() if k not in LOCAL_KEYS}
            name, args = _checked_metadata(meta, path)
            model = recorded_architecture(path, name, args, trust=trust_factory, what=what)
            expected = model.state_dict()
            keys = list(handle.keys())
            missing, unexpected = sorted(set(expected) - set(keys)), sorted(set(keys) - set(expected))
            if missing or unexpected:
                which = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
                raise damaged(path, f"its tensors do not fit model {name}: {which}", what)
            for key in keys:
                shape = tuple(handle.get_slice(key).get_shape())
                if shape != tuple(expected[key].shape):
                    raise damaged(path, f"its tensors do not fit model {name}: {key} has shape {shape}, the model's "
                                        f"{tuple(expected[key].shape)}", what)
            state = {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {_short(exc)}") from None
    model = load_recorded_state(model, path, name, state, what)
    return model.to(device), meta


def open_model(path: str | os.PathLike, device: str | torch.device = "cpu", *,
               trust_factory: bool | str | None = None) -> tuple[nn.Module, dict[str, str]]:
    """The model at ``path`` (an exported .safetensors, a checkpoint or a run directory) in eval
    mode, and its metadata (see the module docstring); CheckpointError if it cannot be read or
    used. ``trust_factory``: see :func:`load_model`."""
    path = Path(path)
    if path.is_file() and is_safetensors(path):
        return _load_safetensors(path, device, trust_factory)
    if path.is_file() and path.suffix == ".onnx":
        raise CheckpointError(f"{path} is an ONNX model; load it with onnxruntime, or give psadv the "
                              ".safetensors file or the checkpoint it was exported from")
    ckpt, model = open_checkpoint(path, trust_factory=trust_factory)
    meta = checkpoint_metadata(ckpt, model)  # its version a count: load_checkpoint checks the state
    meta["source"] = str(ckpt.path)
    meta["data_dir"] = ckpt.config.get("data_dir", "")
    return model.to(device), meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", *,
               trust_factory: bool | str | None = None) -> nn.Module:
    """A trained psadv model as a plain ``torch.nn.Module`` in eval mode.

    ``path`` is a ``.safetensors`` file written by ``psadv export``, a checkpoint file or a run
    directory (its newest checkpoint). Inputs are images in [0, 1] (N x C x H x W); outputs are
    logits. No MPI is needed.

    A ``package.module:factory`` model is rebuilt by importing and calling that factory, which is
    code: the file's name for it is used only with ``trust_factory`` set to that name (or ``True``:
    whatever the file names), else :class:`psadv.checkpoint.UntrustedFactory`. A name that differs
    from the file's model raises :class:`psadv.checkpoint.IncompatibleCheckpoint`.
    """
    return open_model(path, device, trust_factory=trust_factory)[0]


def default_output(origin: Path, version: int | None, fmt: str) -> Path:
    """``RUN_DIR/model-v<version>.<fmt>`` for a checkpoint in a run, else beside ``origin`` (the
    checkpoint or export file the user named). Built only from that path and a validated integer:
    nothing a file says can move it elsewhere (docs/design/security.md)."""
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 0):
        raise TypeError(f"version {version!r} is not a count")  # the readers check it: psadv's own mistake
    base = run_of(origin) or origin.parent
    return base / f"model-v{'unknown' if version is None else version}.{fmt}"


def export_model(source: str | os.PathLike, fmt: str = "safetensors", output: str | os.PathLike | None = None,
                 *, overwrite: bool = False, trust_factory: bool | str | None = None) -> Path:
    """Write the model of ``source`` (run directory, checkpoint or .safetensors) as ``fmt``
    (``safetensors`` or ``onnx``) to ``output`` atomically; returns the path written.
    ``trust_factory``: see :func:`load_model`."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    source = Path(source)
    model, meta = open_model(source, trust_factory=trust_factory)
    if output:
        out = Path(output)
    elif "source" in meta:  # a checkpoint: its path came from the user's argument (find_checkpoint)
        out = default_output(Path(meta["source"]), metadata_version(meta), fmt)
    else:  # an export: beside it
        out = default_output(source, metadata_version(meta), fmt)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it, or -o another file")
    if out.is_dir():
        raise UsageError(f"{out} is a directory; -o names the file to write")
    meta = {k: v for k, v in meta.items() if k not in ("source", "data_dir")}  # local paths stay here
    if fmt == "safetensors":
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, metadata=meta)
    else:
        data = _onnx_bytes(model, meta, out)
    _write_atomically(out, data)
    return out


def _write_atomically(out: Path, data: bytes) -> None:
    """``data`` into ``out`` through a temporary file and a rename: never a partial file."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {out}: {io_error_text(exc)}") from None


def _require_onnx() -> None:
    try:
        for name in ("onnx", "onnxscript"):  # torch's ONNX exporter needs onnxscript, the check onnx
            importlib.import_module(name)
    except ImportError as exc:
        raise PsadvError(f"--format onnx needs the optional onnx packages ({exc.name} is missing): "
                         "pip install 'psadv[onnx]'") from None


def _onnx_bytes(model: nn.Module, meta: dict[str, str], out: Path) -> bytes:
    """Export with torch's ONNX exporter (batch dimension dynamic), add the metadata, check the graph."""
    import onnx

    if "input_shape" not in meta:
        raise PsadvError(f"cannot export to ONNX: the input shape of {meta['model_name']} is unknown "
                         "(its dataset file is gone); restore the file named by the run's --data-dir")
    example = torch.rand(2, *json.loads(meta["input_shape"]))
    try:
        with _quiet():
            program = torch.onnx.export(model, (example,), None, dynamo=True, verbose=False,
                                        input_names=["x"], output_names=["logits"],
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
        graph = program.model_proto
        for key, value in meta.items():
            graph.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(graph, full_check=True)
        return graph.SerializeToString()
    except Exception as exc:  # noqa: BLE001 - whatever the exporter cannot handle: one line, nothing written
        raise PsadvError(f"cannot export {meta['model_name']} to ONNX ({out}): {_export_failure(exc)}") from None


@contextlib.contextmanager
def _quiet():
    """Silence the exporter: it prints graphs, logs skipped optional operators and warns about its
    own internals; what went wrong reaches the user as the one-line error instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _export_failure(exc: BaseException) -> str:
    """The root cause of an export failure in one line, with the model's line that raised it."""
    root = exc
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    lines = str(root).strip().splitlines()
    text = f"{type(root).__name__}: {lines[0] if lines else ''}".strip()
    where = re.search(r'raised this error:\s*File "([^"]+)", line (\d+)', str(exc))
    return text + (f" (at {where.group(1)}, line {where.group(2)})" if where else "")
