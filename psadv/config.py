"""The one source of configuration defaults.

Every field of :class:`Config` is a ``psadv train`` option (``attack_steps`` -> ``--attack-steps``)
and a key of the ``--config FILE.toml`` file; the command line wins over the file, the file over
these defaults. A few defaults differ by dataset: :data:`RECIPES` holds them, each with its
source, and fills the fields that neither the file nor the command line gives (so config.json
records them). Unknown keys are errors. The resolved config is written to the run directory and
into every checkpoint, and ``--resume`` starts from the checkpoint's copy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import ConfigError
from .pushmodes import OWNED_OPTIONS, PUSH_MODES, owners


MAX_SEED = 2**31 - 1
MAX_THREADS = 1024  # more than any host has; torch.set_num_threads overflows on absurd values


def opt(default, help: str, **meta):
    """A config field with its help text (and optional choices/min/max for validation)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class Config:
    # --- data --------------------------------------------------------------------------------
    dataset: str = opt("mnist", "dataset to train on, which also picks its recipe of defaults (npz, hdf5: your own "
                       "file, given as --data-dir FILE)",
                       choices="datasets")
    data_dir: str = opt("", "dataset directory, or the file of --dataset npz/hdf5 "
                        "(default: $PSADV_DATA_DIR, then ~/.cache/psadv)")
    # '': the file's md5 is recorded in the run's config when training starts, so a resume on a
    # changed file is refused; give it to pin the file from the start.
    data_md5: str = opt("", "md5 the --dataset npz/hdf5 file must have (default: record the file's)")
    # Augmentation is part of the CIFAR-10 recipe (RECIPES); MNIST-like digits need none.
    augment: str = opt("none", "training-batch augmentation: crop-flip = random crop (pad 4) + horizontal flip",
                       choices="augmentations")

    # --- model -------------------------------------------------------------------------------
    model: str = opt("mnist-small", "architecture: mnist-small, mnist-madry, preact-resnet18, or your own "
                     "package.module:factory (a callable returning an nn.Module for [0, 1] inputs)")
    # '': the factory is called without arguments; registry models take theirs from the dataset.
    model_args: str = opt("", "JSON object of keyword arguments for a package.module:factory model, "
                          "e.g. '{\"width\": 64}'")

    # --- the training adversary --------------------------------------------------------------
    # Case folded: RobustBench, AutoAttack and torchattacks write Linf and L2.
    norm: str = opt("linf", "threat model (Linf and L2 also accepted)", choices="norms", fold_case=True)
    # The MNIST challenge budget: ε=0.3 in L∞ on [0,1] pixels. The upper bound depends on the norm
    # (≤ 1 in L∞, ≤ √pixels in L2, where MNIST's standard is 2): see check_eps.
    # A fraction such as 8/255 is read as its value: budgets are published in 1/255 units. A file
    # data set (npz, hdf5) has no recipe and so no ε of its own: make_config asks for one.
    eps: float = opt(0.3, "perturbation budget ε (pixels in [0,1]; L∞: <= 1, L2: <= sqrt(pixels)); a number "
                     "or a fraction such as 8/255", min=0.0, fraction=True)
    # ε=0.3 MNIST training from scratch can sit at ~11% accuracy for many epochs; growing ε
    # linearly from 0 over the first part of training avoids that stall.
    eps_ramp: float = opt(0.2, "fraction of training over which ε ramps up linearly from 0", min=0.0, max=1.0)
    # PGD, one process and MPI alike: cheaper one-step adversaries reach a PGD-only target sooner,
    # but mask gradients more, so a black-box attack finds them weaker
    # (results/one-step-longer-budgets.toml); the default is judged by the strongest evaluation.
    attack: str = opt("pgd", "training attack", choices="attacks")
    # PGD-5: on MNIST it reaches 87% under the strong cascade (full test set, three seeds) sooner
    # than PGD-10 and Madry's PGD-40, and with eight emulated attackers it trains as robust a model
    # per version as PGD-10 (results/time-to-target-float32.toml, results/time-to-target-pgd40.toml,
    # results/emulated-attackers-refinement.toml).
    attack_steps: int = opt(5, "PGD steps k (fgsm and fgsm-rs always take 1)", min=0)
    # 0 keeps each attack's rule: 2.5/k for PGD (Madry), 1.25 for fgsm-rs (Wong), 1 for fgsm.
    attack_step_ratio: float = opt(0.0, "attack step size relative to ε (0 = attack's default)", min=0.0)
    # A schedule of PGD steps, 'K0,K1@P1,K2@P2': K0 steps until progress P1, then K1, ...
    attack_steps_schedule: str = opt("", "PGD steps by training progress, e.g. '2,5@0.3,10@0.6'")
    attack_restarts: int = opt(1, "random restarts of the training attack", min=1)
    # At the short budgets of issue 37 the default's seeds fail on clean accuracy more often than on
    # robustness (results/time-to-target-phase-form.toml, results/time-to-target-edge.toml); leaving a
    # share of each batch clean trains clean accuracy and makes a version's attack cheaper. Off: at
    # 30 s a share of 0.2 lifted every seed over 98% clean but left the weakest 0.7 points under 87%
    # strong (results/clean-share.toml).
    clean_share: float = opt(0.0, "share of each batch trained on as it is, not attacked (0 = every example "
                             "attacked; below 1)", min=0.0, max=1.0)
    # An example's perturbation changes little between its visits, so starting from the last one
    # makes a few steps as strong as many (ATTA); with it, one-step FGSM-RS training stopped
    # collapsing (results/one-step-exploration.toml). Off by default, as is FGSM-RS: see ``attack``.
    reuse_perturbations: bool = opt(False, "start each example's attack from its perturbation of the last epoch "
                                    "(kept per example; attackers keep their shard's)")
    # One-step training collapses when the input gradients inside the ε-ball stop agreeing; GradAlign
    # (Andriushchenko & Flammarion 2020) penalises their disagreement (psadv.gradalign), at several
    # plain training steps' cost. Off by default: with MNIST's recipe at ε = 0.3 it did not keep FGSM
    # or FGSM-RS from collapsing at any weight tried (results/gradalign-collapse.toml).
    grad_align: float = opt(0.0, "weight λ of the GradAlign regulariser, λ·(1 − cos) of the input gradients "
                            "at x and at a random point of the ε-ball (0 = off)", min=0.0)

    # --- optimisation ------------------------------------------------------------------------
    # Adam with a one-cycle peak of 1e-2: a short budget needs the larger steps (in 60 s it trained
    # every seed more robust than 5e-3, the peak tuned for 15 epochs of PGD-10; 2e-2 was worse), and
    # it ties with 5e-3 at 180 s (results/lr-peak-60s.toml, results/lr-peak-180s.toml). Against staleness the peak is
    # STALENESS_LR instead (make_config).
    optimizer: str = opt("adam", "optimizer", choices=("adam", "sgd"))
    lr: float = opt(1e-2, "(peak) learning rate (with attackers, real or emulated: 2e-2 synchronous, 5e-3 "
                    "asynchronous)", min=0.0)
    # onecycle: up to lr at 40% of training, then down to 0 (fast adversarial training's cyclic
    # schedule); piecewise: ×0.1 at 50% and again at 75%.
    lr_schedule: str = opt("onecycle", "learning-rate schedule", choices=("constant", "piecewise", "onecycle"))
    momentum: float = opt(0.9, "SGD momentum", min=0.0, max=1.0)
    weight_decay: float = opt(0.0, "weight decay", min=0.0)
    batch_size: int = opt(100, "examples per optimizer step, and per attacker push (N synchronous attackers: "
                          "⌈400 / N⌉ each)", min=1)
    # Averaging the weights along the way (Polyak; Gowal et al. 2020 for robust training) smooths
    # out the last steps' noise; the average is what the run delivers (psadv.averaging). Early on
    # the decay is capped, so a short run averages about its last ninth, whatever the decay.
    ema_decay: float = opt(0.0, "decay of an exponential moving average of the weights, which evaluation, "
                           "the checkpoints' model, psadv eval and export use (0 = off: the last weights)",
                           min=0.0)

    # --- budget: training stops at whichever is reached first ----------------------------------
    # With none of steps/epochs/time_budget given, training runs 10 epochs.
    steps: int = opt(0, "optimizer steps (= model versions) to train; 0 = no step budget", min=0)
    epochs: float = opt(0.0, "epochs of the training set to consume; 0 = no epoch budget", min=0.0)
    time_budget: float = opt(0.0, "seconds of training; 0 = no time budget", min=0.0)
    target_robust_acc: float = opt(0.0, "stop once periodic evaluation reaches this robust accuracy (0 = off)",
                                   min=0.0, max=1.0)

    # --- evaluation during training ------------------------------------------------------------
    # A run with a time budget and no --target-robust-acc evaluates only at the end by default
    # (make_config): periodic evaluation's time comes out of the budget (one process pauses
    # training for it), and a short one-step run would spend a share of its budget monitoring.
    eval_every: int = opt(500, "evaluate every N versions (0 = only at the end; default with --time-budget "
                          "and no --target-robust-acc: 0)", min=0)
    # A held-out slice of the test set: enough to see the curve, cheap enough to run often.
    eval_examples: int = opt(1000, "test examples used by periodic evaluation", min=1)
    # PGD by default: periodic evaluation runs often and must stay cheap next to training; the
    # stronger names (apgd-ce, apgd-t, square, strong, autoattack) grade robustness as psadv eval does.
    eval_attack: str = opt("pgd", "attack (or cascade) of periodic evaluation", choices="eval_attacks")
    eval_steps: int = opt(20, "PGD steps of periodic evaluation (and of its gate)", min=0)
    eval_restarts: int = opt(1, "PGD restarts of periodic evaluation (and of its gate)", min=1)
    # AutoAttack's standard budgets, as psadv eval's defaults.
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
    # With --push sync there is no staleness to emulate: one step on all N attackers' batches.
    emulate_attackers: int = opt(0, "single process: train with the staleness of N asynchronous attackers, or "
                                 "with --push sync on the N batches of a synchronous round (0 = off)", min=0)
    # A stale push's examples were adversarial for an older model; a PGD step against the current
    # one, continuing from them, makes them adversarial again: this is what keeps many attackers'
    # staleness from costing robustness (results/emulated-attackers-refinement.toml). It is server-side work
    # (a forward/backward and two forward passes per push), so it lowers the number of attackers
    # one server keeps up with.
    # It acts on stale pushes of examples only: off by default in gradients and sync mode and with
    # augmentation (the server does not see the attackers' augmented batches).
    refine_steps: int = opt(1, "PGD steps the trainer adds to each stale push of examples against the current "
                            "model, continuing from its examples (0 = off; under MPI and with --emulate-*; "
                            "the default 1 holds for --push examples and --emulate-staleness, other modes "
                            "have nothing to refine)", min=0)
    # The training attack's step is sized to walk from a random start in k steps; a stale push
    # already sits near the ball's boundary, and one FGSM-sized step (1.25ε, as in FGSM-RS) moves
    # it to where the current model's gradient points while keeping its other coordinates. Where
    # that lands somewhere weaker (a push barely stale is already near a maximum) the trainer keeps
    # the push as it was (psadv.attacks.refine): unguarded, such a step can overfit catastrophically,
    # as FGSM does.
    refine_step_ratio: float = opt(1.25, "step size of --refine-steps relative to ε (0 = the training "
                                   "attack's step size)", min=0.0)
    # The server's refinement is a forward/backward and two forward passes per push, about half of
    # its work per version, which caps the attackers one server keeps up with (n* = c_a / c_s). An
    # attacker can take the step instead, against the newest parameters it holds when its attack
    # ends: a little staler than the server's, and the server is left with the training step alone
    # (results/attackers-recipe.toml).
    refine_on: str = opt("server", "who refines stale pushes of examples: the server, against its current model, "
                         "or each attacker, against the newest parameters it holds when its attack ends",
                         choices=("server", "attackers"))

    # --- the parameter server (under MPI with 2+ ranks) ---------------------------------------
    # Synchronous by default: each attacker attacks its share of one batch against the current
    # version and pushes its gradient, the server averages them into one step. The server's work is
    # a sum per push, so attackers multiply PGD-5's speed (6.7× one attacker's at eight, n* ≈ 47
    # time-dilated, against n* = 1.6 for pushes of examples, which the server must train on and
    # refine), and there is no staleness: N attackers train what one process does at their shared
    # batch (SYNC_BATCH) (results/sync-data-parallel.toml).
    push: str = opt("sync", "what attackers push: sync = every attacker's gradient of one version, averaged "
                    "into one step; examples, gradients = asynchronous pushes of either, tagged with their "
                    "version", choices=tuple(PUSH_MODES))
    # The reference result's threshold (32 versions harmless, 64 pathological). Untreated, real
    # staleness of 34 versions on average cost 33 points of robustness and of 65 left 12.6%
    # (results/study-part2-staleness.toml); with the default refinement, 64 emulated attackers under
    # this threshold end at 88.7% while it rejects 52% of their pushes
    # (results/emulated-attackers-refinement.toml).
    max_staleness: int = opt(32, "reject pushes staler than this many versions", min=0)
    refresh_every: int = opt(4, "send parameters to attackers every N versions", min=1)
    # Measured with 2 attackers on 2 cores (results/max-in-flight.toml): 2 pushes in flight per attacker give a mean
    # staleness of ~7 versions, 1 gives ~2.4 at ~15% fewer examples/s (the attacker waits for the
    # server to take each push before it starts the next batch). With 2 the 15-epoch PGD-10 recipe missed
    # 89% robust accuracy in its 15 epochs, with 1 it reached it. Raise it where the network
    # round trip, not the attack, dominates an attacker's time.
    max_in_flight: int = opt(1, "pushes an attacker may have in flight (more: throughput, and staleness)",
                             min=1)
    lr_damping: bool = opt(False, "gradients mode: scale the learning rate by 1/max(1, staleness)")
    # N attackers make each gradient push about N versions stale; averaging K accepted pushes into
    # one optimizer step makes it about N/K steps stale, and divides the server's optimizer work per
    # push by K, which is what lets one server keep up with many attackers (results/attackers-recipe.toml).
    accumulate: int = opt(1, "gradients mode: accepted pushes averaged into one optimizer step (a K times "
                          "larger effective batch)", min=1)
    # DC-ASGD's first-order correction of a stale gradient, g + λ·g⊙g⊙(w_now − w_then)/√v (Zheng et
    # al. 2017, adaptive form with Adam's v): cheap elementwise work on the server, which keeps the
    # parameters of the versions it sent (design/staleness.md).
    delay_compensation: float = opt(0.0, "gradients mode: λ of delay compensation (DC-ASGD), which corrects a "
                                    "stale gradient for the weights it is applied to (0 = off)", min=0.0)
    wire_dtype: str = opt("float32", "dtype of adversarial examples on the wire", choices=("float32", "float16"))

    # --- run -----------------------------------------------------------------------------------
    # 31 bits: the seed is offset per rank and per batch, and every generator it feeds (torch's,
    # numpy's legacy one) must accept the sum.
    seed: int = opt(0, "random seed", min=0, max=MAX_SEED)
    run_dir: str = opt("", "run directory (default: runs/<date>-<time>)")
    log_every: int = opt(50, "one metrics row every N versions", min=1)
    checkpoint_every: int = opt(1000, "checkpoint every N versions (0 = only at the end)", min=0)
    keep_checkpoints: int = opt(3, "checkpoints kept in the run directory", min=1)
    device: str = opt("auto", "torch device: auto, cpu, cuda, cuda:N")
    # 0: all cores for one process; under MPI the cores are split between the ranks on a host.
    threads: int = opt(0, "torch threads per process (0 = automatic)", min=0, max=MAX_THREADS)
    # The training attack and step only: evaluation always runs in float32, so a graded number
    # never depends on it. bf16 pays where the hardware has bfloat16 arithmetic: on such a CPU it
    # ran 1.6x the versions of fp32 in a 60 s budget and ended more robust
    # (results/bf16-60s.toml). auto is resolved when a run starts, and config.json records what it became.
    precision: str = opt("auto", "arithmetic of the training attack and step: fp32, bf16 (bfloat16 autocast, "
                         "channels-last weights; evaluation stays fp32), or auto (bf16 on a CPU with "
                         "bfloat16 instructions, else fp32)", choices=("auto", "fp32", "bf16"))
    # metrics.jsonl is always written; trackers are optional extras, so none is on by default.
    log: str = opt("", "also send every metrics row to: comma-separated tensorboard, csv, wandb")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in fields(Config)}

