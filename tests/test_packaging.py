"""Packaging: pyproject.toml, one source of the version, the licence."""

import re
import tomllib
from pathlib import Path

import psadv

from cli_helpers import invoke

ROOT = Path(__file__).resolve().parents[1]


def test_the_version_is_written_once_and_psadv_version_shows_it():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "psadv.__version__"}
    assert "version" not in (ROOT / "setup.py").read_text()
    assert re.fullmatch(r"\d+\.\d+\.\d+", psadv.__version__)
    res = invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"psadv, version {psadv.__version__}"


def test_pyproject_declares_the_readme_extras_and_licence():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"mpich", "test", "tensorboard"} <= set(extras)
    # the tracker tests read TensorBoard event files: the test extra brings it, so they never skip
    assert any(req.startswith("tensorboard") for req in extras["test"])
    assert project["scripts"] == {"psadv": "psadv.cli:main"} and project["license"] == "MIT"
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "psadv authors" in licence


def test_the_onnx_and_crosscheck_extras_install_what_their_tests_import():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {extra: {re.split(r"[<>=!~\[ ]", req)[0] for req in reqs} for extra, reqs in extras.items()}
    # the ONNX tests check, and run, an exported graph: all three come with psadv[onnx], none with test
    assert {"onnx", "onnxscript", "onnxruntime"} <= names["onnx"] and not names["test"] & names["onnx"]
    # torchattacks goes in with --no-deps (its torchvision pin would replace the CPU torch), so the
    # extra brings what it imports; torchattacks itself must stay out of every extra
    assert "scipy" in names["crosscheck"] and not any("torchattacks" in n or "torchvision" in n
                                                      for reqs in names.values() for n in reqs)


def test_everything_torchattacks_imports_comes_with_psadv_and_its_crosscheck_extra():
    """The modules torchattacks' files import unconditionally (module level, outside try), beyond the
    standard library, are installed by psadv's dependencies or its crosscheck extra: in a fresh
    environment ``import torchattacks`` failed for scipy."""
    import ast
    import sys
    from importlib.metadata import packages_distributions
    from pathlib import Path as P

    from conftest import require

    package = require("torchattacks", "pip install 'psadv[crosscheck]' and pip install --no-deps torchattacks==3.5.1")
    imported = set()
    for path in P(package.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only: a try or a function is not
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported.add(node.module.split(".")[0])
    imported -= set(sys.stdlib_module_names) | {"__future__", "torchattacks"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = {re.split(r"[<>=!~\[ ]", req)[0].lower()
            for req in project["dependencies"] + project["optional-dependencies"]["crosscheck"]}
    owners = packages_distributions()
    missing = sorted(m for m in imported if not {d.lower() for d in owners.get(m, [m])} & ours)
    assert "scipy" in imported and not missing, f"torchattacks imports {missing}, which psadv[crosscheck] lacks"
