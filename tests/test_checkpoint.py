"""Tests for psadv.checkpoint: format round trips, atomic writes, rotation under the run's lock, and validation."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import psadv.checkpoint
from psadv.checkpoint import codec
from psadv.checkpoint.codec import (
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    capture_rng_state,
    describe_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from psadv.checkpoint.rotation import CheckpointManager, find_checkpoint
from psadv.errors import CheckpointError, UsageError
from psadv.rundir import prepare, run_of

REPO_ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def make_model(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 4, 4, generator=g), torch.randint(0, 5, (6,), generator=g)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    model.train()
    x, y = batch(seed)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd-nesterov": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw-amsgrad": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, amsgrad=True),
}

SAVE_ARGS = dict(model_name="tiny-net", model_args={"width": 4}, config={"train": {"lr": 0.05, "batch_size": 6}})


def save_trained(path: Path, opt_name: str = "adam", **overrides):
    model = make_model(0)
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    for step in range(3):
        train_step(model, optimizer, seed=step)
    kwargs = dict(SAVE_ARGS, state={"version": 3, "examples_seen": 18}, model=model, optimizer=optimizer)
    kwargs.update(overrides)
    save_checkpoint(path, **kwargs)
    return model, optimizer


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_round_trip_model_and_optimizer(tmp_path: Path, opt_name: str) -> None:
    path = tmp_path / "ckpt-00000003.h5"
    model, optimizer = save_trained(path, opt_name)

    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.path == path
    assert (ckpt.model_name, ckpt.model_args, ckpt.config) == ("tiny-net", {"width": 4}, SAVE_ARGS["config"])
    assert ckpt.state == {"version": 3, "examples_seen": 18}
    assert ckpt.format_version == FORMAT_VERSION
    assert ckpt.rng is None and ckpt.extra == {}
    assert list(ckpt.model_state) == list(model.state_dict())  # order kept
    for name, value in model.state_dict().items():
        assert ckpt.model_state[name].dtype == value.dtype
        assert torch.equal(ckpt.model_state[name], value)
    assert ckpt.model_state["bn.num_batches_tracked"].dtype == torch.int64
    assert ckpt.model_state["bn.num_batches_tracked"].item() == 3

    restored = make_model(1)  # different initial weights
    restored_opt = OPTIMIZERS[opt_name](restored.parameters())
    restored.load_state_dict(ckpt.model_state)
    restored_opt.load_state_dict(ckpt.optimizer_state)
    assert restored_opt.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]

    model.eval()
    restored.eval()
    x, _ = batch(99)
    assert torch.equal(model(x), restored(x))

    for step in (3, 4):
        train_step(model, optimizer, seed=step)
        train_step(restored, restored_opt, seed=step)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name
    original_state = optimizer.state_dict()["state"]
    restored_state = restored_opt.state_dict()["state"]
    assert original_state.keys() == restored_state.keys()
    for index in original_state:
        for key, value in original_state[index].items():
            assert type(restored_state[index][key]) is type(value)
            assert torch.equal(restored_state[index][key], value), (index, key)


def test_optimizer_python_scalars_and_none_keep_their_types(tmp_path: Path) -> None:
    model = make_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = list(model.parameters())
    optimizer.state[params[0]].update(momentum_buffer=None, step=7, scale=2.5, flag=True)
    optimizer.state[params[1]]["step"] = torch.tensor(4.0)
    path = save_checkpoint(tmp_path / "c.h5", **SAVE_ARGS, state={}, model=model, optimizer=optimizer)

    state = load_checkpoint(path).optimizer_state["state"]
    assert state[0] == {"momentum_buffer": None, "step": 7, "scale": 2.5, "flag": True}
    assert type(state[0]["step"]) is int and type(state[0]["scale"]) is float and type(state[0]["flag"]) is bool
    assert isinstance(state[1]["step"], torch.Tensor) and state[1]["step"].shape == ()
    assert state[1]["step"].item() == 4.0

    restored_opt = torch.optim.SGD(make_model(1).parameters(), lr=0.1, momentum=0.9)
    restored_opt.load_state_dict(load_checkpoint(path).optimizer_state)


def test_optimizer_tensor_param_group_values(tmp_path: Path) -> None:
    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    train_step(model, optimizer, seed=0)
    path = save_checkpoint(tmp_path / "c.h5", **SAVE_ARGS, state={}, model=model, optimizer=optimizer)
    groups = load_checkpoint(path).optimizer_state["param_groups"]
    assert isinstance(groups[0]["lr"], torch.Tensor) and groups[0]["lr"].item() == pytest.approx(0.01)
    assert groups[0]["betas"] == (0.9, 0.999) and isinstance(groups[0]["betas"], tuple)
    torch.optim.Adam(make_model(1).parameters(), lr=torch.tensor(0.5)).load_state_dict(
        load_checkpoint(path).optimizer_state
    )


def test_unusual_dtypes_and_names_round_trip(tmp_path: Path) -> None:
    model = nn.Module()
    model.inner = nn.Module()
    model.inner.register_buffer("mask", torch.tensor([True, False, True]))
    model.register_buffer("brain", torch.randn(3, 2).to(torch.bfloat16))
    model.register_buffer("scalar", torch.tensor(5, dtype=torch.int32))
    model.register_buffer("empty", torch.zeros(0, 4))
    model.register_buffer("transposed", torch.arange(6.0).reshape(2, 3).t())  # not contiguous
    path = save_checkpoint(tmp_path / "c.h5", **SAVE_ARGS, state={}, model=model)
    loaded = load_checkpoint(path, map_location=torch.device("cpu")).model_state
    for name, value in model.state_dict().items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        assert torch.equal(loaded[name], value), name


def test_a_dtype_numpy_lacks_other_than_bfloat16_is_a_one_line_error(tmp_path: Path) -> None:
    model = nn.Module()
    model.register_buffer("tiny", torch.zeros(3).to(torch.float8_e4m3fn))
    with pytest.raises(CheckpointError, match="tensor 'tiny' has dtype torch.float8_e4m3fn"):
        save_checkpoint(tmp_path / "c.h5", **SAVE_ARGS, state={}, model=model)
    assert not list(tmp_path.iterdir())


def test_extra_arrays_and_large_state(tmp_path: Path) -> None:
    extra = {"staleness": np.array([0, 1, 1, 3, 2], dtype=np.int64), "histogram": np.linspace(0, 1, 7)}
    state = {"version": 9, "data": {"permutation": list(range(60_000)), "epoch": 2}, "counter": np.int64(4)}
    path = save_checkpoint(tmp_path / "c.h5", **SAVE_ARGS, state=state, model=make_model(0), extra=extra)
    ckpt = load_checkpoint(path)
    assert ckpt.extra.keys() == extra.keys()
    for name, array in extra.items():
        assert ckpt.extra[name].dtype == array.dtype
        np.testing.assert_array_equal(ckpt.extra[name], array)
    assert ckpt.state["data"]["permutation"] == list(range(60_000))
    assert ckpt.state["counter"] == 4


def test_rng_capture_restore(tmp_path: Path) -> None:
    rng = capture_rng_state()

    def draws() -> tuple:
        return (torch.rand(4).tolist(), np.random.rand(2).tolist(), random.random())

    expected = draws()
    path = save_checkpoint(tmp_path / "c.h5", **SAVE_ARGS, state={}, model=make_model(0), rng=rng)
    draws()  # move every generator on
    loaded = load_checkpoint(path).rng
    assert loaded["python"] == rng["python"] and isinstance(loaded["python"], tuple)
    restore_rng_state(loaded)
    assert draws() == expected


def test_file_holds_only_plain_datasets_and_json_attrs(tmp_path: Path) -> None:
    model, optimizer = save_trained(
        tmp_path / "c.h5", "sgd-momentum", rng=capture_rng_state(), extra={"h": np.ones(3)}
    )
    seen = []

    def check_attrs(obj) -> None:
        for name in obj.attrs:
            dtype = obj.attrs.get_id(name).dtype
            if h5py.check_string_dtype(dtype) is not None:
                value = obj.attrs[name]
                if name in ("model_args", "config", "state", "param_groups", "numpy_global", "python"):
                    json.loads(value)
            else:
                assert dtype.kind in "iu", (obj.name, name, dtype)

    def visit(name: str, obj) -> None:
        check_attrs(obj)
        if isinstance(obj, h5py.Dataset):
            seen.append(name)
            assert obj.dtype.kind in "biuf", (name, obj.dtype)
            assert h5py.check_vlen_dtype(obj.dtype) is None and h5py.check_string_dtype(obj.dtype) is None

    with h5py.File(tmp_path / "c.h5", "r") as f:
        check_attrs(f)
        assert f.attrs["format"] == FORMAT and f.attrs["format_version"] == FORMAT_VERSION
        f.visititems(visit)
        assert set(f) == {"model", "optimizer", "rng", "extra"}
    assert "model/bn.running_mean" in seen and "optimizer/state/0/momentum_buffer" in seen and "rng/torch" in seen

    for module in Path(psadv.checkpoint.__file__).parent.glob("*.py"):
        source = module.read_text()
        for forbidden in ("pickle", "torch.save", "torch.load", "np.load", "dtype=object"):
            assert forbidden not in source, module


def test_keep_last_k(tmp_path: Path) -> None:
    model = make_model(0)
    run = prepare(tmp_path / "run")
    manager = CheckpointManager(run, keep=2)
    assert manager.list() == [] and manager.latest() is None
    for version in (1, 5, 3, 100_000_000, 99_999_999):
        manager.save(version, **SAVE_ARGS, state={"examples_seen": version}, model=model)
    assert [p.name for p in manager.list()] == ["ckpt-99999999.h5", "ckpt-100000000.h5"]
    assert manager.latest() == tmp_path / "run" / "checkpoints" / "ckpt-100000000.h5"
    assert load_checkpoint(manager.latest()).state == {"examples_seen": 100_000_000, "version": 100_000_000}
    with pytest.raises(ValueError):
        manager.save(7, **SAVE_ARGS, state={"version": 6}, model=model)
    run.release()
    # the run's one lock is RUN/.lock: the checkpoints directory holds checkpoints only
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["ckpt-100000000.h5",
                                                                                    "ckpt-99999999.h5"]


def test_a_checkpoint_gets_the_mode_the_umask_gives_every_other_file(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Not mkstemp's private 0600: colleagues on a shared cluster directory read each other's runs.
    (The umask is read once, when psadv.checkpoint is imported.)"""
    monkeypatch.setattr(codec, "_UMASK", 0o022)
    save_trained(tmp_path / "shared.h5", "adam")
    monkeypatch.setattr(codec, "_UMASK", 0o077)
    save_trained(tmp_path / "private.h5", "adam")
    assert (tmp_path / "shared.h5").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.h5").stat().st_mode & 0o777 == 0o600


