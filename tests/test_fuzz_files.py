"""Hundreds of crafted checkpoints, exports and data files (a seeded generator, so a failure repeats).

Each case mutates a valid file in one to three ways an adversary might (junk or path-like values,
shapes of gigabytes, compression bombs, external storage and links, virtual datasets, wrong dtypes,
truncation) and hands it to psadv's readers. Whatever the file, psadv must: raise nothing but its
one-line errors (PsadvError, which the CLI prints as one line), allocate no more than a bound,
write nowhere but the run directory and beside the export it was given, and run no code the file
names (docs/design/security.md, psadv/untrusted.py).
"""

from __future__ import annotations

import io
import json
import random
import resource
import struct
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from psadv.checkpoint import describe_checkpoint, find_checkpoint, load_checkpoint
from psadv.data import _FILE_CACHE, _load_file
from psadv.errors import PsadvError
from psadv.export import export_model, open_model

SEED = 35
CASES = {"checkpoint": 160, "export": 90, "data": 110}
# What one case may allocate through numpy (tracemalloc sees numpy's buffers): the valid files are
# a few hundred kB; a data file may always declare psadv.untrusted.DATA_FLOOR (64 MiB), converted.
PEAK_BYTES = 200 << 20
# What the whole fuzz may add to the process's peak memory (torch's and HDF5's own buffers too).
RSS_GROWTH_KIB = 1 << 20


def junk(rng: random.Random):
    return rng.choice(["480x", "/../../victim/important", "../victim/x", "", "x" * 5000, -1, 10**30, 1.5, True, None,
                       [], {}, float("nan"), "os:system", "custom_models:marker_net", "[" * 3000, 7, "7"])


class Sandbox:
    """Where the cases live; everything else under the test's tmp_path must stay as it was."""

    def __init__(self, root: Path):
        self.root = root
        self.run = root / "sandbox" / "run"
        self.exports = root / "sandbox" / "exports"
        self.victim = root / "victim"
        for d in (self.run / "checkpoints", self.exports, self.victim):
            d.mkdir(parents=True, exist_ok=True)
        self.secret = root / "secret.bin"
        self.secret.write_bytes(b"SECRET" * 2000)
        self.marker = root / "factory-ran"

    def outside(self) -> set[str]:
        allowed = (self.run, self.exports)
        return {str(p) for p in self.root.rglob("*") if p.is_file() and not any(a in p.parents for a in allowed)}


def attempt(read, label: str) -> None:
    """``read()`` may succeed or raise PsadvError; anything else, or an allocation above the bound, fails."""
    tracemalloc.start()
    try:
        read()
    except PsadvError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), (label, str(exc))
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PEAK_BYTES, (label, peak)


