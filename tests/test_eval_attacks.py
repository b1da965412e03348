"""The evaluation attacks (APGD-CE, APGD-T, Square), their cascade, the masking check and the gate."""

import pytest
import torch

from psadv.attacks import Attack, perturb
from psadv.attacks.apgd import apgd, apgd_targeted, checkpoints
from psadv.attacks.losses import dlr_loss, targeted_dlr_loss
from psadv.attacks.square import _linf_window, _linf_windows, p_at, square_attack
from psadv.attacks.suite import (EVAL_ATTACKS, SINGLE, EvalAttack, EvalKind, EvalSettings, build_cascade, check_given,
                                 masking_gap, masking_warning, skip_after_gate)
from psadv.config import check_eps, make_config
from psadv.errors import ConfigError
from psadv.grading import AccuracyJob, measure_accuracy
from psadv.models import build_model


@pytest.fixture()
def model():
    torch.manual_seed(1)
    return build_model("mnist-small", in_channels=1, num_classes=10)


@pytest.fixture()
def batch():
    torch.manual_seed(0)
    x = torch.rand(12, 1, 28, 28)
    x[:3] = 0.0  # pixels at the edges of the range
    x[3:6] = 1.0
    return x, torch.randint(0, 10, (12,))


def small(norm, eps):
    return EvalSettings(norm=norm, eps=eps, apgd_steps=6, targets=3, queries=40)


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 2.0)])
@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "square"])
def test_attacks_stay_in_ball_and_pixel_range_and_leave_the_model_alone(model, batch, name, norm, eps):
    x, y = batch
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    seen = []
    model.register_forward_pre_hook(lambda mod, inp: seen.append(mod.training))
    model.train()
    (attack,) = build_cascade(name, small(norm, eps))
    x_adv = attack.run(model, x, y, torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps * (1 + 1e-5) + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())
    assert model.training and seen and not any(seen)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-t", "square"])
def test_same_generator_seed_same_result(model, batch, name):
    x, y = batch
    (attack,) = build_cascade(name, small("linf", 0.3))
    first = attack.run(model, x, y, torch.Generator().manual_seed(4))
    again = attack.run(model, x, y, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)


def test_apgd_checkpoints_follow_the_published_schedule():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == [1]


def test_square_linf_proposal_differs_from_the_current_window():
    x_win = torch.full((64, 1, 3, 3), 0.5)
    x_win[:, :, 0, 0] = 0.0  # a pixel at the edge of the range: one sign choice is clamped
    up, down = torch.clamp(x_win + 0.3, 0, 1), torch.clamp(x_win - 0.3, 0, 1)
    old = torch.where((torch.arange(64) % 2 == 0).view(-1, 1, 1, 1), up, down)
    new = _linf_window(x_win, old, 0.3, torch.Generator().manual_seed(0))
    assert not ((new - old).abs() < 1e-7).flatten(1).all(1).any()  # no query wasted on an unchanged window
    assert torch.equal(new, torch.where((torch.arange(64) % 2 == 0).view(-1, 1, 1, 1), down, up))


def test_square_p_schedule():
    assert p_at(0, 10000, 0.8) == 0.8 and p_at(10, 10000, 0.8) == 0.8
    assert p_at(11, 10000, 0.8) == 0.4 and p_at(9000, 10000, 0.8) == pytest.approx(0.8 / 512)
    assert p_at(1, 5000, 0.8) == 0.8 and p_at(6, 5000, 0.8) == 0.4  # 5000 queries: twice as fast


def test_square_windows_never_start_at_the_last_place(trained):
    # as in the authors' code and torchattacks: a window never ends on the last row or column
    windows = _linf_windows(5000, 28, 28, 0.8, torch.Generator().manual_seed(0), "cpu")
    assert all(vh + s < 28 and vw + s < 28 for s, vh, vw in windows)
    assert {vh for s, vh, _ in windows if s == 1} == set(range(27))  # every other place is drawn
    net, x, y = trained
    adv = square_attack(net, x, y, norm="l2", eps=2.0, queries=300, generator=torch.Generator().manual_seed(0))
    moved = (adv - x).abs()
    assert moved.amax() > 0 and moved[..., -1, :].amax() == 0 and moved[..., :, -1].amax() == 0


