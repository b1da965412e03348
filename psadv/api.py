"""psadv from Python: what ``psadv train``, ``psadv eval`` and ``psadv export`` do, as functions.

Errors are the exceptions of :mod:`psadv.errors` (``ConfigError`` for a bad option, ``DataError``
and ``CheckpointError`` for files), never ``sys.exit``. ``import psadv`` stays light: this module
(torch and all) is imported on first use of ``psadv.train``, ``psadv.evaluate`` or
``psadv.load_model``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from .attacks.suite import EvalRun
from .config import FIELDS, Config
from .errors import ConfigError
from .export import export_model, load_model, open_model

__all__ = ["train", "evaluate", "load_model", "export_model"]


def _config_values(config: Config | dict | None) -> dict:
    if config is None:
        return {}
    if isinstance(config, Config):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return {str(key).replace("-", "_"): value for key, value in config.items()}
    raise ConfigError(f"psadv.train takes a psadv.Config or a dict of options, not a {type(config).__name__}")


def train(config: Config | dict | None = None, /, *, resume: str | os.PathLike | None = None,
          overwrite: bool = False, progress: bool = False, **overrides) -> dict:
    """Train in this process, as ``psadv train`` does, and return the run's summary.

    ``config`` is a :class:`psadv.Config` or a dict of ``psadv train`` options (underscores or
    dashes); keyword ``overrides`` win over it. ``resume`` continues a run (its directory or a
    checkpoint; a ``package.module:factory`` run only when ``model`` names that factory, as
    ``psadv train --resume`` needs ``--model``), ``overwrite`` replaces the run in ``run_dir``.
    The summary is ``summary.json``'s dict plus ``run_dir``. Signals (Ctrl-C) stop the run with a
    checkpoint, as on the command line; call it from the main thread.
    """
    from .runsetup import resolve_run
    from .single import train_single

    values = {**_config_values(config), **{k.replace("-", "_"): v for k, v in overrides.items()}}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          "for psadv.train")
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other")
    # A Config holds every field; the options it chose are those away from their defaults.
    given = ({name for name, f in FIELDS.items() if getattr(config, name) != f.default} | {
        k.replace("-", "_") for k in overrides}) if isinstance(config, Config) else None
    setup = resolve_run(values, resume=str(resume) if resume else None, overwrite=overwrite, given=given)
    summary = train_single(setup, show_progress=progress)
    return {**summary, "run_dir": str(setup.run_dir)}


def evaluate(model: nn.Module | str | os.PathLike, *, dataset: str | None = None,
             data_dir: str | os.PathLike | None = None, eps: float | str | None = None, norm: str | None = None,
             attack: str | None = EvalRun.attack, steps: int | None = None, restarts: int | None = None,
             step_size: float | str | None = None, loss: str | None = None, apgd_steps: int | None = None,
             targets: int | None = None, queries: int | None = None, examples: int | None = EvalRun.examples,
             batch_size: int = EvalRun.batch_size, device: str | torch.device = "cpu", seed: int = EvalRun.seed,
             threads: int = EvalRun.threads, trust_factory: bool | str | None = None) -> dict:
    """Clean and robust test accuracy, as ``psadv eval`` measures it.

    ``attack`` is any name ``psadv eval --attack`` takes (default ``strong``: APGD-CE, APGD-T and
    Square, each on the examples the earlier ones left standing); ``steps``/``restarts``/
    ``step_size``/``loss`` set PGD (and FGSM), ``apgd_steps``/``targets`` APGD-T and FAB-T,
    ``queries`` Square, and one that none of the chosen attacks reads is a ConfigError, as on the
    command line; left out, each has ``psadv eval``'s default. ``model`` is an ``nn.Module`` taking
    [0, 1] images, or a path :func:`load_model` reads (``trust_factory`` as there: needed for a
    ``package.module:factory`` model); for a path, ``dataset``, ``eps`` and ``norm`` default to the
    ones it was trained with, otherwise to :class:`psadv.Config`'s. ``eps`` may be a fraction such
    as ``"8/255"``, ``norm`` ``"Linf"`` or ``"L2"``. ``threads``: torch's threads while it runs
    (0, the default: chosen as ``psadv eval`` chooses them; the caller's setting is restored after).
    ``device``: the CPU unless told, since a given module is moved there (``psadv eval`` picks a GPU).
    Returns what ``psadv eval --json`` prints: ``clean_acc``, ``robust_acc``, ``attack``,
    ``examples``, per-attack rows (``attacks``, with their ``settings``), the ``masking_gap``, and
    ``dataset``, ``norm``, ``eps``, ``model``, ``version``, ``psadv_version``. The evaluation
    ``psadv eval`` runs: :func:`psadv.grading.prepare_evaluation`, then its ``run``.
    """
    from .config import MAX_THREADS
    from .grading import prepare_evaluation

    if not (isinstance(threads, int) and 0 <= threads <= MAX_THREADS):
        raise ConfigError(f"threads must be an integer from 0 (automatic) to {MAX_THREADS}, got {threads!r}")
    meta: dict[str, str] = {}
    name = type(model).__name__
    if not isinstance(model, nn.Module):
        model, meta = open_model(Path(model), device, trust_factory=trust_factory)
        name = meta.get("model_name", name)
    version = meta.get("version")
    # seeded per batch, apart from the global generator: a notebook's other random draws stay as they were
    return prepare_evaluation(
        model, recorded=meta, model_name=name, version=int(version) if version and version.isdigit() else None,
        device=device, dataset=dataset, data_dir=data_dir, eps=eps, norm=norm, attack=attack,
        options=dict(steps=steps, restarts=restarts, step_size=step_size, loss=loss, apgd_steps=apgd_steps,
                     targets=targets, queries=queries),
        examples=examples, batch_size=batch_size, seed=seed, threads=threads).run()
