"""Your own model (``--model package.module:factory``) and your own data (``--dataset npz``/``hdf5``)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import psadv
from cli_helpers import assert_one_line_error, invoke
from psadv.checkpoint import find_checkpoint, load_checkpoint
from psadv.config import make_config, parse_model_args
from psadv.data import check_arrays
from psadv.errors import ConfigError, DataError

TESTS = Path(__file__).resolve().parent
FAST = ["--batch-size", "20", "--attack-steps", "1", "--eval-examples", "20", "--eval-steps", "1", "--threads", "1",
        "--log-every", "2", "--no-progress"]
# and the ε of its data: a file data set has no recipe to take one from
TINY_NET = ["--model", "custom_models:tiny_net", "--model-args", '{"side": 8, "num_classes": 3}', "--eps", "8/255"]


def tiny_arrays(seed=0, n_train=120, n_test=30, classes=3):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (n_train, 1, 8, 8), dtype=np.uint8),
            "y_train": rng.integers(0, classes, n_train),
            "x_test": rng.random((n_test, 8, 8), dtype=np.float32),  # N x H x W floats: one channel
            "y_test": rng.integers(0, classes, n_test).astype(np.uint8)}


@pytest.fixture
def npz(tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, **tiny_arrays())
    return path


def write_hdf5(path, arrays):
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value
    return path


# --- pure parts -----------------------------------------------------------------------------------

def test_parse_model_args():
    assert parse_model_args("") == {} and parse_model_args(' {"width": 4} ') == {"width": 4}
    for bad in ("[1]", "{bad", "3"):
        with pytest.raises(ConfigError, match="--model-args"):
            parse_model_args(bad)


def test_config_accepts_registry_names_and_factories_only():
    assert make_config({"model": "pkg.mod:make.net"}).model == "pkg.mod:make.net"
    for bad in ("resnet9000", "pkg.mod", "pkg:", ":f", "pkg mod:f"):
        with pytest.raises(ConfigError, match="--model"):
            make_config({"model": bad})
    with pytest.raises(ConfigError, match="--model-args is for a package.module:factory"):
        make_config({"model_args": '{"width": 4}'})
    with pytest.raises(ConfigError, match="--data-md5 is for --dataset npz or hdf5"):
        make_config({"data_md5": "0" * 32})


def test_check_arrays_converts_and_counts_classes():
    splits, classes = check_arrays(tiny_arrays(), "f")
    x, y = splits["train"]
    assert x.dtype == np.float32 and x.shape == (120, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
    assert splits["test"][0].shape == (30, 1, 8, 8) and y.dtype == np.int64
    assert classes == 3
    assert check_arrays({**tiny_arrays(), "num_classes": np.int64(5)}, "f")[1] == 5


BAD_FILES = {
    "missing key": ({"x_test": None}, "lacks 'x_test'"),
    "int16 images": ({"x_train": np.zeros((120, 1, 8, 8), np.int16)}, "x_train has dtype int16"),
    "NaN": ({"x_test": np.full((30, 1, 8, 8), np.nan, np.float32)}, "x_test holds 1920 NaN or infinite"),
    "float out of range": ({"x_test": np.full((30, 1, 8, 8), 2.0, np.float32)}, "values from 2 to 2"),
    "channels last": ({"x_train": np.zeros((120, 8, 8, 1), np.uint8)}, "looks channels-last"),
    "float labels": ({"y_train": np.zeros(120, np.float32)}, "labels must be integers"),
    "negative label": ({"y_test": np.full(30, -1)}, "negative label"),
    "lengths differ": ({"y_train": np.zeros(119, np.int64)}, "119 labels for 120 images"),
    "labels beyond num_classes": ({"num_classes": np.int64(2)}, "labels reach 2, but num_classes is 2"),
    "shapes differ": ({"x_test": np.zeros((30, 1, 9, 9), np.uint8)}, "train images are (1, 8, 8)"),
}


def _bad(case):
    change, fragment = BAD_FILES[case]
    arrays = {**tiny_arrays(), **change}
    return {k: v for k, v in arrays.items() if v is not None}, fragment


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_check_arrays_rejects(case):
    arrays, fragment = _bad(case)
    with pytest.raises(DataError, match="^f: |^f lacks") as info:
        check_arrays(arrays, "f")
    assert fragment in str(info.value) and "\n" not in str(info.value)


# --- your own data through the CLI ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing key", "NaN", "labels beyond num_classes", "channels last"])
@pytest.mark.parametrize("kind", ["npz", "hdf5"])
def test_bad_data_file_is_one_line_and_leaves_no_run(tmp_path, kind, case):
    arrays, fragment = _bad(case)
    path = tmp_path / f"bad.{kind}"
    np.savez(path, **arrays) if kind == "npz" else write_hdf5(path, arrays)
    result = invoke("train", "--dataset", kind, "--data-dir", path, "--run-dir", tmp_path / "r", *TINY_NET, *FAST)
    assert_one_line_error(result, 1, fragment, str(path))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, fragment", [
    (b"not an archive", "is not an npz archive"),
    (None, "is a directory"),
])
def test_unreadable_data_file(tmp_path, content, fragment):
    path = tmp_path / "data.npz"
    path.mkdir() if content is None else path.write_bytes(content)
    result = invoke("train", "--dataset", "npz", "--data-dir", path, "--run-dir", tmp_path / "r", *TINY_NET, *FAST)
    assert_one_line_error(result, 1, fragment)
    assert not (tmp_path / "r").exists()
    no_file = invoke("train", "--dataset", "hdf5", "--run-dir", tmp_path / "r", *TINY_NET, *FAST)
    assert_one_line_error(no_file, 1, "--dataset hdf5 reads your own file: pass --data-dir FILE")


def test_npz_train_resume_eval_and_md5(tmp_path, npz):
    run = tmp_path / "run"
    result = invoke("train", "--dataset", "npz", "--data-dir", npz, "--run-dir", run, "--steps", 4, *TINY_NET, *FAST)
    assert result.exit_code == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    md5 = config["config"]["data_md5"]
    assert len(md5) == 32 and config["model_name"] == "custom_models:tiny_net"
    assert config["model_args"] == {"side": 8, "num_classes": 3}
    own = TINY_NET[:2]  # --model: the factory the checkpoint names runs only when named here too
    assert invoke("train", "--resume", run, "--steps", 6, *own, "--no-progress").exit_code == 0
    assert load_checkpoint(find_checkpoint(run)).state["version"] == 6
    evaluated = invoke("eval", run, "--examples", 30, "--attack", "pgd", "--steps", 1, "--restarts", 1, "--json",
                       "--no-progress", *own)
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.output)["examples"] == 30

    np.savez(npz, **tiny_arrays(seed=1))  # the data file changes under the run
    refused = invoke("train", "--resume", run, "--steps", 8, *own, "--no-progress")
    assert_one_line_error(refused, 1, f"the run expects {md5}", "--data-md5")
    assert load_checkpoint(find_checkpoint(run)).state["version"] == 6
    # evaluating on another file may be meant: it runs, and says the file differs
    other = invoke("eval", run, "--examples", 10, "--attack", "pgd", "--steps", 1, "--restarts", 1, "--json",
                   "--no-progress", *own)
    assert other.exit_code == 0 and json.loads(other.stdout)["examples"] == 10
    assert f"not {md5} (the file the run trained on)" in other.stderr
    assert "trained on" not in evaluated.stderr
    new_md5 = refused.stderr.split("--data-md5 ")[1].split()[0]
    assert invoke("train", "--resume", run, "--steps", 8, "--data-md5", new_md5, *own, "--no-progress").exit_code == 0


def test_hdf5_with_three_channels_and_num_classes(tmp_path):
    rng = np.random.default_rng(0)
    path = write_hdf5(tmp_path / "rgb.h5", {"x_train": rng.random((60, 3, 8, 8)), "y_train": rng.integers(0, 4, 60),
                                            "x_test": rng.random((20, 3, 8, 8)), "y_test": rng.integers(0, 4, 20),
                                            "num_classes": 5})
    summary = psadv.train(dataset="hdf5", data_dir=str(path), run_dir=str(tmp_path / "run"), steps=3, batch_size=20,
                          model="custom_models:tiny_net", model_args='{"side": 8, "in_channels": 3, "num_classes": 5}',
                          attack_steps=1, eval_examples=20, eval_steps=1, threads=1, eps="8/255")
    assert summary["version"] == 3 and summary["last_eval"]["examples"] == 20


# --- your own model through the CLI ---------------------------------------------------------------

def test_factory_model_train_resume_eval_export(tmp_path, mnist_dir):
    run = tmp_path / "run"
    args = ["--data-dir", mnist_dir, "--model", "custom_models:batchnorm_net", *FAST]
    assert invoke("train", "--run-dir", run, "--steps", 3, *args).exit_code == 0
    ckpt = load_checkpoint(find_checkpoint(run))
    assert ckpt.model_name == "custom_models:batchnorm_net" and ckpt.model_args == {}
    assert "1.running_mean" in ckpt.model_state  # buffers travel too
    # the factory named in the checkpoint runs only when the command names it too
    own = ["--model", "custom_models:batchnorm_net"]
    assert invoke("train", "--resume", run, "--steps", 5, *own, "--no-progress").exit_code == 0
    refused = invoke("train", "--resume", run, "--steps", 6, *own, "--model-args", '{"num_classes": 10}',
                     "--no-progress")
    assert_one_line_error(refused, 2, "--model-args {}")
    evaluated = invoke("eval", run, "--examples", 20, "--attack", "pgd", "--steps", 1, "--restarts", 1, "--json",
                       "--no-progress", *own)
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.output)["version"] == 5
    exported = invoke("export", run, *own)
    assert exported.exit_code == 0, exported.stderr
    model = psadv.load_model(exported.output.strip(), trust_factory="custom_models:batchnorm_net")
    assert type(model).__name__ == "Sequential" and not model.training


@pytest.mark.parametrize("model, model_args, fragment", [
    ("custom_models:missing", "", "'custom_models' has no attribute 'missing'"),
    ("no_such_module:f", "", "cannot import module 'no_such_module'"),
    ("custom_models:NOT_CALLABLE", "", "'NOT_CALLABLE' is not callable"),
    ("custom_models:not_a_module", "", "returned a str, not a torch.nn.Module"),
    ("custom_models:raises", "", "raised RuntimeError: the factory is broken"),
    ("custom_models:tiny_net", '{"num_classes": 5}', "gives output (2, 5), but the dataset needs (2, 10)"),
    ("custom_models:tiny_net", '{"side": 20}', "fails in its forward pass: RuntimeError"),
    ("custom_models:tiny_net", '{"depth": 3}', "raised TypeError"),
])
def test_bad_factory_is_one_line_and_leaves_no_run(tmp_path, mnist_dir, model, model_args, fragment):
    extra = ["--model-args", model_args] if model_args else []
    result = invoke("train", "--data-dir", mnist_dir, "--run-dir", tmp_path / "r", "--model", model, *extra, *FAST)
    assert_one_line_error(result, 2, f"--model {model}: ", fragment)
    assert not (tmp_path / "r").exists()


# --- under MPI: every rank imports the factory and reads the file --------------------------------

@pytest.mark.usefixtures("mpiexec")
def test_mpi_factory_model_on_npz_data(tmp_path, npz):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    cmd = [shutil.which("mpiexec"), "-n", "3", sys.executable, "-m", "psadv.cli", "train", "--dataset", "npz",
           "--data-dir", str(npz), "--run-dir", str(run), "--steps", "8", "--batch-size", "20", *TINY_NET, *FAST[2:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["version"] >= 8 and summary["stop_reason"] == "version budget"
    ckpt = load_checkpoint(find_checkpoint(run))
    assert ckpt.model_name == "custom_models:tiny_net" and ckpt.config["dataset"] == "npz"
    # a factory the attackers cannot build ends every rank with the same one line, and no run dir
    bad = subprocess.run([*cmd[:cmd.index("--run-dir")], "--run-dir", str(tmp_path / "bad"), "--steps", "2",
                          "--model", "custom_models:raises", "--eps", "8/255", *FAST[2:]], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr[-3000:]
    errors = [line for line in bad.stderr.splitlines() if line.startswith("psadv: error:")]
    assert len(errors) == 1 and "the factory is broken" in errors[0]
    assert not (tmp_path / "bad").exists()
