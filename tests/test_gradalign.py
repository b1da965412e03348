"""GradAlign: the penalty against an independent per-example computation, its limits on models whose
gradients are aligned or split by construction, double backpropagation, and the trainers using it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psadv.config import make_config
from psadv.console import adversary_line
from psadv.errors import ConfigError
from psadv.gradalign import grad_align_penalty, training_loss
from psadv.models import build_model
from psadv.rundir import read_metrics

from test_training import run, weights


def small_net():
    torch.manual_seed(0)
    return build_model("mnist-small", in_channels=1, num_classes=10)


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_penalty_matches_a_per_example_computation():
    """Per example with torch.func: the CE gradient at x and at x + η (the same η, drawn again from
    the same seed: uniform in [−ε, ε], clipped to the pixel range), their cosine, 1 − the mean."""
    model, (x, y), eps = small_net(), batch(), 0.3
    torch.manual_seed(5)
    penalty = grad_align_penalty(model, x, y, eps).item()
    torch.manual_seed(5)
    x_noisy = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1)

    def loss(xi, yi):
        return F.cross_entropy(model(xi.unsqueeze(0)), yi.unsqueeze(0))

    grad = torch.func.vmap(torch.func.grad(loss))
    with torch.no_grad():
        cos = F.cosine_similarity(grad(x, y).flatten(1), grad(x_noisy, y).flatten(1), dim=1)
    assert penalty == pytest.approx(1 - cos.mean().item(), abs=1e-5)
    assert 0.0 < penalty < 2.0


def test_a_binary_linear_model_has_nothing_to_align():
    """With two classes and a linear model, ∇ₓCE = (p₁ − y₁)(w₁ − w₀): one direction everywhere."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 2))
    x, _ = batch()
    y = torch.randint(0, 2, (len(x),))
    assert grad_align_penalty(model, x, y, 0.3).item() == pytest.approx(0.0, abs=1e-5)


class Kink(nn.Module):
    """Logits (0, |Σx − c|): the input gradient flips sign where Σx crosses c."""

    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))

    def forward(self, x):
        s = (x.flatten(1).sum(1) - self.c).abs()
        return torch.stack([torch.zeros_like(s), s], 1)


def test_gradients_split_by_a_kink_inside_the_ball_are_penalised():
    """Each clean point sits just above the kink, so the random point lands on either side of it
    about half the time: cosines of ±1 and a penalty near 1. Far from the kink: no penalty."""
    x = torch.full((256, 1, 28, 28), 0.5)
    y = torch.zeros(256, dtype=torch.long)
    torch.manual_seed(0)
    assert grad_align_penalty(Kink(x[0].sum().item() - 1e-3), x, y, 0.3).item() > 0.5
    assert grad_align_penalty(Kink(-1000.0), x, y, 0.3).item() == pytest.approx(0.0, abs=1e-6)


def test_the_penalty_trains_the_parameters_and_leaves_the_inputs_alone():
    model, (x, y) = small_net(), batch()
    x.requires_grad_(True)  # a caller's leaf: the penalty differentiates copies of it, never it
    grad_align_penalty(model, x, y, 0.3).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert x.grad is None


def test_minimising_the_penalty_aligns_the_gradients(mnist_dir):
    """Its parameter gradient points downhill: Adam on the penalty alone aligns a fresh net's input
    gradients on real digits (results/gradalign-collapse.toml's check that GradAlign's failure to help is not a bug)."""
    from psadv.data import load_dataset

    data = load_dataset("mnist", "train", str(mnist_dir))
    x, y = torch.tensor(data.x[:50]), torch.tensor(data.y[:50])
    model = small_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    values = []
    for _ in range(25):
        penalty = grad_align_penalty(model, x, y, 0.3)
        optimizer.zero_grad()
        penalty.backward()
        optimizer.step()
        values.append(penalty.item())
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 / 3


def test_training_loss_is_cross_entropy_unless_asked():
    model, (x, y) = small_net(), batch()
    x_adv = torch.clamp(x + 0.1, 0, 1)
    plain, logits, none = training_loss(model, x_adv, y)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, y).item()) and none is None
    at_zero_eps, _, none = training_loss(model, x_adv, y, clean=x, weight=1.0, eps=0.0)  # the start of the ε ramp
    assert at_zero_eps.item() == pytest.approx(plain.item()) and none is None
    torch.manual_seed(2)
    aligned, _, penalty = training_loss(model, x_adv, y, clean=x, weight=2.0, eps=0.3)
    torch.manual_seed(2)
    assert penalty.item() == pytest.approx(grad_align_penalty(model, x, y, 0.3).item(), rel=1e-5)
    assert aligned.item() == pytest.approx(plain.item() + 2.0 * penalty.item(), rel=1e-5)
    with pytest.raises(ValueError, match="clean examples"):
        training_loss(model, x_adv, y, weight=1.0, eps=0.3)


def test_the_option_is_validated_and_named_at_start_up():
    with pytest.raises(ConfigError, match="--grad-align must be >= 0"):
        make_config({"grad_align": -1.0})
    assert adversary_line(make_config({"attack": "fgsm", "grad_align": 0.5})) == \
        "adversary: FGSM linf eps=0.3, GradAlign λ=0.5"


def test_grad_align_changes_single_process_training(tmp_path, mnist_dir):
    common = dict(steps=6, eval_every=0, attack="fgsm", eps_ramp=0.0, checkpoint_every=0)
    run(tmp_path, mnist_dir, name="plain", **common)
    run(tmp_path, mnist_dir, name="aligned", grad_align=1.0, **common)
    a = weights(tmp_path / "plain" / "checkpoints" / "ckpt-00000006.h5")
    b = weights(tmp_path / "aligned" / "checkpoints" / "ckpt-00000006.h5")
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    # the train rows carry the window's mean penalty, and only when GradAlign ran
    plain = [r for r in read_metrics(tmp_path / "plain" / "metrics.jsonl") if r["kind"] == "train"]
    aligned = [r for r in read_metrics(tmp_path / "aligned" / "metrics.jsonl") if r["kind"] == "train"]
    assert plain and not any("grad_align" in r for r in plain)
    assert aligned and all(0 < r["grad_align"] < 2 for r in aligned)
