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
