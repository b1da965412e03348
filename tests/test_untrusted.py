"""Files from others are data, never power: crafted checkpoints, exports and data files.

Each test is one way a received file used to read other files on the machine, allocate without
bound, steer where psadv writes, or end in a traceback (psadv/untrusted.py,
docs/design/security.md). The fuzz test in test_fuzz_files.py tries hundreds more.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.torch import save_file

from cli_helpers import TINY_EVAL, assert_one_line_error, invoke
from psadv.checkpoint import find_checkpoint, load_checkpoint
from psadv.data import DataError, _FILE_CACHE, _load_file
from psadv.errors import CheckpointError
from psadv.export import export_model, open_model


@pytest.fixture
def run(tmp_path, tiny_run) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def _edit(run: Path, change) -> Path:
    path = find_checkpoint(run)
    with h5py.File(path, "r+") as f:
        change(f)
    return path


def _replace(f, name, make):
    """Put ``make(group, leaf)`` in place of dataset ``name``, keeping its attributes."""
    attrs = dict(f[name].attrs)
    group, leaf = f[name].parent, name.rsplit("/", 1)[1]
    del f[name]
    make(group, leaf)
    if isinstance(group.get(leaf, getlink=True), h5py.HardLink):
        group[leaf].attrs.update(attrs)


SECRET = b"AWS_SECRET_ACCESS_KEY=do-not-leak-\x00\x00\x00\x00\x00\x00"  # 40 bytes: the size of 7.bias


def test_external_storage_does_not_pull_a_local_file_into_the_model(run, tmp_path):
    """7.bias used to be read from the secrets file, and psadv export wrote its bytes out."""
    secret = tmp_path / "secrets.txt"
    secret.write_bytes(SECRET)
    _edit(run, lambda f: _replace(f, "model/7.bias", lambda g, leaf: g.create_dataset(
        leaf, shape=(10,), dtype="f4", external=[(str(secret), 0, 40)])))
    with pytest.raises(CheckpointError, match="external storage"):
        load_checkpoint(find_checkpoint(run))
    assert_one_line_error(invoke("export", run), 1, "keeps its bytes in another file")
    assert not list(run.glob("model-v*"))


@pytest.mark.parametrize("link", ["external", "soft"])
def test_links_out_of_the_object_tree_are_refused(run, tmp_path, link):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["bias"] = np.frombuffer(SECRET, dtype="f4")
    make = (lambda g, leaf: g.__setitem__(leaf, h5py.ExternalLink(str(other), "/bias"))) if link == "external" \
        else (lambda g, leaf: g.__setitem__(leaf, h5py.SoftLink("/model/5.bias")))
    _edit(run, lambda f: _replace(f, "model/7.bias", make))
    assert_one_line_error(invoke("eval", run, *TINY_EVAL), 1, f"is {'an external' if link == 'external' else 'a soft'} link")


def test_a_virtual_dataset_is_refused(run, tmp_path):
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as f:
        f["data"] = np.zeros(10, dtype="f4")

    def virtual(g, leaf):
        layout = h5py.VirtualLayout(shape=(10,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(source), "data", shape=(10,))
        g.create_virtual_dataset(leaf, layout)

    _edit(run, lambda f: _replace(f, "model/7.bias", virtual))
    assert_one_line_error(invoke("inspect", run), 1, "is virtual")


def test_a_declared_shape_of_74_gib_is_refused_before_allocation(run):
    """It used to end in an _ArrayMemoryError traceback (and a 2 MB file made eval use 3.2 GB)."""
    def huge(f):
        f.require_group("extra").create_dataset("stale_ring", shape=(20_000_000_000,), dtype="f4")  # 74.5 GiB
    _edit(run, huge)
    assert_one_line_error(invoke("eval", run, *TINY_EVAL), 1, "declares shape (20000000000,) (74.5 GiB)")


def test_a_compressed_dataset_cannot_decode_to_gigabytes(run):
    def bomb(f):  # 400 MB of zeros in a few hundred kilobytes
        f.require_group("extra").create_dataset("stale_ring", shape=(100_000_000,), dtype="f4", chunks=(1 << 20,),
                                                compression="gzip", fillvalue=0)
    _edit(run, bomb)
    assert_one_line_error(invoke("eval", run, *TINY_EVAL), 1, "chunked or compressed, which psadv never writes")


def test_an_attribute_of_many_values_is_refused_before_it_is_read(run):
    _edit(run, lambda f: f.attrs.create("state", np.zeros(1000)))
    assert_one_line_error(invoke("inspect", run), 1, "'state'", "is not one")


@pytest.mark.parametrize("version", ["480x", -3, 1.5, True, "/../../victim/important"])
def test_a_state_version_that_is_not_a_count_is_one_line(run, tmp_path, version):
    """"480x" ended --resume in a TypeError traceback; a path made export write outside the run."""
    def crafted(f):
        state = json.loads(f.attrs["state"])
        f.attrs["state"] = json.dumps({**state, "version": version})
    _edit(run, crafted)
    assert_one_line_error(invoke("train", "--resume", run, "--no-progress"), 1, "its state's version is")
    assert_one_line_error(invoke("export", run), 1, "not a count")
    assert sorted(p.name for p in tmp_path.rglob("*.safetensors")) == []


def _export(run: Path, tmp_path: Path, meta_changes: dict, name="model.safetensors") -> Path:
    good = export_model(run, output=tmp_path / "good.safetensors")
    model, meta = open_model(good)
    crafted = tmp_path / "exports" / name
    crafted.parent.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(crafted), metadata={**meta, **meta_changes})
    return crafted


def test_an_exports_metadata_does_not_choose_where_export_writes(run, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    crafted = _export(run, tmp_path, {"source": str(victim / "checkpoints" / "ckpt-00000007.h5"),
                                      "data_dir": str(victim)})
    result = invoke("export", crafted)
    assert result.exit_code == 0, result.stderr
    assert Path(result.output.strip()) == crafted.parent / "model-v2.safetensors"  # beside the file named
    assert list(victim.iterdir()) == []


@pytest.mark.parametrize("version", ["../../victim/x", "7/../../../x", "-1", "1e3"])
def test_an_exports_version_that_is_not_a_count_is_one_line(run, tmp_path, version):
    crafted = _export(run, tmp_path, {"version": version})
    assert_one_line_error(invoke("export", crafted), 1, "is not a count")
    assert sorted(p.name for p in tmp_path.rglob("*.safetensors")) == ["good.safetensors", "model.safetensors"]


def test_an_exports_tensors_are_checked_against_its_model_before_they_are_read(run, tmp_path):
    """Its header declares the shapes: one that is not the model's is refused before reading."""
    good = export_model(run, output=tmp_path / "good.safetensors")
    model, meta = open_model(good)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["7.bias"] = np.zeros(10_000_000, dtype=np.float32)  # 40 MB the model has no room for
    import torch

    state = {k: torch.as_tensor(v) for k, v in state.items()}
    save_file(state, str(tmp_path / "big.safetensors"), metadata=meta)
    assert_one_line_error(invoke("eval", tmp_path / "big.safetensors", *TINY_EVAL), 1, "7.bias has shape (10000000,)")