# Per-dataset recipes: the defaults that differ from Config's for a dataset, applied to the fields
# neither the TOML file nor the command line gives (a resumed run keeps its checkpoint's values).
RECIPES: dict[str, dict] = {
    # Config's own defaults are the MNIST recipe: ε = 0.3 (Madry et al. 2018, the MNIST challenge).
    "mnist": {},
    # ε = 0.1, the Fashion-MNIST budget of Wong & Kolter 2018 ("Provable defenses against adversarial
    # examples via the convex outer adversarial polytope", ICML) and of later robustness benchmarks;
    # the rest of the MNIST recipe (net, Adam one-cycle) carries over to these 28x28 images. PGD-10
    # and a peak lr of 5e-3: results/fashion-mnist.toml was measured with them; PGD-5 and 1e-2
    # were measured on MNIST only.
    "fashion-mnist": {"eps": 0.1, "attack_steps": 10, "lr": 5e-3},
    # The fast-adversarial recipe of Wong, Rice & Kolter 2020 ("Fast is better than free", ICLR):
    # PreAct-ResNet-18, FGSM with a random start (step 1.25ε) at ε = 8/255 without an ε ramp, SGD
    # with momentum 0.9 and weight decay 5e-4, a cyclic learning rate peaking at 0.2 (onecycle),
    # batch 128, random crop (pad 4) + horizontal flip.
    "cifar10": {"model": "preact-resnet18", "eps": 8 / 255, "eps_ramp": 0.0, "attack": "fgsm-rs",
                "optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128,
                "augment": "crop-flip"},
}