def test_dlr_losses_ignore_the_logits_scale():
    torch.manual_seed(0)
    logits, y, t = torch.randn(6, 10), torch.randint(0, 10, (6,)), torch.randint(0, 10, (6,))
    assert torch.allclose(dlr_loss(logits, y), dlr_loss(7 * logits, y), atol=1e-5)
    assert torch.allclose(targeted_dlr_loss(logits, y, t), targeted_dlr_loss(7 * logits, y, t), atol=1e-5)
    fooled = torch.tensor([[0.0, 3.0, 1.0, 0.5]])
    assert dlr_loss(fooled, torch.tensor([0])) > 0 > dlr_loss(fooled, torch.tensor([1]))
    assert targeted_dlr_loss(fooled, torch.tensor([0]), torch.tensor([1])) > 0


@pytest.fixture()
def trained(mnist_model):
    """The shared clean-trained mnist-small (conftest) and its first 100 test examples."""
    net, x, y = mnist_model
    return net.eval(), x[:100], y[:100]


def test_apgd_at_least_as_strong_as_pgd_of_equal_steps(trained):
    net, x, y = trained
    eps, steps = 0.05, 10
    torch.manual_seed(0)
    pgd = measure_accuracy(net, x, y, Attack(name="pgd", eps=eps, steps=steps))["robust_acc"]
    ce = measure_accuracy(net, x, y, build_cascade("apgd-ce", EvalSettings(eps=eps, apgd_steps=steps)), seed=0)
    clean = ce["clean_acc"]
    assert clean > 0.8 and pgd < clean  # PGD flips something: a fair comparison
    assert ce["robust_acc"] <= pgd
    targeted = apgd_targeted(net, x, y, norm="linf", eps=eps, steps=steps, n_target_classes=3)
    with torch.no_grad():
        assert (net(targeted).argmax(1) == y).float().mean() <= pgd


class Quantized(torch.nn.Module):
    """A model with masked gradients by construction: its input is rounded to 0.1 (zero gradient)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 10) / 10)


def test_square_breaks_gradient_masking_and_the_warning_fires(trained):
    net, x, y = trained
    masked = Quantized(net).eval()
    x, y = x[:50], y[:50]
    s = EvalSettings(eps=0.15, apgd_steps=10, targets=3, queries=200)
    result = measure_accuracy(masked, x, y, build_cascade("apgd-ce", s) + build_cascade("square", s), seed=0)
    after_gradient, after_square = (row["robust_acc"] for row in result["attacks"])
    gradient_alone = apgd(masked, x, y, norm="linf", eps=0.15, steps=10)
    assert (masked(gradient_alone).argmax(1) != y).float().mean() < 0.2  # the gradient attack is blind here
    assert after_gradient - after_square > 0.2  # Square is not
    assert result["masking_gap"] == pytest.approx(after_gradient - after_square)
    assert result["robust_acc"] == after_square
    assert masking_warning(result["masking_gap"]).startswith("psadv: warning: ")


def test_masking_rule():
    rows = [{"black_box": False, "flipped": 30}, {"black_box": True, "flipped": 2}]
    assert masking_gap(rows, 100) == 0.02 and masking_warning(0.02) is not None
    assert masking_gap([{"black_box": False, "flipped": 3}, {"black_box": True, "flipped": 1}], 100) == 0.01
    assert masking_warning(0.01) is None and masking_warning(0.0) is None and masking_warning(None) is None
    assert masking_gap(rows[:1], 100) is None  # no black-box attack: nothing to compare
    assert masking_gap(rows[1:], 100) is None  # a black-box attack alone says nothing about gradients
    assert masking_gap([rows[0], {**rows[1], "skipped": True}], 100) is None


class Marker(torch.nn.Module):
    """Predicts the class written in pixel (0, 0) (value c/10); pixel (0, 1) holds the example's id."""

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.round(x[:, 0, 0, 0] * 10).long().clamp(0, 9), 10).float()


