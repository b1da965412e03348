"""FAB-T: invariants, the closed-form projections, minimal distances on linear models, MNIST."""

import pytest
import torch

from psadv.attacks import Attack, perturb
from psadv.attacks.fab import fab_attack, project_l2, project_linf
from psadv.errors import ConfigError
from psadv.models import build_model

NORMS = {"linf": lambda d: d.flatten(1).abs().amax(1), "l2": lambda d: d.flatten(1).norm(dim=1)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: the tiny matrix products here are many times slower with two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def model():
    torch.manual_seed(1)
    return build_model("mnist-small", in_channels=1, num_classes=10)


@pytest.fixture()
def batch(model):
    """Random images (some at the pixel range's edges) labelled with the model's own predictions,
    so that every example is attacked."""
    torch.manual_seed(0)
    x = torch.rand(12, 1, 28, 28)
    x[:3] = 0.0
    x[3:6] = 1.0
    with torch.no_grad():
        return x, model(x).argmax(1)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_result_inside_ball_and_pixel_range(model, batch, norm, eps):
    x, y = batch
    x_adv = fab_attack(model, x, y, norm=norm, eps=eps, steps=20, n_target_classes=3, restarts=2,
                       generator=torch.Generator().manual_seed(0))
    assert NORMS[norm](x_adv - x).max() <= eps + 1e-5
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    changed = (x_adv != x).flatten(1).any(1)
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    assert changed.any()
    assert torch.equal(changed, wrong)  # every changed example is adversarial, every other is x


def test_parameter_gradients_untouched_and_mode_restored(model, batch):
    x, y = batch
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    model.train()
    fab_attack(model, x, y, norm="linf", eps=0.1, steps=3, n_target_classes=2)
    assert seen and not any(seen)
    assert model.training
    model.eval()
    fab_attack(model, x, y, norm="l2", eps=1.0, steps=3, n_target_classes=2)
    assert not model.training
    hook.remove()
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())


def test_random_restarts_are_reproducible_with_a_generator(model, batch):
    x, y = batch

    def run(seed):
        return fab_attack(model, x, y, norm="linf", eps=0.05, steps=5, n_target_classes=2, restarts=3,
                          generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(4), run(4))


def test_misclassified_examples_are_returned_unchanged(model, batch):
    x, y = batch
    wrong_y = (y + 1) % 10
    x_adv = fab_attack(model, x, wrong_y, norm="linf", eps=0.3, steps=5)
    assert torch.equal(x_adv, x)


@pytest.mark.parametrize("kwargs,match", [
    ({"norm": "l1", "eps": 0.1}, "unknown norm"),
    ({"norm": "linf", "eps": -1.0}, "eps must be"),
    ({"norm": "linf", "eps": 0.1, "restarts": 0}, "restarts"),
    ({"norm": "linf", "eps": 0.1, "n_target_classes": 10}, "<= 9"),
])
def test_bad_arguments_raise_config_errors(model, batch, kwargs, match):
    x, y = batch
    with pytest.raises(ConfigError, match=match):
        fab_attack(model, x, y, **kwargs)


