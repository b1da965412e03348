"""Models that leave psadv (safetensors, ONNX, load_model) and the Python API (train, evaluate)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import psadv
from cli_helpers import assert_one_line_error, invoke
from conftest import require
from psadv.checkpoint import find_checkpoint, load_checkpoint
from psadv.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
# how the optional dependencies install (pyproject.toml's extras)
CROSSCHECK = "pip install 'psadv[crosscheck]' and pip install --no-deps torchattacks==3.5.1"
ONNX = "pip install 'psadv[onnx]'"
TINY = {"steps": 6, "batch_size": 50, "attack_steps": 1, "eval_examples": 50, "eval_steps": 1, "threads": 1}


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_dir):
    """A 6-version mnist-small run trained through the API, with a saved final evaluation."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    summary = psadv.train(psadv.Config(data_dir=str(mnist_dir)), run_dir=str(run_dir), **TINY)
    assert summary["version"] == 6 and summary["run_dir"] == str(run_dir)
    result = invoke("eval", run_dir, "--examples", 40, "--attack", "pgd", "--steps", 1, "--restarts", 1, "--save",
                    "--no-progress", "--threads", 1)
    assert result.exit_code == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "model.safetensors"
    result = invoke("export", run, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.output.strip() == str(out)
    return out


def _test_images(mnist_dir, n=64):
    return torch.tensor(load_dataset("mnist", "test", mnist_dir).x[:n])


def test_export_round_trip_weights_and_metadata(run, exported):
    ckpt = load_checkpoint(find_checkpoint(run))
    tensors = load_file(str(exported))
    assert tensors.keys() == ckpt.model_state.keys()
    for key, value in ckpt.model_state.items():
        assert torch.equal(tensors[key], value), key
    with safe_open(str(exported), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "psadv-model" and meta["format_version"] == "1"
    assert meta["model_name"] == "mnist-small"
    assert json.loads(meta["model_args"]) == {"in_channels": 1, "num_classes": 10}
    assert (float(meta["eps"]), meta["norm"], meta["dataset"]) == (0.3, "linf", "mnist")
    assert meta["version"] == "6" and meta["input_range"] == "[0, 1]"
    assert json.loads(meta["input_shape"]) == [1, 28, 28] and meta["num_classes"] == "10"
    assert meta["psadv_version"] == psadv.__version__
    saved_eval = json.loads((run / "final_eval.json").read_text())
    assert json.loads(meta["final_eval"]) == saved_eval and saved_eval["version"] == 6
    assert "data_dir" not in meta and "source" not in meta  # local paths stay on this machine


def test_default_output_lies_in_the_run_and_is_not_overwritten(run):
    result = invoke("export", run)
    assert result.exit_code == 0, result.stderr
    assert Path(result.output.strip()) == run / "model-v6.safetensors"
    again = invoke("export", run)
    assert_one_line_error(again, 2, "model-v6.safetensors exists", "--overwrite")
    assert invoke("export", run, "--overwrite").exit_code == 0


def test_load_model_from_checkpoint_and_safetensors_agree(run, exported, mnist_dir):
    x = _test_images(mnist_dir)
    models = [psadv.load_model(run), psadv.load_model(find_checkpoint(run)), psadv.load_model(exported)]
    assert all(isinstance(m, torch.nn.Module) and not m.training for m in models)
    with torch.no_grad():
        outputs = [m(x) for m in models]
    assert outputs[0].shape == (64, 10)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_load_model_errors(tmp_path, exported):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(psadv.CheckpointError, match="without psadv's metadata"):
        psadv.load_model(foreign)
    with pytest.raises(psadv.CheckpointError, match="does not exist"):
        psadv.load_model(tmp_path / "missing")
    tensors = load_file(str(exported))
    with safe_open(str(exported), framework="pt") as handle:
        meta = handle.metadata()
    wrong = tmp_path / "wrong.safetensors"
    save_file(tensors, str(wrong), metadata={**meta, "model_name": "mnist-madry"})
    with pytest.raises(psadv.CheckpointError, match="do not fit model mnist-madry"):
        psadv.load_model(wrong)
    assert_one_line_error(invoke("export", tmp_path / "missing"), 1, "does not exist")


def test_plain_safetensors_and_torchattacks_without_psadv(exported, mnist_dir, run):
    """The export guide's example (docs/guides/export-python-api.md): plain safetensors + torch rebuild
    the model, torchattacks attacks it."""
    require("torchattacks", CROSSCHECK)
    block_psadv = ("import runpy, sys; sys.modules['psadv'] = None; sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", block_psadv, str(ROOT / "scripts" / "attack_exported.py"),
                           str(exported), str(mnist_dir), "--examples", "200", "--steps", "5"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    clean = psadv.evaluate(run, data_dir=mnist_dir, attack="none", examples=200)["clean_acc"]
    assert out["examples"] == 200 and out["eps"] == 0.3
    assert out["clean_acc"] == pytest.approx(clean, abs=1e-6)  # the same model on the same images
    assert out["robust_acc"] <= out["clean_acc"]


def test_onnx_export_checks_and_matches_torch(run, tmp_path, mnist_dir):
    onnx = require("onnx", ONNX)
    ort = require("onnxruntime", ONNX)
    out = tmp_path / "model.onnx"
    result = invoke("export", run, "--format", "onnx", "-o", out)
    assert result.exit_code == 0, result.stderr
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph, full_check=True)
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["model_name"] == "mnist-small" and meta["eps"] == "0.3" and meta["version"] == "6"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    model = psadv.load_model(run)
    for n in (1, 7):  # the batch dimension is dynamic
        x = _test_images(mnist_dir, n)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(["logits"], {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert_one_line_error(invoke("export", out), 1, "is an ONNX model")


def test_onnx_missing_packages_is_one_line(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what an install without the extra looks like
    result = invoke("export", run, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert_one_line_error(result, 1, "pip install 'psadv[onnx]'", "onnxscript")
    assert not list(tmp_path.iterdir())


def test_onnx_export_failure_is_one_line_and_leaves_nothing(run, tmp_path, monkeypatch):
    require("onnxscript", ONNX)

    def refuse(*args, **kwargs):
        print("exporter chatter")
        try:
            raise ValueError("data-dependent control flow\nmore detail")
        except ValueError as inner:
            raise RuntimeError("Failed to export the model with torch.export.") from inner

    monkeypatch.setattr(torch.onnx, "export", refuse)
    result = invoke("export", run, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert_one_line_error(result, 1, "cannot export mnist-small to ONNX", "ValueError: data-dependent control flow")
    assert "chatter" not in result.output
    assert not list(tmp_path.iterdir())


# --- the Python API ----------------------------------------------------------------------------------

def test_import_psadv_is_light():
    code = "import sys, psadv; assert psadv.__version__; print(sorted(m for m in ('torch', 'numpy', 'h5py') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_api_names():
    import pkgutil

    import psadv.grading  # noqa: F401 - the evaluation module, named apart from the function

    assert callable(psadv.evaluate) and psadv.evaluate.__module__ == "psadv.api"
    # no submodule bears an API function's name: importing it would bind the module over the function
    modules = {m.name for m in pkgutil.iter_modules(psadv.__path__)}
    assert not modules & set(psadv._API)
    assert set(psadv.__all__) >= {"Config", "train", "evaluate", "load_model", "export_model"}
    assert psadv.Config().eps == 0.3


def test_api_evaluate_path_and_module_agree(run, mnist_dir):
    rng = torch.get_rng_state()
    pgd = dict(examples=60, steps=2, restarts=1)
    by_path = psadv.evaluate(run, attack="pgd", **pgd)  # dataset, ε, data dir: the run's
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's generator is left alone
    by_module = psadv.evaluate(psadv.load_model(run), data_dir=mnist_dir, attack="pgd", **pgd)

    def timeless(result):  # the numbers; a module has no name nor version of its own
        return {**{k: v for k, v in result.items() if k not in ("model", "version")},
                "attacks": [{k: v for k, v in row.items() if k != "seconds"} for row in result["attacks"]]}

    assert timeless(by_path) == timeless(by_module)
    assert by_path["examples"] == 60 and by_path["attack"] == "PGD-2 linf eps=0.3"
    assert 0 <= by_path["robust_acc"] <= by_path["clean_acc"] <= 1
    assert (by_path["model"], by_path["version"], by_path["dataset"]) == ("mnist-small", 6, "mnist")
    strong = psadv.evaluate(run, examples=60, apgd_steps=2, targets=1, queries=5)  # the default: psadv eval's cascade
    assert [row["attack"].split()[0] for row in strong["attacks"]] == ["APGD-CE-2", "APGD-T-2x1", "Square-5"]
    assert strong["robust_acc"] <= strong["attacks"][0]["robust_acc"] and "masking_gap" in strong


def test_api_train_errors_raise(tmp_path, mnist_dir):
    with pytest.raises(psadv.ConfigError, match="unknown option 'epsilon'"):
        psadv.train(epsilon=0.3)
    with pytest.raises(psadv.ConfigError, match="--eps"):
        psadv.train({"data-dir": str(mnist_dir), "eps": 2.0}, run_dir=str(tmp_path / "r"))
    with pytest.raises(psadv.DataError):
        psadv.train(data_dir=str(tmp_path / "nowhere"), run_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_a_config_object_counts_as_chosen_what_differs_from_the_defaults(tmp_path, mnist_dir):
    # Config(momentum=...) with its default Adam: refused, as --momentum would be; the default 0.9 is not chosen
    with pytest.raises(psadv.ConfigError, match="--momentum is SGD's"):
        psadv.train(psadv.Config(data_dir=str(mnist_dir), momentum=0.5), run_dir=str(tmp_path / "r"))
    with pytest.raises(psadv.ConfigError, match="--attack-steps is PGD's"):
        psadv.train(psadv.Config(data_dir=str(mnist_dir), attack="fgsm"), run_dir=str(tmp_path / "r"), attack_steps=3)
    assert not (tmp_path / "r").exists()


def test_api_train_resumes(run, tmp_path):
    summary = psadv.train(resume=run, run_dir=str(tmp_path / "branch"), steps=8)
    assert summary["version"] == 8 and summary["run_dir"] == str(tmp_path / "branch")
