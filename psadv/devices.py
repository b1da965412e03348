"""Which device and how many torch threads a process uses."""

from __future__ import annotations

import torch

from .config import check_device
from .errors import ConfigError
from .threads import ThreadChoice, pick_threads


def pick_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: GPU ``local_rank % n_gpus`` when CUDA is present, else the CPU; or an explicit device.

    On a GPU, cuDNN is made deterministic (:func:`deterministic_cudnn`)."""
    check_device(spec)
    if spec == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = torch.device(f"cuda:{local_rank % n}") if n else torch.device("cpu")
    else:
        device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) present")
        deterministic_cudnn()
    return device


def deterministic_cudnn() -> None:
    """Let cuDNN pick only deterministic convolution kernels.

    Exact resume and "evaluation does not change training" promise bit-identical weights; cuDNN's
    default choice of backward kernels accumulates with atomics, in an order that changes from run
    to run, so two identical GPU runs drift apart in the last bits (results/gpu-h100-session.toml)."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def set_threads(requested: int = 0, processes_on_host: int = 1) -> ThreadChoice:
    """Set torch's intra-op threads: ``requested`` if > 0, else the automatic choice of
    :func:`psadv.threads.choose_threads` (the cores this process may use, its CPU quota and the load
    average, split between the processes on the host, so MPI ranks on one host don't oversubscribe
    it). Returns the choice, with its reason and any warning for the caller to print."""
    choice = pick_threads(requested, processes_on_host)
    torch.set_num_threads(choice.threads)
    return choice


def autocast(precision: str, device: torch.device):
    """The context the training arithmetic runs in: ``bf16`` is torch's bfloat16 autocast on
    ``device`` (float32 weights, optimizer and loss; convolutions and matmuls in bfloat16), ``fp32``
    changes nothing. Evaluation never runs in it, so every graded number is float32's."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def training_layout(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """``model`` in the memory format for its training arithmetic: oneDNN's bfloat16 convolutions
    want channels-last (NHWC) weights and activations. float32 keeps NCHW: channels-last paid for it
    on one CPU measured and not on another (results/arithmetic-fp32.toml, results/arithmetic-bf16.toml). Values are
    unchanged, only strides."""
    return model.to(memory_format=torch.channels_last) if precision == "bf16" else model


CPUINFO = "/proc/cpuinfo"  # Linux's list of the CPU's features


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` does bfloat16 arithmetic in hardware. On a CPU without it, torch emulates
    bfloat16 and ``--precision bf16`` runs slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open(CPUINFO) as f:
            words = set(f.read().split())
    except OSError:  # not Linux: no way to tell
        return False
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags; aarch64 lists "bf16" in Features


def auto_precision(device: torch.device) -> str:
    """``--precision auto``: bf16 on a CPU with bfloat16 instructions, where it was measured to train
    more robust models within a time budget (results/bf16-60s.toml); fp32 elsewhere, GPUs
    included, where bf16 was not measured."""
    return "bf16" if device.type == "cpu" and native_bf16(device) else "fp32"


def precision_warning(precision: str, device: torch.device) -> str | None:
    """A warning for ``--precision bf16`` on a device that only emulates bfloat16."""
    if precision != "bf16" or native_bf16(device):
        return None
    return (f"psadv: warning: --precision bf16 on {device}, which has no bfloat16 arithmetic in hardware: "
            "training will likely run slower than with --precision fp32")
