"""A convolution whose input gradient psadv computes faster than torch's kernel, values unchanged.

Every attack step ends in the gradient of the loss with respect to the input image, and the last
thing that gradient passes through is the model's first convolution. For a strided convolution of
few input channels (mnist-small's first layer: 1 → 16 channels, 4 × 4, stride 2), oneDNN's
backward-data kernel on this CPU took longer than for the second layer, which has 8× its arithmetic,
and about a quarter of a PGD-5 training version (results/input-gradient.toml). The same gradient is a transposed convolution, and a transposed
convolution of stride s whose kernel divides into s × s phases is one ordinary stride-1
convolution into s² · C_in channels (one per phase), interleaved back into the image's grid — the
"phase" (polyphase) decomposition. Forward kernels are the fast ones, so :class:`PhaseConv2d` runs
its input gradient that way on the CPU; the forward pass and the weight's gradient stay torch's own,
and a GPU keeps cuDNN's kernel (not measured there).

The rule of where it pays is measured, not assumed (:func:`phase_gradient_pays`): for strided
convolutions of 1 and 3 input channels the phase form was 1.5–4.2× faster; with 16 or 32 input
channels, or at stride 1, torch's kernel was as fast or faster, so those stay torch's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# The most input channels the phase form was measured to pay for (results/input-gradient.toml):
# 1 and 3 did (1.5-4.2x), 16 did not (0.35-0.82x).
MAX_PHASE_CHANNELS = 3


def phase_gradient_pays(conv: nn.Conv2d) -> bool:
    """Whether ``conv``'s input gradient is faster in the phase form: a plain (ungrouped, undilated,
    zero-padded) strided convolution of at most :data:`MAX_PHASE_CHANNELS` input channels whose kernel
    divides into its stride."""
    return (conv.groups == 1 and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and conv.in_channels <= MAX_PHASE_CHANNELS
            and max(conv.stride) > 1 and all(k % s == 0 for k, s in zip(conv.kernel_size, conv.stride)))


def phase_input_gradient(grad_out: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                         padding: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The gradient with respect to the input of ``conv2d(x, weight, stride=stride, padding=padding)``
    for an ``x`` of spatial ``size``, given the gradient ``grad_out`` of its output.

    Input row u (counted in the padded input) = s·b + r receives grad_out[b − j] · weight[s·j + r]
    for j = 0 … k/s − 1: for each phase r a full correlation of grad_out with a k/s-tap kernel.
    One stride-1 convolution computes all s_h · s_w phases of every input channel at once; a reshape
    interleaves them, and the padding is cut off (rows the forward never read get zero)."""
    c_out, c_in, kh, kw = weight.shape
    sh, sw = stride
    mh, mw = kh // sh, kw // sw
    phases = (weight.reshape(c_out, c_in, mh, sh, mw, sw).flip(2, 4)
              .permute(1, 3, 5, 0, 2, 4).reshape(c_in * sh * sw, c_out, mh, mw))
    out = F.conv2d(grad_out, phases, padding=(mh - 1, mw - 1))
    n, _, bh, bw = out.shape
    grid = out.reshape(n, c_in, sh, sw, bh, bw).permute(0, 1, 4, 2, 5, 3).reshape(n, c_in, sh * bh, sw * bw)
    (ph, pw), (h, w) = padding, size
    short_h, short_w = max(0, ph + h - sh * bh), max(0, pw + w - sw * bw)
    if short_h or short_w:  # trailing rows or columns that no output read: their gradient is zero
        grid = F.pad(grid, (0, short_w, 0, short_h))
    return grid[:, :, ph:ph + h, pw:pw + w]


class _PhaseConv2dFunction(torch.autograd.Function):
    """conv2d with the phase-form input gradient. Its backward is made of differentiable operations,
    so a gradient of the input gradient (GradAlign's regulariser) differentiates through it; with
    ``setup_context`` and a generated vmap rule it also works under ``torch.func`` (grad, vmap)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, padding):
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = phase_input_gradient(grad_out, weight, ctx.stride, ctx.padding, tuple(x.shape[2:]))
        if ctx.needs_input_grad[1]:
            grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad_out, ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


class PhaseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, state dict and forward values) whose input gradient takes the
    phase form where :func:`phase_gradient_pays`, on the CPU (where it was measured). Only a pass that
    needs the input's gradient (an attack step, GradAlign) takes the custom path; evaluation without
    gradients, export and training on clean inputs run torch's convolution unchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phase_gradient = phase_gradient_pays(self)

    def _conv_forward(self, x, weight, bias):
        device = x.device.type
        # measured on CPUs only (oneDNN); a GPU keeps cuDNN's kernel until a GPU run says otherwise
        if not (self.phase_gradient and device == "cpu" and x.requires_grad and torch.is_grad_enabled()):
            return super()._conv_forward(x, weight, bias)
        if torch.is_autocast_enabled(device):  # autocast's own casts for conv2d, made here so that
            dtype = torch.get_autocast_dtype(device)  # the function sees (and returns) one dtype
            x, weight, bias = (_autocast(t, dtype) for t in (x, weight, bias))
        with torch.autocast(device, enabled=False):
            return _PhaseConv2dFunction.apply(x, weight, bias, tuple(self.stride), tuple(self.padding))


def _autocast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` as autocast casts a convolution's argument: float32 (and float16/bfloat16) to ``dtype``; float64 stays."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)
