"""Per-dataset recipes (psadv.config.RECIPES) and CIFAR-10's crop-and-flip augmentation."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from psadv.augment import PAD, augment_batch, crop_flip
from psadv.config import FIELDS, RECIPES, Config, make_config, read_toml, validate
from psadv.data import BatchStream
from psadv.runsetup import resolve_run
from psadv.single import train_single

from cli_helpers import invoke

TINY = ["--steps", "2", "--batch-size", "20", "--attack-steps", "1", "--eval-examples", "20", "--eval-steps", "1",
        "--threads", "1", "--no-progress"]


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist"


def test_every_recipe_names_fields_with_valid_values_and_the_sources_numbers():
    for dataset, recipe in RECIPES.items():
        assert set(recipe) <= set(FIELDS), dataset
        cfg = validate(Config(**{"dataset": dataset, **recipe}))
        assert cfg.dataset == dataset
    assert Config().eps == 0.3 and RECIPES["mnist"] == {}  # Madry et al.: the defaults are MNIST's
    assert RECIPES["fashion-mnist"]["eps"] == 0.1
    cifar = RECIPES["cifar10"]
    assert cifar["eps"] == 8 / 255 and cifar["augment"] == "crop-flip" and cifar["model"] == "preact-resnet18"


def test_recipe_fills_only_what_neither_the_file_nor_the_command_line_gives(tmp_path):
    assert make_config({"dataset": "fashion-mnist"}).eps == 0.1
    assert make_config({"dataset": "fashion-mnist"}, {"eps": 0.2}).eps == 0.2  # command line
    toml = tmp_path / "run.toml"
    toml.write_text('dataset = "fashion-mnist"\neps = 0.05\n')
    assert make_config(read_toml(toml), {}).eps == 0.05  # file
    assert make_config(read_toml(toml), {"eps": 0.15}).eps == 0.15
    cifar = make_config({"dataset": "cifar10", "lr": 0.1, "augment": "none"})
    assert (cifar.lr, cifar.augment, cifar.optimizer, cifar.momentum) == (0.1, "none", "sgd", 0.9)
    assert cifar.eps == 8 / 255 and cifar.batch_size == 128 and cifar.eps_ramp == 0.0
    # MNIST: the defaults, but for the refinement of stale examples, which the default push (sync) has none of
    assert make_config({}).to_dict() == {**Config().to_dict(), "refine_steps": 0}
    assert make_config({"push": "examples"}).to_dict() == Config(push="examples").to_dict()


def test_recipe_is_recorded_in_config_json_and_a_resume_keeps_it(tmp_path, fashion_dir):
    res = invoke("train", "--dataset", "fashion-mnist", "--data-dir", fashion_dir, "--run-dir", tmp_path / "a", *TINY)
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "a" / "config.json").read_text())["config"]
    assert config["eps"] == 0.1 and config["dataset"] == "fashion-mnist"
    res = invoke("train", "--dataset", "fashion-mnist", "--data-dir", fashion_dir, "--run-dir", tmp_path / "b",
                 "--eps", "0.2", *TINY)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["config"]["eps"] == 0.2
    res = invoke("train", "--resume", tmp_path / "b", "--steps", "3", "--no-progress")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["config"]["eps"] == 0.2


def test_help_shows_the_per_dataset_defaults():
    res = invoke("train", "--help")
    text = " ".join(res.output.split()).replace("fashion- mnist", "fashion-mnist")  # click wraps at hyphens
    assert "[default: 0.3; fashion-mnist: 0.1, cifar10: 0.0314]" in text
    assert "[default: none; cifar10: crop-flip]" in text


# --- augmentation ---------------------------------------------------------------------------------
def test_crop_flip_is_a_shifted_window_of_the_padded_image_possibly_mirrored():
    rng = np.random.default_rng(0)
    x = rng.random((64, 3, 32, 32), dtype=np.float32)
    out = crop_flip(x, np.random.default_rng(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))
    flipped = shifted = 0
    for i in range(len(x)):
        windows = [(dy, dx, f) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1) for f in (0, 1)
                   if np.array_equal(out[i], (lambda w: w[:, :, ::-1] if f else w)(
                       padded[i, :, dy:dy + 32, dx:dx + 32]))]
        assert len(windows) == 1, i
        dy, dx, f = windows[0]
        flipped += f
        shifted += (dy, dx) != (PAD, PAD)
    assert 16 < flipped < 48 and shifted > 48  # both happen, neither always


def test_augmentation_is_keyed_by_the_batch_position():
    x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    at = {"epoch": 3, "position": 7}
    a = augment_batch("crop-flip", x, 0, 0, at)
    np.testing.assert_array_equal(a, augment_batch("crop-flip", x, 0, 0, dict(at)))
    assert not np.array_equal(a, augment_batch("crop-flip", x, 0, 0, {"epoch": 3, "position": 8}))
    assert not np.array_equal(a, augment_batch("crop-flip", x, 0, 1, at))  # another attacker's stream
    assert not np.array_equal(a, augment_batch("crop-flip", x, 1, 0, at))  # another seed
    assert augment_batch("none", x, 0, 0, at) is x
    stream = BatchStream(np.arange(100), 10, seed=0)
    assert stream.state() == {"epoch": 0, "position": 0}  # the key is taken before next()


def weights(path):
    with h5py.File(path, "r") as f:
        return {k: f["model"][k][()] for k in f["model"]}


def test_augmented_training_resumes_exactly_and_differs_from_unaugmented(tmp_path, mnist_dir):
    common = dict(data_dir=str(mnist_dir), steps=8, batch_size=50, attack_steps=1, eval_every=0, eval_examples=50,
                  eval_steps=1, threads=1, keep_checkpoints=5)

    def train(name, resume=None, **options):
        overrides = {"run_dir": str(tmp_path / name)} if resume else {**common, "run_dir": str(tmp_path / name),
                                                                        **options}
        return train_single(resolve_run(overrides, resume=resume), show_progress=False)

    train("straight", augment="crop-flip", checkpoint_every=0)
    train("halves", augment="crop-flip", checkpoint_every=4)
    train("resumed", resume=str(tmp_path / "halves" / "checkpoints" / "ckpt-00000004.h5"))
    train("plain", checkpoint_every=0)
    a, b, c = (weights(tmp_path / name / "checkpoints" / "ckpt-00000008.h5") for name in ("straight", "resumed",
                                                                                         "plain"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