# The peak learning rate of a run that trains on stale pushes (attackers under MPI, or emulated ones),
# unless a recipe or the user sets one: with eight emulated attackers 1e-2 kept 0.6 points less than
# 5e-3 under the strong cascade over four seeds (1.7 less on one, at most 0.13 more) and masked more on
# every seed (a larger step makes a stale push cost more), and every MPI measurement in results/
# trained with 5e-3 (results/lr-peak-eight-attackers.toml).
STALENESS_LR = 5e-3

# Synchronous attackers (real or emulated, N of them) by default share one batch of SYNC_BATCH
# examples, each attacking ⌈SYNC_BATCH / N⌉ a round, at the peak SYNC_LR: in 5 epochs this kept
# one process's robustness where a batch of 800 lost 5 points, and 2e-2 did better than 1e-2
# (results/sync-data-parallel.toml). A fixed batch keeps the recipe the same for every N; each
# attacker's share shrinks as N grows, until its fixed costs dominate (the scaling report's c_a).
SYNC_BATCH = 400
SYNC_LR = 2e-2


def recipe_defaults(name: str) -> str:
    """The per-dataset defaults of field ``name``, for --help: 'fashion-mnist: 0.1, cifar10: 0.0314'."""
    return ", ".join(f"{dataset}: {value:.3g}" if isinstance(value, float) else f"{dataset}: {value}"
                     for dataset, recipe in RECIPES.items() for key, value in recipe.items() if key == name)


