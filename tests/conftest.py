"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The verified offline MNIST copy in ``../shared/data/mnist`` beside the repository."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_model(mnist_dir):
    """mnist-small trained clean for a few seconds on real MNIST, and 300 test examples."""
    import torch

    from psadv.data import load_dataset
    from psadv.models import build_model

    train, test = load_dataset("mnist", "train", mnist_dir), load_dataset("mnist", "test", mnist_dir)
    torch.manual_seed(0)
    model = build_model("mnist-small", in_channels=1, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = torch.tensor(train.x[:6000]), torch.tensor(train.y[:6000])
    for i in range(0, 6000, 100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
        opt.step()
    return model, torch.tensor(test.x[:300]), torch.tensor(test.y[:300])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, mnist_dir) -> Path:
    """A 2-version mnist-small run (``TINY_TRAIN``); tests copy it before they change anything."""
    from cli_helpers import TINY_TRAIN, invoke

    run = tmp_path_factory.mktemp("tiny") / "run"
    result = invoke("train", "--data-dir", mnist_dir, "--run-dir", run, *TINY_TRAIN)
    assert result.exit_code == 0, result.stderr
    return run
