"""PhaseConv2d: nn.Conv2d's values and gradients, with the input gradient in the phase form."""

import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from psadv.attacks import Attack, perturb
from psadv.attacks.apgd import apgd
from psadv.attacks.fab import fab_attack
from psadv.attacks.mode import attacking
from psadv.attacks.square import square_attack
from psadv.layers import PhaseConv2d, _PhaseConv2dFunction, phase_gradient_pays, phase_input_gradient
from psadv.models import build_model


def torch_input_gradient(g, x, w, stride, padding):
    return torch.ops.aten.convolution_backward(g, x, w, None, list(stride), list(padding), [1, 1], False,
                                              [0, 0], 1, [True, False, False])[0]


def test_phase_form_equals_torchs_input_gradient_over_random_shapes():
    """Strides 1-3 per axis, kernels of 1-3 phases, paddings up to past the kernel, image sides of
    either parity (trailing rows the forward never reads get zero), 1-3 channels in, 1-7 out."""
    rng = random.Random(0)
    checked = 0
    while checked < 200:
        sh, sw = rng.choice([1, 2, 3]), rng.choice([2, 3])
        kh, kw = sh * rng.choice([1, 2, 3]), sw * rng.choice([1, 2])
        ph, pw = rng.randint(0, kh + 1), rng.randint(0, kw + 1)
        h, w = rng.randint(kh, 20), rng.randint(kw, 20)
        x = torch.randn(2, rng.choice([1, 2, 3]), h, w, dtype=torch.float64)
        weight = torch.randn(rng.choice([1, 4, 7]), x.shape[1], kh, kw, dtype=torch.float64)
        g = torch.randn_like(F.conv2d(x, weight, None, (sh, sw), (ph, pw)))
        want = torch_input_gradient(g, x, weight, (sh, sw), (ph, pw))
        got = phase_input_gradient(g, weight, (sh, sw), (ph, pw), (h, w))
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-10), (sh, sw, kh, kw, ph, pw, h, w)
        checked += 1


def pair(**kw):
    """A PhaseConv2d and an nn.Conv2d with the same weights (float64)."""
    torch.manual_seed(0)
    plain = nn.Conv2d(**kw).double()
    phase = PhaseConv2d(**kw).double()
    phase.load_state_dict(plain.state_dict())
    return phase, plain