def _choices(f) -> tuple[str, ...] | None:
    spec = f.metadata.get("choices")
    if spec is None or isinstance(spec, tuple):
        return spec
    # Registries are looked up lazily so this module imports nothing heavy.
    from .attacks import ATTACKS, THREATS
    from .attacks.suite import EVAL_ATTACKS
    from .augment import AUGMENTATIONS
    from .data import DATASETS, FILE_DATASETS

    return tuple({"datasets": (*DATASETS, *FILE_DATASETS), "attacks": ATTACKS, "norms": THREATS,
                  "augmentations": AUGMENTATIONS, "eval_attacks": EVAL_ATTACKS}[spec])


def choices_of(name: str) -> tuple[str, ...] | None:
    return _choices(FIELDS[name])


def parse_number(value, option: str) -> float:
    """A number, or a fraction such as ``8/255`` (ε and step sizes are published in 1/255 units),
    as a float; ConfigError, one line, for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    top, slash, bottom = text.partition("/")
    try:
        number = float(top) / float(bottom) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{option} must be a number or a fraction such as 8/255, got {text!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{option} must be a finite number, got {text!r}")
    return number


def parse_norm(value, option: str = "--norm") -> str:
    """A threat model's name as psadv spells it: ``Linf``/``LINF`` -> ``linf``, ``L2`` -> ``l2``;
    ConfigError, one line, for another."""
    from .attacks.threats import THREATS

    name = str(value).strip().lower()
    if name not in THREATS:
        raise ConfigError(f"{option}: unknown value {value!r}; choose one of: {', '.join(THREATS)} "
                          "(Linf and L2 also accepted)")
    return name


def _coerce(name: str, value, source: str):
    f = FIELDS[name]
    kind = f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float, "bool": bool}[f.type]
    where = f" in {source}" if source else ""
    if f.metadata.get("fraction") and isinstance(value, str):
        value = parse_number(value, f"{name}{where}")
    if f.metadata.get("fold_case") and isinstance(value, str):
        value = parse_norm(value, f"{name}{where}")
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


def parse_model_args(text: str) -> dict:
    """``--model-args`` as a dict: '' -> {}; anything but a JSON object is a ConfigError."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-args is not valid JSON ({exc.msg} at character {exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--model-args must be a JSON object of keyword arguments, got {text!r}")
    return value