def test_psadv_eval_grades_an_export(run, tmp_path, mnist_dir):
    """It used to call a valid export 'not a readable HDF5 file'."""
    exported = export_model(run, output=tmp_path / "model.safetensors")
    result = invoke("eval", exported, "--data-dir", mnist_dir, *TINY_EVAL)
    assert result.exit_code == 0, result.stderr
    assert result.output.startswith(f"{exported}: clean ")
    assert_one_line_error(invoke("eval", exported, "--data-dir", mnist_dir, "--save", *TINY_EVAL), 2, "--save")


# --- data files -----------------------------------------------------------------------------------
def _npz_with_header(path: Path, key: str, shape: tuple, dtype: str = "<f4") -> None:
    """An npz whose ``key`` declares ``shape`` in its .npy header but holds a few bytes."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 64
    small = {"x_train": np.zeros((4, 1, 8, 8), np.uint8), "y_train": np.zeros(4, np.int64),
             "x_test": np.zeros((4, 1, 8, 8), np.uint8), "y_test": np.zeros(4, np.int64)}
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in small.items():
            if name != key:
                with archive.open(f"{name}.npy", "w") as handle:
                    np.lib.format.write_array(handle, array)
        archive.writestr(f"{key}.npy", npy)


def _load(name, path):
    _FILE_CACHE.clear()
    return _load_file(name, path)


def test_a_data_file_declaring_74_gib_is_one_line(tmp_path):
    path = tmp_path / "big.npz"
    _npz_with_header(path, "x_train", (20_000_000_000, 1, 1, 1))
    with pytest.raises(DataError, match="declare 149.0 GiB"):
        _load("npz", path)
    result = invoke("train", "--dataset", "npz", "--data-dir", path, "--model", "mnist-small", "--run-dir",
                    tmp_path / "run", "--eps", "0.3", "--threads", "1", "--no-progress")
    assert_one_line_error(result, 1, "more than 100x the file's size")


def test_arrays_psadv_does_not_use_are_not_read(tmp_path):
    path = tmp_path / "extra.npz"
    x = np.zeros((4, 1, 8, 8), np.uint8)
    np.savez(path, x_train=x, y_train=np.arange(4) % 2, x_test=x, y_test=np.arange(4) % 2,
             notes=np.array([{"pickle": "me"}], dtype=object))  # would need pickle if it were read
    spec, splits = _load("npz", path)
    assert spec.num_classes == 2 and len(splits["train"]) == 4


def test_hdf5_data_with_external_storage_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(256)))
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x_train", shape=(4, 1, 8, 8), dtype="u1", external=[(str(secret), 0, 256)])
        f["y_train"] = np.zeros(4, np.int64)
        f["x_test"] = np.zeros((4, 1, 8, 8), np.uint8)
        f["y_test"] = h5py.ExternalLink(str(secret), "/y")
    with pytest.raises(DataError, match="external storage"):
        _load("hdf5", path)


def test_a_label_that_would_make_a_terabyte_layer_is_refused(tmp_path):
    path = tmp_path / "labels.npz"
    x = np.zeros((4, 1, 8, 8), np.uint8)
    np.savez(path, x_train=x, y_train=np.array([0, 1, 2, 10**12]), x_test=x, y_test=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="at most 100000 classes"):
        _load("npz", path)
