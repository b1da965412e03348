"""Checkpoints that read fine but whose contents psadv cannot use (edited with h5py, as an auditor
did): every reader gives one line naming the file, a non-zero exit, and writes nothing."""

import json
import shutil
import socket

import h5py
import numpy as np
import pytest
import torch

import psadv
from cli_helpers import TINY_EVAL, TINY_TRAIN, assert_one_line_error, invoke
from psadv.checkpoint import describe_checkpoint, find_checkpoint, load_checkpoint

FAST, EVAL = TINY_TRAIN, TINY_EVAL


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def _json_attr(name, change):
    def edit(f):
        f.attrs[name] = json.dumps(change(json.loads(f.attrs[name])))
    return edit


def _reshape(f):
    del f["model/0.weight"]
    f["model/0.weight"] = np.zeros(3, dtype=np.float32)
    f["model/0.weight"].attrs.update({"torch_dtype": "float32", "role": "parameter"})


def _unknown_model(f):
    f.attrs["model_name"] = "resnet9000"


# name: (edit, what eval and export say (None: they work), what train --resume says)
DAMAGE = {
    "missing tensor": (lambda f: f["model"].__delitem__("0.weight"),
                       'its tensors do not fit model mnist-small: Missing key(s) in state_dict: "0.weight"',
                       'Missing key(s) in state_dict: "0.weight"'),
    "wrong shape": (_reshape, "size mismatch for 0.weight", "size mismatch for 0.weight"),
    "empty config": (_json_attr("config", lambda c: {}), "its config has no 'dataset'", "its config has no 'model'"),
    "unknown model args": (_json_attr("model_args", lambda a: {"bogus": 1}),
                           "model mnist-small cannot be built with arguments {\"bogus\": 1}",
                           "unexpected keyword argument 'bogus'"),
    "eps not a number": (_json_attr("config", lambda c: {**c, "eps": "big"}),
                         "eps in its config must be a number or a fraction such as 8/255, got 'big'",
                         "eps in its config must be a number"),
    "unknown model": (_unknown_model, "unknown model 'resnet9000'", "resnet9000"),
    "NaN weights": (lambda f: f["model/0.weight"].__setitem__(..., np.nan), "tensor 0.weight holds NaN or infinity",
                    "tensor 0.weight holds NaN or infinity"),
    "no data stream": (_json_attr("state", lambda s: {k: v for k, v in s.items() if k != "data_stream"}),
                       None, "missing 'data_stream'"),
}


def damaged_copy(run, tmp_path, case):
    path = tmp_path / "ckpt.h5"
    shutil.copy(find_checkpoint(run), path)
    with h5py.File(path, "r+") as f:
        DAMAGE[case][0](f)
    return path


def assert_error_line(result, code, *fragments):
    """Exit ``code``, no traceback, and one error line (a resume may say which run it starts first)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("psadv: error: ")]
    assert result.exit_code == code and len(errors) == 1, (result.exit_code, result.stderr)
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_readers_give_one_line(run, tmp_path, case):
    path = damaged_copy(run, tmp_path, case)
    _, read_error, resume_error = DAMAGE[case]
    prefix = f"checkpoint {path} is corrupted or incompatible: "
    out = tmp_path / "out.safetensors"
    if read_error is None:
        assert invoke("eval", path, *EVAL).exit_code == 0
    else:
        assert_one_line_error(invoke("eval", path, *EVAL), 1, prefix, read_error)
        assert_one_line_error(invoke("export", path, "-o", out), 1, prefix, read_error)
        with pytest.raises(psadv.CheckpointError, match="is corrupted or incompatible"):
            psadv.load_model(path)
    assert not out.exists()
    branch = tmp_path / "branch"
    assert_error_line(invoke("train", "--resume", path, "--run-dir", branch, *FAST[2:], "--steps", 4), 1,
                      prefix, resume_error)
    assert not branch.exists()


@pytest.mark.parametrize("case", ["missing tensor", "no data stream", "unknown model args"])
def test_resume_in_place_changes_nothing(run, tmp_path, case):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = find_checkpoint(copy)
    with h5py.File(newest, "r+") as f:
        DAMAGE[case][0](f)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert_error_line(invoke("train", "--resume", copy, *FAST[2:], "--steps", 4), 1, str(newest), DAMAGE[case][2])
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_a_damaged_newest_checkpoint_names_the_older_one_to_resume_from(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    newest = find_checkpoint(copy)
    older = newest.with_name("ckpt-00000001.h5")
    shutil.copy(newest, older)
    with h5py.File(newest, "r+") as f:
        DAMAGE["missing tensor"][0](f)
    assert_error_line(invoke("train", "--resume", copy, *FAST[2:], "--steps", 4), 1, str(newest),
                      f"resume from the previous checkpoint with --resume {older}")


def test_damaged_optimizer_state_on_resume(run, tmp_path):
    path = tmp_path / "ckpt.h5"
    shutil.copy(find_checkpoint(run), path)
    with h5py.File(path, "r+") as f:  # one parameter's worth too few in the optimizer's param group
        groups = json.loads(f["optimizer"].attrs["param_groups"])
        groups[0]["params"] = groups[0]["params"][:-1]
        f["optimizer"].attrs["param_groups"] = json.dumps(groups)
    branch = tmp_path / "branch"
    assert_error_line(invoke("train", "--resume", path, "--run-dir", branch, *FAST[2:], "--steps", 4), 1,
                      f"checkpoint {path} is corrupted or incompatible: ")
    assert not branch.exists()


def test_unreadable_checkpoint_says_why(tmp_path):
    """The system's reason, not HDF5's guess ("truncated or corrupted?"). A socket cannot be opened
    even by root, which can read a file of mode 000."""
    path = tmp_path / "ckpt.h5"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        for read in (load_checkpoint, describe_checkpoint):
            with pytest.raises(psadv.CheckpointError) as info:
                read(path)
            assert str(info.value) == f"cannot read checkpoint {path}: No such device or address"


def test_permission_denied_checkpoint(run, tmp_path, monkeypatch):
    from psadv.checkpoint import codec

    def refused(path, *args, **kwargs):  # a mode-000 file, which root (the CI) would still read
        raise PermissionError(13, "Permission denied", str(path))

    path = tmp_path / "ckpt.h5"
    shutil.copy(find_checkpoint(run), path)
    monkeypatch.setattr(codec, "open", refused, raising=False)
    for command in ("inspect", "eval"):
        result = invoke(command, path)
        assert_one_line_error(result, 1, f"cannot read checkpoint {path}: Permission denied")
        assert "corrupted" not in result.stderr


def test_a_device_failure_while_restoring_is_not_called_damage():
    from psadv.checkpoint import restoring

    with pytest.raises(psadv.CheckpointError, match="corrupted or incompatible: size mismatch"):
        with restoring("ckpt.h5"):
            raise RuntimeError("Error(s) in loading state_dict:\n size mismatch")
    for failure in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDA error: device-side assert"),
                    AttributeError("psadv's own mistake")):
        with pytest.raises(type(failure)):
            with restoring("ckpt.h5"):
                raise failure