class Scripted(EvalAttack):
    """Flips the examples whose id is in ``flips`` (rewrites the marker) and records the ids it saw."""

    def __init__(self, flips, name="scripted", black_box=False):
        super().__init__(EvalSettings())
        self.flips, self.name, self.black_box, self.seen = set(flips), name, black_box, []

    def run(self, model, x, y, generator=None):
        ids = torch.round(x[:, 0, 0, 1] * 100).long().tolist()
        self.seen.extend(ids)
        x_adv = x.clone()
        for row, i in enumerate(ids):
            if i in self.flips:
                x_adv[row, 0, 0, 0] = ((y[row] + 1) % 10) / 10
        return x_adv

    def label(self):
        return self.name


def marked(n=40):
    y = torch.arange(n) % 10
    x = torch.zeros(n, 1, 4, 4)
    x[:, 0, 0, 0] = y / 10
    x[:, 0, 0, 1] = torch.arange(n) / 100
    x[:5, 0, 0, 0] = ((y[:5] + 1) % 10) / 10  # ids 0-4: misclassified already
    return x, y


def test_cascade_attacks_only_standing_examples_and_counts_each_attacks_flips():
    x, y = marked()
    first, second = Scripted(range(3, 13), "first"), Scripted({20, 21}, "second", black_box=True)
    result = measure_accuracy(Marker(), x, y, [first, second], batch_size=7)
    assert sorted(first.seen) == list(range(5, 40))  # clean-correct examples only
    assert sorted(second.seen) == [i for i in range(5, 40) if i not in range(3, 13)]
    assert result["clean_acc"] == 35 / 40 and result["robust_acc"] == 25 / 40
    assert [(r["name"], r["flipped"], r["robust_acc"]) for r in result["attacks"]] == [
        ("first", 8, 27 / 40), ("second", 2, 25 / 40)]  # ids 3 and 4 were wrong before any attack
    assert result["masking_gap"] == 2 / 40 and result["attack"].startswith("first + second")


def test_gate_runs_first_and_strong_attacks_see_only_its_survivors():
    x, y = marked()
    gate, strong = Scripted(range(30, 40), "gate"), Scripted({5, 6}, "strong")
    job = AccuracyJob(Marker(), x, y, [strong], gate=[gate], target=0.5, batch_size=6, seed=3)
    pieces = 0
    while not job.done:
        job.step()
        pieces += 1
        if not job.done and pieces < 7:  # the gate covers all 40 examples (7 pieces) before strong starts
            assert strong.seen == []
    result = job.result()
    assert sorted(strong.seen) == list(range(5, 30))
    assert result["robust_acc"] == 23 / 40 and not any(r["skipped"] for r in result["attacks"])


def test_gate_below_target_skips_the_expensive_attacks():
    x, y = marked()
    gate, strong = Scripted(range(10, 40), "gate"), Scripted({5}, "strong")
    job = AccuracyJob(Marker(), x, y, [strong], gate=[gate], target=0.5, batch_size=16)
    while not job.done:
        job.step()
    result = job.result()
    assert strong.seen == [] and result["robust_acc"] == 5 / 40
    assert [r["skipped"] for r in result["attacks"]] == [False, True] and "skipped" in result["attack"]
    assert skip_after_gate(0.3, 0.5) and not skip_after_gate(0.6, 0.5) and not skip_after_gate(0.1, 0.0)


def test_registry_names_and_config_choices():
    assert {"pgd", "apgd-ce", "apgd-t", "fab-t", "square", "autoattack", "strong"} <= set(EVAL_ATTACKS)
    assert [a.name for a in build_cascade("autoattack", EvalSettings())] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert make_config({"eval_attack": "strong"}).eval_attack == "strong"
    with pytest.raises(ConfigError, match="--eval-attack"):
        make_config({"eval_attack": "bogus"})
    with pytest.raises(ConfigError):
        build_cascade("bogus", EvalSettings())


