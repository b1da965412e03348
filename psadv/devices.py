"""Which device and how many torch threads a process uses."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


def pick_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: GPU ``local_rank % n_gpus`` when CUDA is present, else the CPU; or an explicit device.

    On a GPU, cuDNN is made deterministic (:func:`deterministic_cudnn`)."""
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
    to run, so two identical GPU runs drift apart in the last bits (README, "On a GPU")."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def set_threads(requested: int = 0, processes_on_host: int = 1) -> int:
    """Set torch's intra-op threads: ``requested`` if > 0, else the host's cores split between
    the processes running on it (so MPI ranks on one host don't oversubscribe it)."""
    if requested > 0:
        n = requested
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // max(1, processes_on_host))
    torch.set_num_threads(n)
    return n
