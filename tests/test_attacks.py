"""Invariants of the shared attack module."""

import pytest
import torch

from psadv.attacks import ATTACKS, Attack, L2Threat, LinfThreat, margin_loss, perturb, refine
from psadv.attacks.pgd import attacked_count
from psadv.errors import ConfigError
from psadv.grading import measure_accuracy
from psadv.models import MODELS, build_model


@pytest.fixture()
def batch():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    x[:4] = 0.0  # pixels at the edges of the valid range
    x[4:8] = 1.0
    return x, torch.randint(0, 10, (16,))


@pytest.fixture()
def model():
    torch.manual_seed(1)
    return build_model("mnist-small", in_channels=1, num_classes=10)


@pytest.mark.parametrize("name", ["fgsm", "fgsm-rs", "pgd"])
@pytest.mark.parametrize("restarts", [1, 3])
def test_linf_result_inside_ball_and_pixel_range(model, batch, name, restarts):
    x, y = batch
    eps = 0.3
    x_adv = perturb(model, x, y, Attack(name=name, eps=eps, steps=5, restarts=restarts))
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not torch.equal(x_adv, x)


def test_l2_result_inside_ball(model, batch):
    x, y = batch
    x_adv = perturb(model, x, y, Attack(name="pgd", eps=1.5, steps=5, norm="l2"))
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= 1.5 + 1e-4
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_threat_model_projection_and_random_start():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    for threat, norm in ((LinfThreat(0.1), lambda d: d.abs().flatten(1).amax(1)),
                         (L2Threat(0.5), lambda d: d.flatten(1).norm(dim=1))):
        far = x + torch.randn_like(x)
        assert norm(threat.project(far, x) - x).max() <= threat.eps + 1e-5
        start = threat.random_perturb(x)
        assert norm(start - x).max() <= threat.eps + 1e-5
        assert not torch.equal(start, x)


def test_parameter_gradients_untouched_and_mode_restored(model, batch):
    x, y = batch
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model.train()
    perturb(model, x, y, Attack(name="pgd", eps=0.3, steps=3))
    assert model.training
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())
    model.eval()
    perturb(model, x, y, Attack(name="pgd", eps=0.3, steps=3))
    assert not model.training


def test_model_in_eval_mode_during_attack(batch):
    x, y = batch
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = build_model("mnist-small", in_channels=1, num_classes=10)

        def forward(self, inp):
            seen.append(self.training)
            return self.inner(inp)

    spy = Spy().train()
    perturb(spy, x, y, Attack(name="pgd", eps=0.3, steps=4, restarts=2))
    assert seen and not any(seen)
    assert spy.training


def test_pgd_matches_reference_with_fresh_gradient_each_step(model, batch):
    """perturb equals a hand-written PGD whose every step takes a fresh input gradient."""
    x, y = batch
    eps, alpha, steps = 0.3, 0.1, 4
    torch.manual_seed(11)
    got = perturb(model, x, y, Attack(name="pgd", eps=eps, steps=steps, step_size=alpha))
    torch.manual_seed(11)
    model.eval()
    ref = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1)
    for _ in range(steps):
        ref = ref.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(ref), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, [ref])
        ref = torch.clamp(torch.min(torch.max(ref.detach() + alpha * g.sign(), x - eps), x + eps), 0, 1)
    assert torch.allclose(got, ref, atol=1e-6)


def test_pgd_stronger_than_fgsm_and_restarts_never_hurt(mnist_model):
    model, x, y = mnist_model
    eps = 0.1
    clean = measure_accuracy(model, x, y, Attack(name="none", eps=eps))["robust_acc"]
    fgsm = measure_accuracy(model, x, y, Attack(name="fgsm", eps=eps))["robust_acc"]
    torch.manual_seed(3)
    pgd = measure_accuracy(model, x, y, Attack(name="pgd", eps=eps, steps=10))["robust_acc"]
    torch.manual_seed(3)
    pgd_restarts = measure_accuracy(model, x, y, Attack(name="pgd", eps=eps, steps=10, restarts=3))["robust_acc"]
    assert clean > 0.85
    assert pgd < fgsm < clean
    assert pgd_restarts <= pgd