def _check_model(cfg: Config) -> None:
    from .data import FILE_DATASETS
    from .models import MODELS, is_factory_ref

    if cfg.model not in MODELS and not is_factory_ref(cfg.model):
        raise ConfigError(f"--model: unknown value {cfg.model!r}; choose one of: {', '.join(MODELS)}, "
                          "or package.module:factory")
    if parse_model_args(cfg.model_args) and not is_factory_ref(cfg.model):
        raise ConfigError(f"--model-args is for a package.module:factory model; {cfg.model} takes its "
                          "arguments from the dataset")
    if cfg.data_md5 and cfg.dataset not in FILE_DATASETS:
        raise ConfigError(f"--data-md5 is for --dataset {' or '.join(FILE_DATASETS)}; {cfg.dataset}'s files "
                          "are checked against their published md5s")
    if cfg.data_md5 and not re.fullmatch(r"[0-9a-f]{32}", cfg.data_md5):
        raise ConfigError(f"--data-md5 must be 32 lower-case hex digits, got {cfg.data_md5!r}")


def check_eps(eps: float, norm: str, pixels: int | None, option: str = "--eps") -> None:
    """ε must fit the norm: at most 1 in L∞ (the whole pixel range), at most √pixels in L2 (the
    distance from an all-black to an all-white image; unchecked while ``pixels`` is unknown);
    ConfigError, one line, otherwise."""
    if not (math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"{option} must be a finite number >= 0, got {eps}")
    if norm == "linf" and eps > 1:
        raise ConfigError(f"{option} {eps:g} exceeds 1, the whole pixel range, for --norm linf "
                          "(budgets above 1 are L2 budgets: add --norm l2)")
    if norm == "l2" and pixels is not None and eps > math.sqrt(pixels):
        raise ConfigError(f"{option} {eps:g} exceeds sqrt({pixels}) = {math.sqrt(pixels):.4g}, the largest "
                          "L2 distance between two images of this dataset")