def test_an_attack_is_one_row_of_the_table(monkeypatch):
    def noise(model, x, y, *, norm, eps, generator, queries):  # called as the table calls every attack
        return (x + eps * (2 * torch.rand(x.shape, generator=generator) - 1)).clamp(0, 1)

    monkeypatch.setitem(SINGLE, "noise", EvalKind(noise, lambda s: {"queries": s.queries}, "Noise-{queries}",
                                                  black_box=True))
    (attack,) = build_cascade("noise", EvalSettings(eps=0.1, queries=7))
    assert (attack.name, attack.label(), attack.describe()) == ("noise", "Noise-7", "Noise-7 linf eps=0.1")
    assert attack.black_box and attack.used_settings() == {"norm": "linf", "eps": 0.1, "queries": 7}
    x = torch.rand(4, 1, 5, 5)
    assert (attack.run(None, x, None, torch.Generator().manual_seed(0)) - x).abs().max() <= 0.1 + 1e-6
    check_given("noise", [attack], {"queries"})  # what its label names, it reads; the rest is refused
    with pytest.raises(ConfigError, match="--apgd-steps sets the iterations .* --attack noise does not read it"):
        check_given("noise", [attack], {"apgd_steps"})


def test_eps_bounds_depend_on_the_norm():
    assert make_config({"eps": 2.0, "norm": "l2"}).eps == 2.0
    with pytest.raises(ConfigError, match="exceeds 1") as info:
        make_config({"eps": 2.0})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="sqrt"):
        make_config({"eps": 29.0, "norm": "l2"})  # MNIST: sqrt(784) = 28
    check_eps(28.0, "l2", 784)
    with pytest.raises(ConfigError):
        check_eps(float("inf"), "l2", 784)


def test_pgd_in_the_cascade_matches_perturb_with_restarts_on_standing_examples(trained):
    net, x, y = trained
    attack = Attack(name="pgd", eps=0.05, steps=3)
    torch.manual_seed(9)
    direct = (net(perturb(net, x, y, attack)).argmax(1) == y).float().mean().item()
    (pgd,) = build_cascade("pgd", EvalSettings(eps=0.05, steps=3, restarts=1))
    torch.manual_seed(9)
    with torch.no_grad():
        via = (net(pgd.run(net, x, y)).argmax(1) == y).float().mean().item()
    assert via == direct


def test_training_only_attacks_are_not_evaluation_attacks():
    """N-FGSM's examples leave the ε-ball by design: grading robustness with it would be wrong."""
    assert "n-fgsm" not in EVAL_ATTACKS
    with pytest.raises(ConfigError, match="unknown evaluation attack 'n-fgsm'"):
        build_cascade("n-fgsm", EvalSettings())


def test_autoattack_runs_all_four_attacks_in_order(mnist_model):
    model, x, y = mnist_model
    cascade = build_cascade("autoattack", EvalSettings(eps=0.1, apgd_steps=3, targets=2, queries=10))
    result = measure_accuracy(model, x[:40], y[:40], cascade, batch_size=20, seed=0)
    labels = [row["attack"].split()[0] for row in result["attacks"]]
    assert labels == ["APGD-CE-3", "APGD-T-3x2", "FAB-T-3x2", "Square-10"]
    after = [row["robust_acc"] for row in result["attacks"]]
    assert after == sorted(after, reverse=True) and result["robust_acc"] == after[-1] <= result["clean_acc"]


def test_settings_refuse_an_infinite_step_and_the_api_targets_only_the_other_classes(mnist_model, mnist_dir):
    import psadv

    with pytest.raises(ConfigError, match="step size must be a finite number > 0, got inf"):
        EvalSettings(step_size=float("inf"))  # it made NaN images, which count as misclassified
    model, _, _ = mnist_model
    with pytest.raises(ConfigError, match="--targets 20: a model of 10 classes has 9 other classes"):
        psadv.evaluate(model, dataset="mnist", data_dir=mnist_dir.parent, attack="apgd-t", targets=20)
    result = psadv.evaluate(model, dataset="mnist", data_dir=mnist_dir.parent, attack="apgd-t", examples=3,
                            apgd_steps=1, threads=1)
    assert result["attack"].startswith("APGD-T-1x9 ")  # ten classes: nine to target, as the label says