def test_measure_accuracy_counts_match_a_direct_computation(mnist_model):
    model, x, y = mnist_model
    attack = Attack(name="fgsm", eps=0.1)
    result = measure_accuracy(model, x, y, attack, batch_size=128)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        robust = (model(perturb(model, x, y, attack)).argmax(1) == y).float().mean().item()
    assert result["examples"] == 300
    assert result["clean_acc"] == pytest.approx(clean)
    assert result["robust_acc"] == pytest.approx(robust)


def test_restarts_keep_each_examples_worst_case(model, batch):
    x, y = batch
    torch.manual_seed(5)
    multi = perturb(model, x, y, Attack(name="pgd", eps=0.3, steps=2, restarts=5))
    with torch.no_grad():
        loss_multi = torch.nn.functional.cross_entropy(model(multi), y, reduction="none")
    torch.manual_seed(5)
    first = perturb(model, x, y, Attack(name="pgd", eps=0.3, steps=2, restarts=1))
    with torch.no_grad():
        loss_first = torch.nn.functional.cross_entropy(model(first), y, reduction="none")
        wrong_first = model(first).argmax(1) != y
        wrong_multi = model(multi).argmax(1) != y
    # Worst case over restarts: never fewer misclassified, and loss at least the first restart's
    # wherever the misclassification status is unchanged.
    assert wrong_multi.sum() >= wrong_first.sum()
    same = wrong_multi == wrong_first
    assert torch.all(loss_multi[same] >= loss_first[same] - 1e-6)


def test_margin_loss_sign():
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    loss = margin_loss(logits, y)
    assert loss[0] == -4.0 and loss[1] == 3.0


def test_margin_loss_attack_works(model, batch):
    x, y = batch
    x_adv = perturb(model, x, y, Attack(name="pgd", eps=0.3, steps=5, loss="margin"))
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6


def test_named_attack_rules():
    assert Attack(name="fgsm", eps=0.3, steps=40).effective_steps == 1
    assert Attack(name="fgsm", eps=0.3).effective_step_size == pytest.approx(0.3)
    assert Attack(name="fgsm-rs", eps=0.3).effective_step_size == pytest.approx(0.375)
    assert Attack(name="pgd", eps=0.3, steps=10).effective_step_size == pytest.approx(0.075)
    assert Attack(name="pgd", eps=0.3, steps=10, step_size=0.01).effective_step_size == 0.01
    assert Attack(name="pgd", eps=0.3, steps=50, restarts=10).describe() == "PGD-50x10 linf eps=0.3"
    assert Attack(name="n-fgsm", eps=0.3).effective_step_size == pytest.approx(0.3)
    assert set(ATTACKS) == {"none", "fgsm", "fgsm-rs", "pgd", "n-fgsm"}


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_n_fgsm_leaves_the_eps_ball_by_design_but_not_its_reach(model, batch, norm):
    """N-FGSM: noise of 2ε plus a step of ε, never projected back to the ε-ball — only to 3ε and [0, 1]."""
    x, y = batch
    eps = 0.1 if norm == "linf" else 1.0
    torch.manual_seed(3)
    x_adv = perturb(model, x, y, Attack(name="n-fgsm", eps=eps, norm=norm))
    dist = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert dist.max() > 1.5 * eps  # outside the ε-ball: the noise is 2ε
    assert dist.max() <= 3 * eps + 1e-4
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


@pytest.mark.parametrize("kwargs", [dict(name="bim"), dict(eps=-0.1), dict(steps=-1), dict(restarts=0),
                                    dict(norm="l1"), dict(loss="hinge"), dict(step_size=0.0),
                                    dict(clean_share=1.0), dict(clean_share=-0.1)])
def test_bad_attack_arguments(kwargs):
    with pytest.raises(ConfigError):
        Attack(**kwargs)


def test_clean_attack_returns_input(model, batch):
    x, y = batch
    assert torch.equal(perturb(model, x, y, Attack(name="none")), x)
    assert torch.equal(perturb(model, x, y, Attack(name="pgd", eps=0.0)), x)


