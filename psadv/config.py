"""The one source of configuration defaults.

Every field of :class:`Config` is a ``psadv train`` option (``attack_steps`` -> ``--attack-steps``)
and a key of the ``--config FILE.toml`` file; the command line wins over the file, the file over
these defaults. Unknown keys are errors. The resolved config is written to the run directory and
into every checkpoint, and ``--resume`` starts from the checkpoint's copy.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import ConfigError


def opt(default, help: str, **meta):
    """A config field with its help text (and optional choices/min/max for validation)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class Config:
    # --- data --------------------------------------------------------------------------------
    dataset: str = opt("mnist", "dataset to train on", choices="datasets")
    data_dir: str = opt("", "dataset directory (default: $PSADV_DATA_DIR, then ~/.cache/psadv)")

    # --- model -------------------------------------------------------------------------------
    model: str = opt("mnist-small", "architecture, by registry name", choices="models")

    # --- the training adversary --------------------------------------------------------------
    norm: str = opt("linf", "threat model", choices="norms")
    # The MNIST challenge budget: ε=0.3 in L∞ on [0,1] pixels. The upper bound depends on the norm
    # (≤ 1 in L∞, ≤ √pixels in L2, where MNIST's standard is 2): see check_eps.
    eps: float = opt(0.3, "perturbation budget ε (pixels in [0,1]; L∞: <= 1, L2: <= sqrt(pixels))", min=0.0)
    # ε=0.3 MNIST training from scratch can sit at ~11% accuracy for many epochs; growing ε
    # linearly from 0 over the first part of training avoids that stall.
    eps_ramp: float = opt(0.2, "fraction of training over which ε ramps up linearly from 0", min=0.0, max=1.0)
    attack: str = opt("pgd", "training attack", choices="attacks")
    # PGD-10 is far cheaper than Madry's PGD-40 and, on MNIST, trains comparably robust nets.
    attack_steps: int = opt(10, "PGD steps k (fgsm and fgsm-rs always take 1)", min=0)
    # 0 keeps each attack's rule: 2.5/k for PGD (Madry), 1.25 for fgsm-rs (Wong), 1 for fgsm.
    attack_step_ratio: float = opt(0.0, "attack step size relative to ε (0 = attack's default)", min=0.0)
    # A schedule of PGD steps, 'K0,K1@P1,K2@P2': K0 steps until progress P1, then K1, ...
    attack_steps_schedule: str = opt("", "PGD steps by training progress, e.g. '2,5@0.3,10@0.6'")
    attack_restarts: int = opt(1, "random restarts of the training attack", min=1)

    # --- optimisation ------------------------------------------------------------------------
    # Adam with a one-cycle peak of 5e-3 is the measured recipe (README, "Measured"): 15 epochs of
    # PGD-10 reach 91.5% PGD-50x10 robust accuracy on MNIST.
    optimizer: str = opt("adam", "optimizer", choices=("adam", "sgd"))
    lr: float = opt(5e-3, "(peak) learning rate", min=0.0)
    # onecycle: up to lr at 40% of training, then down to 0 (fast adversarial training's cyclic
    # schedule); piecewise: ×0.1 at 50% and again at 75%.
    lr_schedule: str = opt("onecycle", "learning-rate schedule", choices=("constant", "piecewise", "onecycle"))
    momentum: float = opt(0.9, "SGD momentum", min=0.0, max=1.0)
    weight_decay: float = opt(0.0, "weight decay", min=0.0)
    batch_size: int = opt(100, "examples per optimizer step (and per attacker push)", min=1)

    # --- budget: training stops at whichever is reached first ----------------------------------
    # With none of steps/epochs/time_budget given, training runs 10 epochs.
    steps: int = opt(0, "optimizer steps (= model versions) to train; 0 = no step budget", min=0)
    epochs: float = opt(0.0, "epochs of the training set to consume; 0 = no epoch budget", min=0.0)
    time_budget: float = opt(0.0, "seconds of training; 0 = no time budget", min=0.0)
    target_robust_acc: float = opt(0.0, "stop once periodic evaluation reaches this robust accuracy (0 = off)",
                                   min=0.0, max=1.0)

    # --- evaluation during training ------------------------------------------------------------
    eval_every: int = opt(500, "evaluate every N versions (0 = only at the end)", min=0)
    # A held-out slice of the test set: enough to see the curve, cheap enough to run often.
    eval_examples: int = opt(1000, "test examples used by periodic evaluation", min=1)
    # PGD by default: periodic evaluation runs often and must stay cheap next to training; the
    # stronger names (apgd-ce, apgd-t, square, strong, autoattack) grade robustness as psadv eval does.
    eval_attack: str = opt("pgd", "attack (or cascade) of periodic evaluation", choices="eval_attacks")
    eval_steps: int = opt(20, "PGD steps of periodic evaluation (and of its gate)", min=0)
    eval_restarts: int = opt(1, "PGD restarts of periodic evaluation (and of its gate)", min=1)
    # AutoAttack's standard budgets.
    eval_apgd_steps: int = opt(100, "iterations of APGD-CE, APGD-T and FAB-T in periodic evaluation", min=1)
    eval_queries: int = opt(5000, "queries of the Square attack in periodic evaluation", min=1)
    # A strong evaluation costs hundreds of passes per example: PGD first bounds the robust
    # accuracy from above on the whole slice, the strong attacks then run only on its survivors,
    # and not at all when the bound is below --target-robust-acc (the target is missed anyway).
    eval_gate: bool = opt(True, "with a stronger --eval-attack than PGD, run PGD (--eval-steps, "
                          "--eval-restarts) first and the stronger attacks on its survivors only")

    # --- staleness -----------------------------------------------------------------------------
    emulate_staleness: int = opt(0, "single process: attack each batch with the model from S versions ago",
                                 min=0)
    # What N attackers would do to robustness, measured on one machine before anyone buys them:
    # their staleness under the server's own rules (--refresh-every, --max-staleness, rejections).
    emulate_attackers: int = opt(0, "single process: train with the staleness of N asynchronous attackers "
                                 "(0 = off)", min=0)
    # A stale push's examples were adversarial for an older model; a few PGD steps against the
    # current one, continuing from them, make them adversarial again (server-side work: it lowers
    # the number of attackers one server keeps up with).
    refine_steps: int = opt(0, "PGD steps the trainer adds to each stale push against the current model, "
                            "continuing from its examples (0 = off)", min=0)

    # --- asynchronous parameter server (under MPI with 2+ ranks) -------------------------------
    push: str = opt("examples", "what attackers push", choices=("examples", "gradients", "sync"))
    # Around 32 versions of staleness still trains well; around 64 it can fail badly.
    max_staleness: int = opt(32, "reject pushes staler than this many versions", min=0)
    refresh_every: int = opt(4, "send parameters to attackers every N versions", min=1)
    # Measured with 2 attackers on 2 cores (README): 2 pushes in flight per attacker give a mean
    # staleness of ~7 versions, 1 gives ~2.4 at ~15% fewer examples/s (the attacker waits for the
    # server to take each push before it starts the next batch). With 2 the README recipe missed
    # 89% robust accuracy in its 15 epochs, with 1 it reached it. Raise it where the network
    # round trip, not the attack, dominates an attacker's time.
    max_in_flight: int = opt(1, "pushes an attacker may have in flight (more: throughput, and staleness)",
                             min=1)
    lr_damping: bool = opt(False, "gradients mode: scale the learning rate by 1/max(1, staleness)")
    wire_dtype: str = opt("float32", "dtype of adversarial examples on the wire", choices=("float32", "float16"))

    # --- run -----------------------------------------------------------------------------------
    seed: int = opt(0, "random seed", min=0)
    run_dir: str = opt("", "run directory (default: runs/<date>-<time>)")
    log_every: int = opt(50, "one metrics row every N versions", min=1)
    checkpoint_every: int = opt(1000, "checkpoint every N versions (0 = only at the end)", min=0)
    keep_checkpoints: int = opt(3, "checkpoints kept in the run directory", min=1)
    device: str = opt("auto", "torch device: auto, cpu, cuda, cuda:N")
    # 0: all cores for one process; under MPI the cores are split between the ranks on a host.
    threads: int = opt(0, "torch threads per process (0 = automatic)", min=0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in fields(Config)}