def test_values_state_dict_and_every_gradient_equal_nn_conv2d():
    phase, plain = pair(in_channels=1, out_channels=5, kernel_size=4, stride=2, padding=1)
    assert phase.phase_gradient
    assert list(phase.state_dict()) == list(plain.state_dict())
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    outs = []
    for conv in (phase, plain):
        xi = x.clone().requires_grad_(True)
        y = conv(xi)
        y.pow(2).sum().backward()
        outs.append((y.detach(), xi.grad, conv.weight.grad, conv.bias.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-10)


def test_a_gradient_of_the_input_gradient_differentiates_through_it():
    """GradAlign differentiates the input gradient with respect to the weights (create_graph)."""
    phase, _ = pair(in_channels=2, out_channels=3, kernel_size=4, stride=2, padding=1)
    x = torch.randn(2, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    w = phase.weight.detach().clone().requires_grad_(True)
    b = phase.bias.detach().clone().requires_grad_(True)

    def f(xx, ww, bb):
        return _PhaseConv2dFunction.apply(xx, ww, bb, (2, 2), (1, 1))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_under_bfloat16_autocast_it_casts_as_autocast_does():
    phase, plain = pair(in_channels=1, out_channels=16, kernel_size=4, stride=2, padding=1)
    phase, plain = phase.float(), plain.float()
    x = torch.rand(8, 1, 28, 28)
    grads = []
    for conv in (phase, plain):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(xi)
        assert y.dtype == torch.bfloat16
        (g,) = torch.autograd.grad(y.float().pow(2).sum(), [xi])
        assert g.dtype == torch.float32
        grads.append(g)
    assert torch.allclose(grads[0], grads[1], rtol=2e-2, atol=2e-2 * grads[1].abs().max().item())


def test_torch_func_grad_and_vmap_work_through_it():
    phase, plain = pair(in_channels=1, out_channels=4, kernel_size=4, stride=2, padding=1)
    x = torch.rand(5, 1, 12, 12, dtype=torch.float64)

    def per_example(conv):
        return torch.func.vmap(torch.func.grad(lambda xi: conv(xi.unsqueeze(0)).pow(2).sum()))(x)

    assert torch.allclose(per_example(phase), per_example(plain), atol=1e-10)


@pytest.mark.parametrize("kw, pays", [
    (dict(in_channels=1, out_channels=16, kernel_size=4, stride=2, padding=1), True),   # mnist-small's first
    (dict(in_channels=3, out_channels=16, kernel_size=4, stride=2, padding=1), True),
    (dict(in_channels=16, out_channels=32, kernel_size=4, stride=2, padding=1), False),  # measured slower
    (dict(in_channels=1, out_channels=32, kernel_size=5, stride=1, padding=2), False),   # stride 1: torch's
    (dict(in_channels=1, out_channels=8, kernel_size=3, stride=2, padding=1), False),    # 3 is not 2 phases
    (dict(in_channels=2, out_channels=8, kernel_size=4, stride=2, padding=1, groups=2), False),
    (dict(in_channels=1, out_channels=8, kernel_size=4, stride=2, padding=1, dilation=2), False),
    (dict(in_channels=1, out_channels=8, kernel_size=4, stride=2, padding=1, padding_mode="reflect"), False),
])
def test_where_the_phase_form_is_used(kw, pays):
    assert phase_gradient_pays(nn.Conv2d(**kw)) is pays
    assert PhaseConv2d(**kw).phase_gradient is pays


def test_only_a_cpu_pass_that_needs_the_input_gradient_takes_the_phase_form(monkeypatch):
    calls = []
    original = _PhaseConv2dFunction.apply
    monkeypatch.setattr(_PhaseConv2dFunction, "apply", lambda *a: calls.append(a) or original(*a))
    conv = PhaseConv2d(1, 4, 4, stride=2, padding=1)
    x = torch.rand(2, 1, 8, 8)
    conv(x)  # no input gradient wanted
    with torch.no_grad():
        conv(x.requires_grad_(True))
    PhaseConv2d(1, 4, 4, stride=2, padding=1, device="meta")(
        torch.rand(2, 1, 8, 8, device="meta", requires_grad=True))  # not a CPU
    assert calls == []
    conv(x)
    assert len(calls) == 1


def test_mnist_small_uses_it_only_for_its_first_convolution():
    model = build_model("mnist-small")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [getattr(c, "phase_gradient", False) for c in convs] == [True, False]


def run_apgd(m, x, y):
    return apgd(m, x, y, norm="linf", eps=0.3, steps=3)


def run_fab(m, x, y):
    return fab_attack(m, x, y, norm="linf", eps=0.3, steps=3, n_target_classes=2)


def run_square(m, x, y):
    return square_attack(m, x, y, norm="linf", eps=0.3, queries=5)


def run_pgd(m, x, y):
    return perturb(m, x, y, Attack(name="pgd", eps=0.3, steps=3, restarts=2))


@pytest.mark.parametrize("attack", [run_pgd, run_apgd, run_fab, run_square])
def test_every_attack_freezes_the_parameters_and_gives_them_back(attack):
    """Only the input gradient is computed while attacking; a parameter frozen before stays frozen."""
    torch.manual_seed(0)
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = build_model("mnist-small")

        def forward(self, inp):
            seen.append((self.training, [p.requires_grad for p in self.parameters()]))
            return self.inner(inp)

    spy = Spy().train()
    first = next(spy.parameters())
    first.requires_grad_(False)
    attack(spy, torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,)))
    assert seen and all(not training and not any(flags) for training, flags in seen)
    assert spy.training
    assert not first.requires_grad and all(p.requires_grad for p in list(spy.parameters())[1:])


def test_attacking_gives_the_model_back_when_the_attack_raises():
    model = build_model("mnist-small").train()
    with pytest.raises(RuntimeError), attacking(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("attack failed")
    assert model.training and all(p.requires_grad for p in model.parameters())