def test_a_clean_share_attacks_the_first_examples_and_leaves_the_rest_as_they_are(model, batch):
    x, y = batch  # 16 examples
    assert [attacked_count(16, s) for s in (0.0, 0.25, 0.5, 0.9)] == [16, 12, 8, 2]
    assert attacked_count(3, 0.9) == 1 and attacked_count(0, 0.5) == 0  # at least one, when there is one
    attack = Attack(name="pgd", eps=0.3, steps=3, clean_share=0.25)
    torch.manual_seed(2)
    x_adv = perturb(model, x, y, attack)
    assert x_adv.shape == x.shape
    assert torch.equal(x_adv[12:], x[12:])
    assert (x_adv[:12] - x[:12]).flatten(1).abs().amax(1).gt(0).all()  # every attacked example moved
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    # the attacked part is the attack of those examples alone, random start included
    torch.manual_seed(2)
    alone = perturb(model, x[:12], y[:12], Attack(name="pgd", eps=0.3, steps=3))
    assert torch.equal(x_adv[:12], alone)
    # a given start (reused perturbations) is not carried into the clean share
    shifted = (x + 0.1).clamp(0, 1)  # a perturbation remembered for every example
    assert torch.equal(perturb(model, x, y, attack, start=shifted)[12:], x[12:])
    # a refinement (a stale push's further steps) keeps the clean share clean
    refined = refine(model, x, y, attack, start=x_adv)
    assert torch.equal(refined[12:], x[12:]) and not torch.equal(refined[:12], x[:12])
    assert "on 75% of each batch" in attack.describe()


@pytest.mark.parametrize("name", list(MODELS))
def test_models_build_and_run(name):
    spec = MODELS[name]
    model = build_model(name, in_channels=spec.input_shape[0], num_classes=10)
    out = model(torch.rand(2, *spec.input_shape))
    assert out.shape == (2, 10)


def test_perturbation_memory_starts_seen_examples_where_they_ended(model, batch):
    from psadv.attacks import PerturbationMemory

    x, y = batch
    memory = PerturbationMemory(100, tuple(x.shape[1:]))
    idx = torch.arange(16) * 3
    attack = Attack(name="pgd", eps=0.3, steps=3)
    torch.manual_seed(0)
    fresh = memory.starts(idx, x, attack)  # nothing seen: the attack's own random start
    assert (fresh - x).abs().max() <= 0.3 + 1e-6 and not torch.equal(fresh, x)
    x_adv = perturb(model, x, y, attack, start=fresh)
    memory.remember(idx[:8], x[:8], x_adv[:8], attack)
    starts = memory.starts(idx, x, attack)
    torch.testing.assert_close(starts[:8], x_adv[:8], atol=1e-3, rtol=0)  # float16 storage
    assert (starts[8:] - x[8:]).abs().max() <= 0.3 + 1e-6  # unseen: fresh random starts
    smaller = memory.starts(idx, x, Attack(name="pgd", eps=0.1, steps=3))  # ε shrank: projected
    assert (smaller - x).abs().max() <= 0.1 + 1e-6
    again = PerturbationMemory(100, tuple(x.shape[1:]))
    again.load_arrays(memory.to_arrays())
    assert torch.equal(again.delta, memory.delta) and torch.equal(again.seen, memory.seen)
    with pytest.raises(ValueError, match="shape"):
        PerturbationMemory(99, tuple(x.shape[1:])).load_arrays(memory.to_arrays())


def test_perturbation_memory_keeps_what_a_clean_share_left_unattacked(model, batch):
    """The clean share's examples were not attacked: remembering their zero perturbation would start
    their next attack at the clean point instead of a random one (or their last perturbation)."""
    from psadv.attacks import PerturbationMemory

    x, y = batch  # 16 examples, the last 4 the clean share
    memory = PerturbationMemory(100, tuple(x.shape[1:]))
    idx = torch.arange(16)
    whole = Attack(name="pgd", eps=0.3, steps=3)
    torch.manual_seed(0)
    first = perturb(model, x, y, whole)
    memory.remember(idx, x, first, whole)
    shared = Attack(name="pgd", eps=0.3, steps=3, clean_share=0.25)
    second = perturb(model, x, y, shared, start=memory.starts(idx, x, shared))
    assert torch.equal(second[12:], x[12:])
    memory.remember(idx, x, second, shared)
    starts = memory.starts(idx, x, whole)
    torch.testing.assert_close(starts[:12], second[:12], atol=1e-3, rtol=0)
    torch.testing.assert_close(starts[12:], first[12:], atol=1e-3, rtol=0)  # not the clean point
    unseen = PerturbationMemory(100, tuple(x.shape[1:]))
    unseen.remember(idx, x, second, shared)
    assert torch.equal(unseen.seen[:16], torch.arange(16) < 12)  # never attacked: a random start next time
