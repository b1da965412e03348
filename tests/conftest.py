"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The verified offline MNIST copy in ``../shared/data/mnist`` beside the repository."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