def check_device(spec: str) -> None:
    """The devices psadv runs on, by name (whether this machine has them is
    :func:`psadv.devices.pick_device`'s question); ConfigError, one line, otherwise."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


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
    _check_model(cfg)
    from .trackers import parse_trackers  # here: trackers imports metrics, which need not load with config

    parse_trackers(cfg.log)
    from .data import DATASETS

    # a file data set's shape is known once the file is read (at start-up), not here
    check_eps(cfg.eps, cfg.norm, math.prod(DATASETS[cfg.dataset].shape) if cfg.dataset in DATASETS else None)
    if cfg.clean_share >= 1:
        raise ConfigError(f"--clean-share must be below 1 (at 1 nothing is attacked), got {cfg.clean_share:g}")
    if cfg.ema_decay >= 1:
        raise ConfigError("--ema-decay must be below 1 (at 1 the average never leaves the initial "
                          f"weights), got {cfg.ema_decay:g}")
    if cfg.emulate_attackers and cfg.emulate_staleness:
        raise ConfigError("--emulate-attackers and --emulate-staleness exclude each other")
    if cfg.emulate_staleness and cfg.refine_on == "attackers" and cfg.refine_steps:
        raise ConfigError("--refine-on attackers needs attackers, real or emulated (--emulate-attackers N); "
                          "--emulate-staleness has none")
    if cfg.reuse_perturbations and cfg.augment != "none":
        # a remembered perturbation belongs to the crop and flip it was made for
        raise ConfigError("--reuse-perturbations needs --augment none (a perturbation fits only the view it was made for)")
    check_device(cfg.device)
    # Options that another one makes meaningless: refused, so a run never silently does less than
    # its config.json says.
    if cfg.reuse_perturbations and (cfg.attack == "none" or cfg.eps == 0):
        raise ConfigError("--reuse-perturbations needs a training attack (it keeps each example's perturbation)")
    if cfg.attack_steps_schedule and cfg.attack != "pgd":
        raise ConfigError(f"--attack-steps-schedule is for --attack pgd; {cfg.attack} takes a fixed number of steps")
    if cfg.target_robust_acc and cfg.eval_every == 0:
        raise ConfigError("--target-robust-acc needs periodic evaluation to notice it: --eval-every N > 0")
    return cfg


BUDGETS = ("steps", "epochs", "time_budget")


def check_given(cfg: Config, given: set[str]) -> None:
    """Refuse an option the user gave (``given``: command line, TOML file or ``psadv.train``) that the
    rest of ``cfg`` makes meaningless: it would be silently ignored, and the run would do less than
    its config.json says. ConfigError, one line, naming the option and why. Recipe values and defaults are
    never refused (they are not the user's choice)."""
    from .attacks import ATTACKS

    kind = ATTACKS[cfg.attack]
    attacking = cfg.attack != "none" and cfg.eps > 0
    steps_text = f"{kind.fixed_steps} step{'s' if kind.fixed_steps != 1 else ''}"
    rules = {  # option: (meaningful here?, why not)
        "momentum": (cfg.optimizer == "sgd", f"is SGD's; --optimizer {cfg.optimizer} has none"),
        "attack_steps": (kind.fixed_steps is None, f"is PGD's; --attack {cfg.attack} always takes {steps_text}"),
        "attack_step_ratio": (attacking, "needs a training attack (--attack other than none, --eps > 0)"),
        "attack_restarts": (attacking and kind.random_start,
                            f"needs a training attack with a random start; --attack {cfg.attack} has none"),
        "refine_step_ratio": (cfg.refine_steps > 0, "sizes --refine-steps, which is 0 here"),
        "refine_on": (cfg.refine_steps > 0, "places --refine-steps, which is 0 here"),
        # a push mode's own options (psadv.pushmodes), at their default with any other mode
        **{name: (name in PUSH_MODES[cfg.push].own_options or getattr(cfg, name) == FIELDS[name].default,
                  "is for " + " or ".join(f"--push {mode.name}" for mode in owners(name))) for name in OWNED_OPTIONS},
    }
    for name, (meaningful, why) in rules.items():
        if name in given and not meaningful:
            raise ConfigError(f"--{name.replace('_', '-')} {why}: leave it out")
    if given & set(BUDGETS) and not any(getattr(cfg, name) for name in BUDGETS):
        raise ConfigError("--steps, --epochs and --time-budget are all 0, which leaves the run no budget: give "
                          "one of them > 0, or none for the default of 10 epochs")


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
        if name in values:  # eps-ramp and eps_ramp: which one was meant?
            raise ConfigError(f"config key {key!r} in {path} repeats {name!r} (dashes and underscores are the same key)")
        values[name] = _coerce(name, value, str(path))
    return values


def check_recorded(values: dict, required: tuple[str, ...]) -> None:
    """Check a config that a file recorded (a checkpoint's): the ``required`` keys are there and
    among their field's choices, and every known key holds its field's type; ConfigError names the
    first that does not. Unknown keys pass: a reader needs only what it reads."""
    for name in required:
        if name not in values:
            raise ConfigError(f"its config has no {name!r}")
    for name, value in values.items():
        if name in FIELDS:
            value = _coerce(name, value, "its config")
            choices = choices_of(name) if name in required else None
            if choices is not None and value not in choices:
                raise ConfigError(f"its config has {name} {value!r}, which this psadv does not know "
                                  f"(it knows {', '.join(choices)})")


def make_config(*layers: dict, source: str = "", attackers: int = 0, given=None) -> Config:
    """Defaults, overridden by each layer in turn (e.g. file values, then command-line values).

    ``attackers``: the MPI job's attackers (0 in one process), for the defaults that depend on them.
    ``given``: the options the user chose, checked by :func:`check_given` (default: every layer's
    keys; a resume passes only what was asked this time, not the checkpoint's config).
    """
    from .data import FILE_DATASETS

    merged: dict = {}
    for layer in layers:
        for name, value in layer.items():
            if name not in FIELDS:
                raise ConfigError(f"unknown config key {name!r}{' in ' + source if source else ''}")
            merged[name] = _coerce(name, value, source)
    for name, value in RECIPES.get(merged.get("dataset", FIELDS["dataset"].default), {}).items():
        merged.setdefault(name, value)
    push = PUSH_MODES.get(merged.get("push", FIELDS["push"].default))  # None: validate refuses it below
    pushers = attackers or int(merged.get("emulate_attackers") or 0)  # real or emulated attackers
    if pushers and push is not None and push.synchronous:  # one batch, shared (see SYNC_BATCH)
        merged.setdefault("batch_size", math.ceil(SYNC_BATCH / pushers))
        merged.setdefault("lr", SYNC_LR)
    elif pushers or merged.get("emulate_staleness"):  # stale pushes
        merged.setdefault("lr", STALENESS_LR)
    # --emulate-staleness lags an attacker of examples whatever --push says; otherwise the push mode
    # decides, also for one process, whose config a resume under MPI takes over
    examples = merged.get("emulate_staleness") or (push is not None and push.sends_examples)
    if not examples or merged.get("augment", FIELDS["augment"].default) != "none":
        merged.setdefault("refine_steps", 0)  # nothing to refine (see Config.refine_steps), unless asked
    if merged.get("dataset") in FILE_DATASETS and "eps" not in merged:
        # MNIST's 0.3 would be a silent guess: the budget belongs to the data, which psadv does not know
        raise ConfigError(f"--dataset {merged['dataset']} has no recipe of defaults, so no ε of its own: give "
                          "--eps (e.g. 8/255 for CIFAR-like images, 0.3 for MNIST-like digits)")
    if merged.get("time_budget") and not merged.get("target_robust_acc"):
        merged.setdefault("eval_every", 0)  # the budget buys training, not monitoring (see Config.eval_every)
    cfg = validate(Config(**merged))
    check_given(cfg, {name for layer in layers for name in layer} if given is None else set(given))
    return cfg