def test_atomic_write_keeps_old_file_when_saving_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt-00000010.h5"
    save_trained(path, "adam")
    before = path.read_bytes()

    real_create = h5py.Group.create_dataset
    calls = []

    def failing_create(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 4:
            raise RuntimeError("simulated crash while writing")
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_trained(path, "sgd-momentum")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_dataset", disk_full)
    with pytest.raises(CheckpointError, match=r"ckpt-00000010\.h5.*No space left"):
        save_trained(path, "sgd-momentum")

    # What h5py really raises when the disk fills up or the file-size limit is hit: one line of
    # psadv's, with the system's reason, not HDF5's multi-line report cut after its first line.
    hdf5_enospc = OSError(28, "Can't close file (file write failed: time = Wed Nov 25 22:42:23 2026\n, filename = "
                              "'x', file descriptor = 7, errno = 28, error message = 'No space left on device', "
                              "buf = 0x5, total write size = 18, bytes this sub-write = 18, offset = 0)")
    hdf5_efbig = RuntimeError("Can't decrement id ref count (unable to extend file properly, errno = 27, "
                              "error message = 'File too large')")
    for exc, reason in ((hdf5_enospc, "No space left on device (errno 28)"), (hdf5_efbig, "File too large (errno 27)")):
        def failing(self, *args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(h5py.Group, "create_dataset", failing)
        with pytest.raises(CheckpointError) as info:
            save_trained(path, "sgd-momentum")
        assert str(info.value) == f"cannot save checkpoint {path}: {reason}"
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]
    monkeypatch.undo()

    with pytest.raises(CheckpointError, match="not JSON-serializable"):
        save_checkpoint(tmp_path / "new.h5", **SAVE_ARGS, state={"bad": object()}, model=make_model(0))
    assert os.listdir(tmp_path) == [path.name]
    assert load_checkpoint(path).model_name == "tiny-net"


def test_single_writer_lock(tmp_path: Path) -> None:
    """One process writes a run's checkpoints: the one holding the run directory's lock, which a
    CheckpointManager requires and never outlives."""
    directory = tmp_path / "run"
    run = prepare(directory)
    manager = CheckpointManager(run)
    assert (directory / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(UsageError, match=rf"in use by another psadv process \(pid {os.getpid()}\)"):
        prepare(directory, resume=True)

    code = "import sys; from psadv.rundir import prepare; prepare(sys.argv[1], resume=True)"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert f"is in use by another psadv process (pid {os.getpid()})" in result.stderr

    run.release()
    run.release()
    with pytest.raises(CheckpointError, match="no longer holds the lock"):
        manager.save(1, **SAVE_ARGS, state={}, model=make_model(0))
    with pytest.raises(ValueError, match="released"):
        CheckpointManager(run)
    assert not list((directory / "checkpoints").iterdir())
    again = prepare(directory, resume=True)
    CheckpointManager(again).save(1, **SAVE_ARGS, state={}, model=make_model(0))
    again.release()
    assert [p.name for p in (directory / "checkpoints").iterdir()] == ["ckpt-00000001.h5"]


def _truncated(path: Path) -> None:
    save_trained(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _foreign_hdf5(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 3)))


def _newer_version(path: Path) -> None:
    save_trained(path)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = np.int64(FORMAT_VERSION + 1)


def _no_model_group(path: Path) -> None:
    save_trained(path)
    with h5py.File(path, "r+") as f:
        del f["model"]


def _missing_attr(path: Path) -> None:
    save_trained(path)
    with h5py.File(path, "r+") as f:
        del f.attrs["config"]


def _bad_json(path: Path) -> None:
    save_trained(path)
    with h5py.File(path, "r+") as f:
        f.attrs["state"] = "{not json"


def _model_dataset_without_dtype(path: Path) -> None:
    save_trained(path)
    with h5py.File(path, "r+") as f:
        del f["model/fc.weight"].attrs["torch_dtype"]


CORRUPTIONS = {
    "missing": (lambda path: None, "does not exist"),
    "empty": (lambda path: path.write_bytes(b""), "not a readable HDF5 file"),
    "truncated": (_truncated, "truncated or corrupted"),
    "random-bytes": (_random_bytes, "not a readable HDF5 file"),
    "foreign-hdf5": (_foreign_hdf5, "not a psadv checkpoint"),
    "newer-version": (_newer_version, "newer than"),
    "no-model-group": (_no_model_group, "no model/ group"),
    "missing-attr": (_missing_attr, "lacks the 'config' attribute"),
    "bad-json": (_bad_json, "corrupted"),
    "dataset-without-dtype": (_model_dataset_without_dtype, "corrupted"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_files_give_checkpoint_error_naming_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"ckpt-{case}.h5"
    make, message = CORRUPTIONS[case]
    make(path)
    # describe_checkpoint reads no tensor data, so it cannot notice a damaged dataset
    loaders = [load_checkpoint] if case == "dataset-without-dtype" else [load_checkpoint, describe_checkpoint]
    for loader in loaders:
        with pytest.raises(CheckpointError) as info:
            loader(path)
        text = str(info.value)
        assert str(path) in text and message in text, text
        assert "\n" not in text


def test_describe_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt-00000003.h5"
    model, _ = save_trained(path, rng=capture_rng_state(), extra={"hist": np.zeros(4)})
    info = describe_checkpoint(path)
    json.dumps(info)
    assert info["format"] == FORMAT and info["format_version"] == FORMAT_VERSION
    assert info["model_name"] == "tiny-net" and info["model_args"] == {"width": 4}
    assert info["version"] == 3 and info["examples_seen"] == 18
    assert info["parameter_count"] == sum(p.numel() for p in model.parameters())
    assert info["buffer_count"] == sum(b.numel() for b in model.buffers())
    assert info["tensor_count"] == len(model.state_dict())
    assert info["tensor_bytes"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert info["has_optimizer"] and info["has_rng"] and info["extra"] == ["hist"]
    assert info["config"] == {"train.lr": 0.05, "train.batch_size": 6}
    assert info["state"] == {"version": 3, "examples_seen": 18}
    assert info["file_size"] == path.stat().st_size
    assert info["path"] == str(path) and info["created"] and info["psadv_version"]


def test_find_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    lock = prepare(run)
    manager = CheckpointManager(lock, keep=5)
    for version in (2, 10, 9):
        manager.save(version, **SAVE_ARGS, state={}, model=make_model(0))
    lock.release()
    (run / "checkpoints" / ".ckpt-00000011.h5.tmp-123-abc").write_bytes(b"partial")
    assert find_checkpoint(run) == run / "checkpoints" / "ckpt-00000010.h5"
    assert find_checkpoint(run / "checkpoints") == run / "checkpoints" / "ckpt-00000010.h5"
    assert find_checkpoint(run / "checkpoints" / "ckpt-00000002.h5") == run / "checkpoints" / "ckpt-00000002.h5"

    flat = tmp_path / "flat"
    save_checkpoint(flat / "ckpt-00000004.h5", **SAVE_ARGS, state={}, model=make_model(0))
    assert find_checkpoint(flat) == flat / "ckpt-00000004.h5"

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        find_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")


def test_the_run_a_checkpoint_belongs_to(tmp_path: Path) -> None:
    """One answer for eval --save, export and resume: a checkpoint in RUN/checkpoints/ is RUN's; one
    of a line a resume set aside is RUN's only for a resume (its final evaluation and newest
    checkpoint are not the run's); any other file is no run's."""
    run = tmp_path / "run"
    assert run_of(run / "checkpoints" / "ckpt-00000010.h5") == run
    aside = run / "checkpoints" / "superseded-20260101-000000" / "ckpt-00000020.h5"
    assert run_of(aside) is None and run_of(aside, superseded=True) == run
    for loose in (tmp_path / "ckpt-00000010.h5", run / "ckpt-00000010.h5", tmp_path / "superseded-x" / "c.h5"):
        assert run_of(loose) is None and run_of(loose, superseded=True) is None