def _bisection_projection(p, w, c, norm):
    """The same minimal move found by bisection on its one parameter (an independent check):
    L∞ moves every coordinate by ρ against sign(w), L2 by λ·w, both clipped to the pixel box."""
    flip = torch.where(c < 0, -1.0, 1.0).to(w.dtype)
    w, c = w * flip[:, None], c * flip

    def move(t):
        step = t[:, None] * (w.sign() if norm == "linf" else w)
        return torch.clamp(-step, -p, 1 - p)

    lo, hi = torch.zeros_like(c), torch.full_like(c, 1.0 if norm == "linf" else 1e6)
    for _ in range(200):
        mid = (lo + hi) / 2
        short = (w * move(mid)).sum(1) > -c  # the hyperplane is not reached yet
        lo, hi = torch.where(short, mid, lo), torch.where(short, hi, mid)
    return move(hi)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projections_match_bisection_and_reach_the_hyperplane(norm):
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(64, 40, generator=gen, dtype=torch.float64)
    p[:8, :15] = 0.0  # pixels at the edges of the box
    p[8:16, :15] = 1.0
    w = torch.randn(64, 40, generator=gen, dtype=torch.float64)
    w[:4, :25] = 0.0  # pixels that do not matter
    w[60] = 0.0
    c = torch.randn(64, generator=gen, dtype=torch.float64)
    c[48:56] = torch.tensor([100.0, -100.0]).repeat(4)  # hyperplanes beyond the box
    c[56] = 0.0  # a point on its hyperplane
    project = {"linf": project_linf, "l2": project_l2}[norm]
    d = project(p, w, c)
    assert torch.allclose(d, _bisection_projection(p, w, c, norm), atol=1e-9)
    assert (p + d).min() >= 0 and (p + d).max() <= 1
    reachable = (w * _bisection_projection(p, w, c.sign() * 1e9, norm)).sum(1).abs() >= c.abs()
    assert reachable[:48].all() and not reachable[48:56].any()
    assert torch.allclose(((w * d).sum(1) + c)[reachable], torch.zeros(1, dtype=torch.float64), atol=1e-9)
    assert torch.equal(d[56], torch.zeros(40, dtype=torch.float64))
    assert torch.equal(d[60], torch.zeros(40, dtype=torch.float64))


def _linear_problem(norm):
    """A linear 10-class model, inputs well inside the box, and each input's exact distance to the
    nearest decision boundary: min over classes j of margin_j / ‖w_y − w_j‖ (dual norm)."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 10))
    with torch.no_grad():  # logits W(x − ½): boundaries through the middle of the box
        model[1].bias.copy_(-0.5 * model[1].weight.sum(1))
    x = 0.4 + 0.2 * torch.rand(24, 1, 6, 6)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    weight = model[1].weight.detach()
    w_diff = weight[y][:, None, :] - weight[None, :, :].squeeze(0)  # N × classes × pixels
    dual = w_diff.abs().sum(2) if norm == "linf" else w_diff.norm(dim=2)
    margin = logits.gather(1, y[:, None]) - logits
    dist = (margin / dual).masked_fill(torch.nn.functional.one_hot(y, 10).bool(), float("inf")).amin(1)
    return model, x, y, dist


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_finds_the_minimal_perturbation_of_a_linear_model(norm):
    model, x, y, dist = _linear_problem(norm)
    # No pixel of the minimal move changes by more than the distance, and each has 0.4 of room to
    # the box: the box does not bind, so the closed form is the true minimum.
    assert dist.max() < 0.2
    for eps in dist.quantile(torch.tensor([0.25, 0.5, 0.75])).tolist():
        x_adv = fab_attack(model, x, y, norm=norm, eps=eps, steps=20)
        with torch.no_grad():
            broken = model(x_adv).argmax(1) != y
        assert broken[dist <= eps / 1.02].all()  # found within 2% of the minimum
        assert not broken[dist > eps].any()  # nothing below the minimum exists
        assert NORMS[norm](x_adv - x)[broken].min() >= dist[broken].min() - 1e-6


@pytest.mark.parametrize("norm,eps", [("linf", 0.08), ("l2", 1.0)])
def test_fab_on_mnist_breaks_at_least_what_pgd_breaks(mnist_model, norm, eps):
    model, x, y = mnist_model
    x, y = x[:100], y[:100]
    torch.manual_seed(0)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        pgd = model(perturb(model, x, y, Attack(name="pgd", eps=eps, steps=20, norm=norm))).argmax(1) == y
        # Fewer steps and targets than the defaults, for time: on this model they break as many.
        fab = model(fab_attack(model, x, y, norm=norm, eps=eps, steps=30, n_target_classes=3)).argmax(1) == y
    assert clean.float().mean() > 0.85
    assert pgd.float().mean() < clean.float().mean() - 0.1  # the attack matters at this ε
    assert fab.float().mean() <= pgd.float().mean() + 0.02
