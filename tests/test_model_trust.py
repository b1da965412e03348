"""A file names its model, but a ``package.module:factory`` it names is code: psadv imports and calls
it only when the caller names it too (``--model`` on the command line, ``trust_factory`` in Python)."""

import json
import shutil

import h5py
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import psadv
from cli_helpers import TINY_EVAL, TINY_TRAIN, assert_one_line_error, invoke
from psadv.checkpoint import IncompatibleCheckpoint, UntrustedFactory, find_checkpoint

FAST, EVAL = TINY_TRAIN, TINY_EVAL
MARKER_NET = "custom_models:marker_net"


@pytest.fixture(scope="module")
def registry_run(tiny_run):
    """A 2-version mnist-small run: its tensors fit the MnistSmall that custom_models:marker_net returns."""
    return tiny_run


def plant(checkpoint, path, name, args):
    """A copy of ``checkpoint`` that names the model ``name`` with ``args``, as a crafted file would."""
    shutil.copy(checkpoint, path)
    with h5py.File(path, "r+") as f:
        config = json.loads(f.attrs["config"])
        f.attrs["model_name"] = name
        f.attrs["model_args"] = json.dumps(args)
        f.attrs["config"] = json.dumps({**config, "model": name})
    return path


@pytest.fixture
def planted(registry_run, tmp_path):
    """A checkpoint naming custom_models:marker_net, and the file that appears if the factory runs."""
    marker = tmp_path / "factory-ran"
    path = plant(find_checkpoint(registry_run), tmp_path / "planted.h5", MARKER_NET, {"marker": str(marker)})
    return path, marker


def test_commands_refuse_a_factory_the_file_names(planted, tmp_path):
    path, marker = planted
    untrusted = ("holds the factory model custom_models:marker_net", f"--model {MARKER_NET}",
                 f"trust_factory='{MARKER_NET}'")
    assert_one_line_error(invoke("eval", path, *EVAL), 2, str(path), *untrusted)
    assert_one_line_error(invoke("export", path, "-o", tmp_path / "out.safetensors"), 2, *untrusted)
    assert_one_line_error(invoke("train", "--resume", path, "--run-dir", tmp_path / "branch", *FAST), 2, *untrusted)
    inspected = invoke("inspect", path, "--json")  # reading a checkpoint runs no code
    assert inspected.exit_code == 0 and json.loads(inspected.output)["model_name"] == MARKER_NET
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "branch").exists()


def test_python_api_refuses_a_factory_the_file_names(planted, tmp_path):
    path, marker = planted
    with pytest.raises(UntrustedFactory, match="trust_factory="):
        psadv.load_model(path)
    with pytest.raises(UntrustedFactory):
        psadv.evaluate(path, attack="none", examples=2)
    with pytest.raises(UntrustedFactory):
        psadv.export_model(path, output=tmp_path / "out.safetensors")
    with pytest.raises(UntrustedFactory):
        psadv.train(resume=path, run_dir=str(tmp_path / "branch"), steps=3, threads=1)
    with pytest.raises(IncompatibleCheckpoint, match="holds model custom_models:marker_net, not custom_models:tiny"):
        psadv.load_model(path, trust_factory="custom_models:tiny_net")
    assert not marker.exists() and not (tmp_path / "branch").exists()


def test_the_audited_os_system_checkpoint_runs_nothing(registry_run, tmp_path):
    marker = tmp_path / "pwned"
    path = plant(find_checkpoint(registry_run), tmp_path / "evil.h5", "os:system", {"command": f"touch {marker}"})
    assert_one_line_error(invoke("eval", path, *EVAL), 2, "factory model os:system", "--model os:system")
    assert_one_line_error(invoke("export", path, "-o", tmp_path / "x.safetensors"), 2, "os:system")
    with pytest.raises(UntrustedFactory):
        psadv.load_model(path)
    assert not marker.exists()


def test_a_safetensors_file_naming_a_factory(registry_run, tmp_path):
    exported = tmp_path / "model.safetensors"
    assert invoke("export", registry_run, "-o", exported).exit_code == 0
    with safe_open(str(exported), framework="pt") as handle:
        meta = handle.metadata()
    marker = tmp_path / "factory-ran"
    crafted = tmp_path / "crafted.safetensors"
    save_file(load_file(str(exported)), str(crafted),
              metadata={**meta, "model_name": MARKER_NET, "model_args": json.dumps({"marker": str(marker)})})
    with pytest.raises(UntrustedFactory, match="model file .*crafted.safetensors holds the factory model"):
        psadv.load_model(crafted)
    assert_one_line_error(invoke("export", crafted, "-o", tmp_path / "again.safetensors"), 2, "--model")
    assert not marker.exists()
    model = psadv.load_model(crafted, trust_factory=True)  # the caller's explicit opt-in
    assert marker.exists() and not model.training