# --- checkpoints ------------------------------------------------------------------------------------
def _json(f, key) -> dict:
    try:
        value = json.loads(f.attrs[key])
    except (ValueError, TypeError, KeyError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def mutate_checkpoint(f: h5py.File, rng: random.Random, box: Sandbox) -> str:
    model = f["model"]
    names = [n for n in model if isinstance(model.get(n, getlink=True), h5py.HardLink)
             and isinstance(model.get(n), h5py.Dataset)]
    if not names:
        return "no dataset left"
    target = f"model/{rng.choice(names)}"
    op = rng.randrange(12)
    if op == 0:
        key = rng.choice(["format", "format_version", "model_name", "model_args", "config", "state", "created"])
        value = junk(rng)
        raw = isinstance(value, (str, float)) or (isinstance(value, int) and abs(value) < 2**63)
        f.attrs[key] = value if raw else json.dumps(value)  # as a raw attribute, or as JSON text
    elif op == 1:
        state = _json(f, "state")
        state[rng.choice(["version", "examples_seen", "elapsed", "data_stream", "last_eval"])] = junk(rng)
        f.attrs["state"] = json.dumps(state)
    elif op == 2:
        args = _json(f, "model_args")
        args[rng.choice(["num_classes", "in_channels", "bogus"])] = rng.choice([10**12, -1, "10", 0, 3, 1.5, None])
        f.attrs["model_args"] = json.dumps(args)
    elif op == 3:
        config = _json(f, "config")
        config[rng.choice(["dataset", "norm", "eps", "data_dir", "model"])] = rng.choice(
            [junk(rng), "npz", str(box.secret), str(box.victim / "x.npz")])
        f.attrs["config"] = json.dumps(config)
    elif op == 4:
        f.attrs[rng.choice(["state", "config", "model_name"])] = np.zeros(rng.choice([2, 100]))
    elif op == 5:
        f[target].attrs["torch_dtype"] = rng.choice(["__class__", "float64", "bogus", "int8", "complex128"])
    else:
        group, leaf = f[target].parent, target.split("/")[1]
        shape, attrs = f[target].shape, dict(f[target].attrs)
        del f[target]
        kind = rng.choice(["huge", "bomb", "external", "xlink", "soft", "virtual", "string", "compound", "empty",
                           "group", "shape", "delete"])
        if kind == "huge":
            group.create_dataset(leaf, shape=(20_000_000_000,), dtype="f4")
        elif kind == "bomb":
            group.create_dataset(leaf, shape=(50_000_000,), dtype="f4", chunks=(1 << 20,), compression="gzip")
        elif kind == "external":
            group.create_dataset(leaf, shape=shape, dtype="f4", external=[(str(box.secret), 0, 4 * int(np.prod(shape)))])
        elif kind == "xlink":
            group[leaf] = h5py.ExternalLink(str(box.secret), "/x")
        elif kind == "soft":
            group[leaf] = h5py.SoftLink(f"/{f['model'].name}/{names[0]}")
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
            layout[:] = h5py.VirtualSource(str(box.secret), "x", shape=(4,))
            group.create_virtual_dataset(leaf, layout)
        elif kind == "string":
            group.create_dataset(leaf, data=np.array([b"abc"] * 3))
        elif kind == "compound":
            group.create_dataset(leaf, data=np.zeros(3, dtype=[("a", "f4"), ("b", "i4")]))
        elif kind == "empty":
            group.create_dataset(leaf, data=h5py.Empty("f4"))
        elif kind == "group":
            group.create_group(leaf)
        elif kind == "shape":
            group.create_dataset(leaf, data=np.zeros(rng.choice([(3,), (1, 1, 1, 1), (0,)]), dtype="f4"))
        if kind not in ("delete", "xlink", "soft", "group") and leaf in group:
            group[leaf].attrs.update(attrs)
        return f"{target}: {kind}"
    return f"op {op}"


def test_crafted_checkpoints(tmp_path, tiny_run):
    box = Sandbox(tmp_path)
    base = find_checkpoint(tiny_run).read_bytes()
    path = box.run / "checkpoints" / "ckpt-00000002.h5"
    before = box.outside()
    rng = random.Random(SEED)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for case in range(CASES["checkpoint"]):
        path.write_bytes(base)
        if rng.random() < 0.1:
            path.write_bytes(base[:rng.randrange(len(base))])  # truncated
            label = "truncated"
        else:
            with h5py.File(path, "r+") as f:
                label = "; ".join(mutate_checkpoint(f, rng, box) for _ in range(rng.randint(1, 3)))
        label = f"checkpoint case {case}: {label}"
        attempt(lambda: load_checkpoint(path), label)
        attempt(lambda: describe_checkpoint(path), label)
        attempt(lambda: export_model(box.run, overwrite=True), label)
    assert box.outside() == before and not box.marker.exists()
    assert {p.name for p in box.run.iterdir()} <= {"checkpoints", "model-v2.safetensors", "model-vunknown.safetensors"}
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < RSS_GROWTH_KIB


# --- exports ----------------------------------------------------------------------------------------
def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_export(header: dict, body: bytes, rng: random.Random, box: Sandbox) -> tuple[dict, bytes, str]:
    meta = header.setdefault("__metadata__", {})
    tensors = [k for k in header if k != "__metadata__"]
    op = rng.randrange(8)
    if op == 7:  # the file steering where export writes
        meta[rng.choice(["source", "version"])] = rng.choice(
            [str(box.victim / "checkpoints" / "ckpt-00000001.h5"), "../../victim/important", str(box.victim / "x")])
    elif op == 0:
        key = rng.choice(["format", "format_version", "model_name", "model_args", "version", "eps", "norm",
                          "dataset", "source", "data_dir", "final_eval"])
        meta[key] = rng.choice([str(junk(rng)), str(box.victim / "x"), "custom_models:marker_net", "os:system",
                                json.dumps({"marker": str(box.marker)}), json.dumps({"num_classes": 10**12})])
    elif op == 1:
        meta.pop(rng.choice(list(meta)), None)
    elif op == 2:
        header[rng.choice(tensors)]["shape"] = rng.choice([[20_000_000_000], [1 << 20, 1 << 20], [-1], [3], []])
    elif op == 3:
        header[rng.choice(tensors)]["dtype"] = rng.choice(["F64", "XX", "I8", "BOOL", "F8_E4M3"])
    elif op == 4:
        header[rng.choice(tensors)]["data_offsets"] = rng.choice([[0, 1 << 40], [10, 5], [0, 4]])
    elif op == 5:
        if rng.random() < 0.5:
            del header[rng.choice(tensors)]
        else:
            header["extra.weight"] = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    else:
        return header, body[:rng.randrange(len(body) + 1)], "truncated body"
    return header, body, f"op {op}"


def test_crafted_exports(tmp_path, tiny_run):
    box = Sandbox(tmp_path)
    valid = export_model(tiny_run, output=tmp_path / "valid.safetensors")
    header0, body0 = _split(valid.read_bytes())
    path = box.exports / "model.safetensors"
    before = box.outside()
    rng = random.Random(SEED + 1)
    for case in range(CASES["export"]):
        header, body = json.loads(json.dumps(header0)), body0
        labels = []
        for _ in range(rng.randint(1, 3)):
            header, body, label = mutate_export(header, body, rng, box)
            labels.append(label)
        data = _join(header, body)
        if rng.random() < 0.05:
            data = struct.pack("<Q", 1 << 40) + data[8:]  # a header size of a terabyte
        path.write_bytes(data)
        label = f"export case {case}: {'; '.join(labels)}"
        attempt(lambda: open_model(path), label)
        attempt(lambda: export_model(path, overwrite=True), label)
    assert box.outside() == before and not box.marker.exists()
    assert all(p.parent == box.exports for p in box.exports.rglob("*"))


# --- data files -------------------------------------------------------------------------------------
def _arrays(rng: random.Random) -> dict:
    x = np.zeros((8, 1, 8, 8), np.uint8)
    return {"x_train": x, "y_train": np.arange(8) % 2, "x_test": x[:4], "y_test": np.arange(4) % 2}


def _npy_header(shape, descr="<f4") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 32


def mutate_arrays(arrays: dict, rng: random.Random) -> tuple[dict, dict, str]:
    """(arrays, raw .npy members to write as they are, label)."""
    key = rng.choice(["x_train", "y_train", "x_test", "y_test", "num_classes"])
    op = rng.randrange(8)
    raw = {}
    if op == 0:
        arrays[key] = rng.choice([np.zeros((2, 3)), np.zeros(5, np.float32) + np.nan, np.array(["a", "b"]),
                                  np.zeros(4, np.complex64), np.full((8, 1, 8, 8), 2.5, np.float32), np.array(3)])
    elif op == 1:
        arrays.pop(key, None)
    elif op == 2:
        arrays["num_classes"] = rng.choice([np.array(10**12), np.array(-1), np.array([2, 3]), np.array(1.5),
                                            np.array(3)])
    elif op == 3:
        arrays["y_train"] = rng.choice([np.array([0, 1, 2, 10**12] * 2), np.array([-1] * 8), np.zeros(8, np.float32)])
    elif op == 4:
        raw[key] = _npy_header(rng.choice([(20_000_000_000, 1, 1, 1), (1 << 30,), (8, 1, 8, 8), (1 << 24, 1, 1)]),
                               rng.choice(["<f4", "|u1", "<i8", "|O"]))
    elif op == 5:
        arrays[key] = np.zeros((8, 8, 8, 3), np.uint8)  # channels last
    elif op == 6:
        arrays["x_train"] = np.zeros((0, 1, 8, 8), np.uint8)
    else:
        arrays[key] = np.zeros((8, 1, 8, 8), np.float64)
    return arrays, raw, f"{key} op {op}"


def write_npz(path: Path, arrays: dict, raw: dict) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            if name in raw:
                continue
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            archive.writestr(f"{name}.npy", buffer.getvalue())
        for name, data in raw.items():
            archive.writestr(f"{name}.npy", data)


def write_hdf5(path: Path, arrays: dict, rng: random.Random, box: Sandbox) -> str:
    with h5py.File(path, "w") as f:
        for name, array in arrays.items():
            array = np.asarray(array)
            f[name] = array.astype("S") if array.dtype.kind == "U" else array  # HDF5 has no UTF-32
        key = rng.choice(["x_train", "y_train", "x_test", "y_test"])
        kind = rng.choice(["none", "external", "xlink", "soft", "virtual", "bomb", "huge", "group"])
        if kind != "none" and key in f:
            del f[key]
        if kind == "external":
            f.create_dataset(key, shape=(8, 1, 8, 8), dtype="u1", external=[(str(box.secret), 0, 512)])
        elif kind == "xlink":
            f[key] = h5py.ExternalLink(str(box.secret), "/x")
        elif kind == "soft":
            f[key] = h5py.SoftLink("/x_test")
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape=(8,), dtype="i8")
            layout[:] = h5py.VirtualSource(str(box.secret), "y", shape=(8,))
            f.create_virtual_dataset(key, layout)
        elif kind == "bomb":
            f.create_dataset(key, shape=(100_000, 1, 28, 28), dtype="u1", chunks=(1000, 1, 28, 28),
                             compression="gzip")
        elif kind == "huge":
            f.create_dataset(key, shape=(20_000_000_000,), dtype="f4")
        elif kind == "group":
            f.create_group(key)
    return kind


def test_crafted_data_files(tmp_path):
    box = Sandbox(tmp_path)
    before = box.outside()
    rng = random.Random(SEED + 2)
    for case in range(CASES["data"]):
        arrays, raw, label = mutate_arrays(_arrays(rng), rng)
        if rng.random() < 0.5:
            name, path = "npz", box.exports / f"data-{case}.npz"
            write_npz(path, arrays, raw)
            if rng.random() < 0.1:
                path.write_bytes(path.read_bytes()[:rng.randrange(path.stat().st_size)])
                label += "; truncated"
        else:
            name, path = "hdf5", box.exports / f"data-{case}.h5"
            label += "; " + write_hdf5(path, arrays, rng, box)
        _FILE_CACHE.clear()
        attempt(lambda: _load_file(name, path), f"data case {case} ({name}): {label}")
    _FILE_CACHE.clear()
    assert box.outside() == before


@pytest.fixture(autouse=True)
def _no_cached_data():
    yield
    _FILE_CACHE.clear()