def _choices(f) -> tuple[str, ...] | None:
    spec = f.metadata.get("choices")
    if spec is None or isinstance(spec, tuple):
        return spec
    # Registries are looked up lazily so this module imports nothing heavy.
    from .attacks import ATTACKS, THREATS
    from .attacks.suite import EVAL_ATTACKS
    from .data import DATASETS
    from .models import MODELS

    return tuple({"datasets": DATASETS, "models": MODELS, "attacks": ATTACKS, "norms": THREATS,
                  "eval_attacks": EVAL_ATTACKS}[spec])


def choices_of(name: str) -> tuple[str, ...] | None:
    return _choices(FIELDS[name])


def _coerce(name: str, value, source: str):
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float, "bool": bool}[f.type]
    where = f" in {source}" if source else ""
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}{where} must be true or false, got {value!r}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{name}{where} must be a {kind.__name__}, got {value!r}")
    return value


# Here, not in schedules.py: validation parses the option, and schedules.py (which imports this
# module) evaluates it.
def parse_steps_schedule(text: str) -> list[tuple[float, int]]:
    """'2,5@0.3,10@0.6' -> [(0.0, 2), (0.3, 5), (0.6, 10)]; '' -> []."""
    if not text.strip():
        return []
    points = []
    for i, part in enumerate(text.split(",")):
        steps_text, _, at_text = part.strip().partition("@")
        try:
            steps = int(steps_text)
            at = float(at_text) if at_text else 0.0
        except ValueError:
            raise ConfigError(f"--attack-steps-schedule: cannot read {part.strip()!r} (want K or K@PROGRESS)") from None
        if (i == 0) != (at_text == "") or steps < 0 or not 0.0 <= at <= 1.0:
            raise ConfigError(
                f"--attack-steps-schedule: bad entry {part.strip()!r}: the first entry is K, "
                "later ones K@P with 0 <= P <= 1 in increasing order, K >= 0")
        if points and at <= points[-1][0]:
            raise ConfigError(f"--attack-steps-schedule: progress points must increase, got {text!r}")
        points.append((at, steps))
    return points