def test_naming_the_factory_trusts_it(planted, tmp_path):
    path, marker = planted
    evaluated = invoke("eval", path, *EVAL, "--json", "--model", MARKER_NET)
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.output)["examples"] == 2 and marker.exists()
    marker.unlink()
    out = tmp_path / "out.safetensors"
    exported = invoke("export", path, "-o", out, "--model", MARKER_NET)
    assert exported.exit_code == 0, exported.stderr
    assert marker.exists() and out.exists()
    assert not psadv.load_model(path, trust_factory=MARKER_NET).training
    assert psadv.evaluate(path, trust_factory=True, attack="none", examples=2)["examples"] == 2
    # a run resumed from it (a branch) builds the factory once --model names it
    branch = tmp_path / "branch"
    resumed = invoke("train", "--resume", path, "--run-dir", branch, "--model", MARKER_NET, *FAST[2:], "--steps", 3)
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads((branch / "summary.json").read_text())["version"] == 3


def test_model_must_match_the_file(registry_run, planted):
    path, marker = planted
    assert_one_line_error(invoke("eval", path, *EVAL, "--model", "mnist-small"), 2,
                          "holds model custom_models:marker_net, not mnist-small")
    assert_one_line_error(invoke("eval", registry_run, *EVAL, "--model", "mnist-madry"), 2,
                          "holds model mnist-small, not mnist-madry")
    assert not marker.exists()
    # a registry model needs no opt-in, and may be named
    assert invoke("eval", registry_run, *EVAL, "--model", "mnist-small").exit_code == 0


# --- code named by a config file, and the current directory ----------------------------------------
def test_a_factory_named_by_a_config_file_runs_only_with_the_command_lines_consent(tmp_path, mnist_dir, planted):
    """A shared --config used to be trusted like the command line: its factory was imported and called."""
    path, marker = planted
    config = tmp_path / "shared.toml"
    config.write_text(f'model = "{MARKER_NET}"\nmodel_args = \'{{"marker": "{marker}"}}\'\n')
    refused = ("the --config file names the factory model", f"--model {MARKER_NET}", "--trust-config-code")
    assert_one_line_error(invoke("train", "--config", config, "--data-dir", mnist_dir, "--run-dir",
                                 tmp_path / "new", *FAST), 2, *refused)
    assert_one_line_error(invoke("train", "--config", config, "--resume", path, "--run-dir", tmp_path / "branch",
                                 *FAST[2:]), 2, *refused)
    assert not marker.exists() and not (tmp_path / "new").exists() and not (tmp_path / "branch").exists()
    named = invoke("train", "--config", config, "--model", MARKER_NET, "--data-dir", mnist_dir, "--run-dir",
                   tmp_path / "named", *FAST)
    assert named.exit_code == 0, named.stderr
    assert marker.exists()
    marker.unlink()
    trusted = invoke("train", "--config", config, "--trust-config-code", "--data-dir", mnist_dir, "--run-dir",
                     tmp_path / "trusted", *FAST)
    assert trusted.exit_code == 0, trusted.stderr
    assert marker.exists()


def test_trusting_a_factory_never_lets_the_current_directory_shadow_a_package(registry_run, tmp_path):
    """`psadv export --model mymodels:net` put the current directory first on sys.path, so the
    safetensors.py lying there ran instead of the safetensors package."""
    import subprocess
    import sys
    from pathlib import Path

    work = tmp_path / "work"
    work.mkdir()
    shadow = work / "shadow-ran"
    (work / "safetensors.py").write_text(f"open({str(shadow)!r}, 'w').write('ran')\n")
    (work / "mymodels.py").write_text("from psadv.models import MnistSmall\n\ndef net():\n    return MnistSmall()\n")
    planted = plant(find_checkpoint(registry_run), work / "ckpt.h5", "mymodels:net", {})
    root = Path(psadv.__file__).resolve().parents[1]  # the psadv under test
    # -P: as the psadv script starts, without the current directory on sys.path
    res = subprocess.run([sys.executable, "-P", "-m", "psadv.cli", "export", str(planted), "--model", "mymodels:net",
                          "-o", str(work / "out.safetensors")], cwd=work, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert res.returncode == 0, res.stderr
    assert not shadow.exists() and (work / "out.safetensors").exists()
