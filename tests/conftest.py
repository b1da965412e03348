"""Shared pytest fixtures, and ``require``: a missing optional dependency skips a test on a
developer's machine and fails it in CI."""

import importlib
import os
import shutil
from pathlib import Path

import pytest

# CI sets it (.ci/run): there every test must run, so a dependency that did not install is a failure,
# not a quiet skip that leaves a cross-check unchecked.
REQUIRE_ALL = "PSADV_REQUIRE_ALL"


def missing(message: str) -> None:
    """Skip the calling test (``message``: what is missing and how to install it), or fail it where
    $PSADV_REQUIRE_ALL is 1."""
    if os.environ.get(REQUIRE_ALL) == "1":
        pytest.fail(f"{message}, and ${REQUIRE_ALL}=1 requires every test's dependencies", pytrace=False)
    pytest.skip(message)


def require(module: str, why: str = "") -> object:
    """The imported ``module``, or :func:`missing` (``why``: how to install it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # not installed, or a dependency of it is not (torchattacks without scipy)
        missing(f"cannot import {module} ({exc}); {why or f'pip install {module}'}")


def require_program(name: str, why: str = "") -> str:
    """The path of the program ``name`` on PATH, or :func:`missing`."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not on PATH; {why}" if why else f"{name} is not on PATH")
    return path


# The inner loop of development runs `python -m pytest -m "not slow"` (docs/reproduce.md): these
# modules' tests all start processes or train for long (dilated MPI sweeps, hundreds of crafted
# files, the scripts end to end, work lost to faults), and so does every test that starts `mpiexec`
# (marked `mpi` as well) or SLURM. CI runs everything.
SLOW_MODULES = {"test_dilation", "test_fuzz_files", "test_scripts", "test_lost_work", "test_slurm", "test_budget",
                "test_stop"}
# Fixtures that start `mpiexec` jobs themselves.
MPI_FIXTURES = {"mpiexec", "sweep"}
# Single slow tests in otherwise fast modules, found by `--durations=40` of `-m "not slow"` on 2
# busy cores (each took 7 s or more there).
SLOW_TESTS = {
    "test_pgd_stronger_than_fgsm_and_restarts_never_hurt", "test_models_build_and_run",
    "test_reused_perturbations_are_checkpointed_and_resume_exactly", "test_onnx_export_checks_and_matches_torch",
    "test_the_weight_average_is_what_the_run_delivers_and_resumes_exactly",
    "test_what_n_attackers_buy_from_emulated_runs_and_the_bottleneck_model", "test_plot_writes_pngs_of_a_real_run",
    "test_the_command_line_sets_the_wait_policy_before_torch_loads_openmp", "test_api_evaluate_path_and_module_agree",
    "test_emulated_staleness_resumes_exactly", "test_plain_safetensors_and_torchattacks_without_psadv",
    "test_averaging_can_start_or_stop_at_a_resume", "test_fab_on_mnist_breaks_at_least_what_pgd_breaks",
    "test_resume_continues_exactly", "test_evaluation_frequency_does_not_change_training",
    "test_emulated_staleness_changes_training", "test_report_on_existing_run_dirs_with_a_killed_run",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if MPI_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mpi)
            item.add_marker(pytest.mark.slow)
        elif module in SLOW_MODULES or item.originalname in SLOW_TESTS or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def idle_load_average():
    """In-process runs choose their threads as on an idle machine: the load average of a machine
    that runs this suite (and other jobs) would otherwise change thread counts from run to run and
    add warnings to the output tests read. test_threads.py gives the choice its load itself."""
    import psadv.threads

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psadv.threads, "load_average", lambda: None)
        yield


@pytest.fixture
def mpiexec() -> str:
    """The MPI launcher the MPI tests start jobs with (``pytest.mark.usefixtures("mpiexec")``)."""
    return require_program("mpiexec", "pip install 'psadv[mpich]'")


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