def check_eps(eps: float, norm: str, pixels: int, option: str = "--eps") -> None:
    """ε must fit the norm: at most 1 in L∞ (the whole pixel range), at most √pixels in L2 (the
    distance from an all-black to an all-white image); ConfigError, one line, otherwise."""
    if not (math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"{option} must be a finite number >= 0, got {eps}")
    if norm == "linf" and eps > 1:
        raise ConfigError(f"{option} {eps:g} exceeds 1, the whole pixel range, for --norm linf "
                          "(budgets above 1 are L2 budgets: add --norm l2)")
    if norm == "l2" and eps > math.sqrt(pixels):
        raise ConfigError(f"{option} {eps:g} exceeds sqrt({pixels}) = {math.sqrt(pixels):.4g}, the largest "
                          "L2 distance between two images of this dataset")


def validate(cfg: Config) -> Config:
    """Check every value against its field's choices and range; ConfigError on the first bad one."""
    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        option = "--" + name.replace("_", "-")
        choices = _choices(f)
        if choices is not None and value not in choices:
            raise ConfigError(f"{option}: unknown value {value!r}; choose one of: {', '.join(choices)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{option} must be finite, got {value}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if lo is not None and value < lo:
            raise ConfigError(f"{option} must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(f"{option} must be <= {hi}, got {value}")
    parse_steps_schedule(cfg.attack_steps_schedule)
    from .data import dataset_info

    check_eps(cfg.eps, cfg.norm, math.prod(dataset_info(cfg.dataset).shape))
    if cfg.emulate_attackers and cfg.emulate_staleness:
        raise ConfigError("--emulate-attackers and --emulate-staleness exclude each other")
    if cfg.device != "auto" and not (cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    return cfg


def read_toml(path: str | Path) -> dict:
    """Config values from a TOML file (flat keys; dashes or underscores); unknown keys are errors."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"unknown config key {key!r} in {path}")
        values[name] = _coerce(name, value, str(path))
    return values


def make_config(*layers: dict, source: str = "") -> Config:
    """Defaults, overridden by each layer in turn (e.g. file values, then command-line values)."""
    merged: dict = {}
    for layer in layers:
        for name, value in layer.items():
            if name not in FIELDS:
                raise ConfigError(f"unknown config key {name!r}{' in ' + source if source else ''}")
            merged[name] = _coerce(name, value, source)
    return validate(Config(**merged))
