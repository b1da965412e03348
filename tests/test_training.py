"""Single-process trainer: run directory, metrics, checkpoints, exact resume, staleness emulation."""

import json

import h5py
import numpy as np
import pytest
import torch

from psadv import schedules
from psadv.checkpoint import IncompatibleCheckpoint, load_checkpoint
from psadv.config import Config, make_config, read_toml
from psadv.console import adversary_line
from psadv.errors import ConfigError, UsageError
from psadv.models import build_model, flat_state, model_args_for
from psadv.rundir import read_metrics
from psadv.runsetup import resolve_run
from psadv.single import StaleRing, train_single

SMALL = dict(batch_size=50, attack_steps=2, eval_examples=100, eval_steps=2, eval_every=10, log_every=5,
             threads=1)


def run(tmp_path, mnist_dir, name="run", resume=None, overwrite=False, **options):
    recipe = {} if resume else SMALL  # a resumed run takes its recipe from the checkpoint
    if options.get("attack", "pgd") != "pgd":  # --attack-steps is PGD's, refused with another attack
        recipe = {k: v for k, v in recipe.items() if k != "attack_steps"}
    overrides = {**recipe, "data_dir": str(mnist_dir), "run_dir": str(tmp_path / name), **options}
    setup = resolve_run(overrides, resume=resume, overwrite=overwrite)
    return train_single(setup, show_progress=False)


def weights(path):
    with h5py.File(path, "r") as f:
        return {k: f["model"][k][()] for k in f["model"]}


def test_small_run_writes_config_metrics_checkpoint_summary(tmp_path, mnist_dir):
    summary = run(tmp_path, mnist_dir, steps=20, eps_ramp=0.5)
    run_dir = tmp_path / "run"
    assert summary["version"] == 20 and summary["stop_reason"] == "version budget"
    assert summary["examples_seen"] == 20 * 50
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["version"] == 20
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model_name"] == "mnist-small" and config["config"]["steps"] == 20
    rows = read_metrics(run_dir / "metrics.jsonl")
    kinds = [r["kind"] for r in rows]
    assert kinds.count("train") == 4 and kinds.count("eval") == 2 and kinds[-1] == "end"
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert all(r["examples_per_s"] > 0 and "time" in r for r in train_rows)
    assert train_rows[0]["eps"] < train_rows[-1]["eps"] == pytest.approx(0.3)  # the ε ramp
    ckpt = load_checkpoint(run_dir / "checkpoints" / "ckpt-00000020.h5")
    assert ckpt.state["version"] == 20 and ckpt.model_name == "mnist-small"
    assert ckpt.config["attack_steps"] == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_continues_exactly(tmp_path, mnist_dir, precision):
    """Stopping at version 8 and resuming gives bit-identical weights at 16 to a straight run
    (with bf16, through channels-last weights written to and read from the checkpoint)."""
    recipe = dict(steps=16, lr_schedule="onecycle", optimizer="sgd", lr=0.05, eval_every=0, precision=precision)
    run(tmp_path, mnist_dir, name="straight", checkpoint_every=0, **recipe)
    run(tmp_path, mnist_dir, name="halves", checkpoint_every=8, keep_checkpoints=5, **recipe)
    mid = tmp_path / "halves" / "checkpoints" / "ckpt-00000008.h5"
    assert load_checkpoint(mid).state["version"] == 8
    resumed = run(tmp_path, mnist_dir, name="resumed", resume=str(mid))
    assert resumed["version"] == 16
    a = weights(tmp_path / "straight" / "checkpoints" / "ckpt-00000016.h5")
    b = weights(tmp_path / "resumed" / "checkpoints" / "ckpt-00000016.h5")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_covers_the_training_arithmetic_and_never_evaluation(tmp_path, mnist_dir, precision):
    """bf16: every convolution of the training attack and step in bfloat16, every one of the
    periodic and final evaluations in float32; fp32: float32 throughout."""
    from fault_entry import ConvDtypes

    recorder = ConvDtypes().install()
    try:
        summary = run(tmp_path, mnist_dir, steps=6, eval_every=3, eps_ramp=0.0, precision=precision)
    finally:
        recorder.remove()
    assert summary["version"] == 6
    counts = recorder.counts
    assert counts["eval", "float32"] > 0 and counts["eval", "bfloat16"] == 0
    trained = "bfloat16" if precision == "bf16" else "float32"
    other = "float32" if precision == "bf16" else "bfloat16"
    # six versions, each PGD-2's two forward passes and the step's, of two convolutions each
    assert counts["train", trained] == 6 * 3 * 2 and counts["train", other] == 0
    line = adversary_line(make_config({"precision": precision}))
    assert line.endswith(", bfloat16 arithmetic") == (precision == "bf16")


def test_bf16_layout_keeps_values_and_the_warning_names_emulated_bf16(tmp_path, monkeypatch):
    from psadv import devices

    torch.manual_seed(0)
    model = build_model("mnist-small", in_channels=1, num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conv = model[2]  # 16 -> 32 channels (the first conv's one input channel is both layouts at once)
    assert devices.training_layout(model, "fp32") is model and conv.weight.is_contiguous()
    devices.training_layout(model, "bf16")
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    cpu = torch.device("cpu")
    for flags, native in [("fpu sse avx512f avx2", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16", True),
                          ("fp asimd bf16 sve", True)]:
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(devices, "CPUINFO", str(tmp_path / "cpuinfo"))
        assert devices.native_bf16(cpu) is native
        assert devices.precision_warning("fp32", cpu) is None
        warning = devices.precision_warning("bf16", cpu)
        assert (warning is None) is native
        if not native:
            assert warning.startswith("psadv: warning: --precision bf16 on cpu") and "slower" in warning
    monkeypatch.setattr(devices, "CPUINFO", str(tmp_path / "absent"))
    assert devices.native_bf16(cpu) is False


@pytest.mark.parametrize("flags,resolved", [("avx512f avx512_bf16 amx_bf16", "bf16"), ("avx2 avx512f", "fp32")])
def test_auto_precision_is_resolved_when_the_run_starts_and_recorded(tmp_path, mnist_dir, monkeypatch, flags,
                                                                     resolved):
    from psadv import devices

    (tmp_path / "cpuinfo").write_text(f"flags\t\t: fpu {flags}\n")
    monkeypatch.setattr(devices, "CPUINFO", str(tmp_path / "cpuinfo"))
    run(tmp_path, mnist_dir, steps=2, eval_every=0, device="cpu")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["precision"] == resolved
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000002.h5"
    assert load_checkpoint(ckpt).config["precision"] == resolved
    # a resume keeps the run's arithmetic; a checkpoint from before --precision trained in float32
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu avx512_bf16\n")
    assert resolve_run({"steps": 4}, resume=str(ckpt), prepare_dir=False).cfg.precision == resolved
    with h5py.File(ckpt, "r+") as f:  # the checkpoint's copy of the config as psadv 0.1 wrote it
        f.attrs["config"] = json.dumps({k: v for k, v in json.loads(f.attrs["config"]).items() if k != "precision"})
    assert resolve_run({"steps": 4}, resume=str(ckpt), prepare_dir=False).cfg.precision == "fp32"


def test_a_gpu_device_makes_cudnn_deterministic(monkeypatch):
    """Exact resume on a GPU needs deterministic cuDNN kernels; the CPU leaves the flags alone."""
    from psadv.devices import pick_device

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    assert pick_device("cpu").type == "cpu"
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert str(pick_device("auto", local_rank=3)) == "cuda:1"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_resume_from_run_dir_appends_and_keeps_counter(tmp_path, mnist_dir):
    run(tmp_path, mnist_dir, steps=10, checkpoint_every=0)
    summary = run(tmp_path, mnist_dir, resume=str(tmp_path / "run"), steps=15)
    assert summary["version"] == 15
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["kind"] for r in rows].count("end") == 2
    versions = [r["version"] for r in rows if r["kind"] == "train"]
    assert versions == sorted(versions) and versions[-1] == 15


def test_emulated_staleness_resumes_exactly(tmp_path, mnist_dir):
    common = dict(steps=12, emulate_staleness=4, eval_every=0, keep_checkpoints=5)
    run(tmp_path, mnist_dir, name="straight", checkpoint_every=0, **common)
    run(tmp_path, mnist_dir, name="halves", checkpoint_every=6, **common)
    resumed = run(tmp_path, mnist_dir, name="resumed",
                  resume=str(tmp_path / "halves" / "checkpoints" / "ckpt-00000006.h5"))
    assert resumed["version"] == 12
    a = weights(tmp_path / "straight" / "checkpoints" / "ckpt-00000012.h5")
    b = weights(tmp_path / "resumed" / "checkpoints" / "ckpt-00000012.h5")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    rows = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["staleness"] for r in rows] == [4, 4]  # min(version, S) at versions 5 and 10


def test_reused_perturbations_are_checkpointed_and_resume_exactly(tmp_path, mnist_dir):
    common = dict(steps=12, eval_every=0, keep_checkpoints=5, reuse_perturbations=True)
    run(tmp_path, mnist_dir, name="straight", checkpoint_every=0, **common)
    run(tmp_path, mnist_dir, name="halves", checkpoint_every=6, **common)
    half = load_checkpoint(tmp_path / "halves" / "checkpoints" / "ckpt-00000006.h5")
    assert half.extra["perturbations_seen"].sum() == 6 * 50  # every example attacked so far
    run(tmp_path, mnist_dir, name="resumed", resume=str(half.path))
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "ckpt-00000012.h5")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "ckpt-00000012.h5")
    assert a.extra["perturbations_seen"].sum() == 12 * 50
    for name in ("perturbations", "perturbations_seen"):
        np.testing.assert_array_equal(a.extra[name], b.extra[name])
    for k in a.model_state:
        torch.testing.assert_close(a.model_state[k], b.model_state[k], rtol=0, atol=0)
    assert np.abs(a.extra["perturbations"].astype(np.float32)).max() <= 0.3 + 1e-3


def test_ema_weight_forgets_the_initial_weights_then_settles_at_the_decay():
    from psadv.averaging import ema_weight

    assert ema_weight(1, 0.999) == pytest.approx(1 - 2 / 11)  # the first versions count for most
    weights_ = [ema_weight(v, 0.99) for v in range(1, 2000)]
    assert all(a >= b for a, b in zip(weights_, weights_[1:]))
    assert weights_[-1] == pytest.approx(0.01) and ema_weight(50, 0.5) == pytest.approx(0.5)


def test_the_weight_average_is_what_the_run_delivers_and_resumes_exactly(tmp_path, mnist_dir):
    """--ema-decay: the checkpoints' model/ is the average of the live weights, folded version by
    version (recomputed here from every checkpoint's live weights); the final evaluation grades it;
    a resume continues the average and the live weights bit for bit; off, model/ is the live model."""
    from psadv.averaging import LIVE_WEIGHTS, ema_weight
    from psadv.models import load_flat_state_

    recipe = dict(steps=20, eval_every=0, ema_decay=0.8, eval_steps=0, eval_examples=1000, eps=0.1, eps_ramp=0.0)
    run(tmp_path, mnist_dir, name="every", checkpoint_every=1, keep_checkpoints=20, **recipe)
    torch.manual_seed(0)
    average = flat_state(build_model("mnist-small", in_channels=1, num_classes=10))  # the initial weights
    for v in range(1, 21):
        ckpt = load_checkpoint(tmp_path / "every" / "checkpoints" / f"ckpt-{v:08d}.h5")
        live = torch.from_numpy(ckpt.extra[LIVE_WEIGHTS])
        average = average + ema_weight(v, 0.8) * (live - average)
    model = build_model("mnist-small", in_channels=1, num_classes=10)
    model.load_state_dict(ckpt.model_state)
    torch.testing.assert_close(flat_state(model), average)
    assert not torch.allclose(average, live, atol=1e-3)  # the average is not the last weights
    # the final evaluation (clean, 1,000 test images) is the average's
    from psadv.data import load_dataset

    test = load_dataset("mnist", "test", str(mnist_dir))
    with torch.no_grad():
        clean = (model(torch.tensor(test.x[:1000])).argmax(1) == torch.tensor(test.y[:1000])).float().mean().item()
    summary = json.loads((tmp_path / "every" / "summary.json").read_text())
    assert summary["last_eval"]["clean_acc"] == pytest.approx(clean)
    load_flat_state_(model, live)
    with torch.no_grad():
        live_clean = (model(torch.tensor(test.x[:1000])).argmax(1) == torch.tensor(test.y[:1000])).float().mean().item()
    assert live_clean != pytest.approx(clean)  # so the comparison above could fail

    mid = tmp_path / "every" / "checkpoints" / "ckpt-00000010.h5"
    run(tmp_path, mnist_dir, name="resumed", resume=str(mid))
    a = ckpt
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "ckpt-00000020.h5")
    np.testing.assert_array_equal(a.extra[LIVE_WEIGHTS], b.extra[LIVE_WEIGHTS])
    for k in a.model_state:
        torch.testing.assert_close(a.model_state[k], b.model_state[k], rtol=0, atol=0)
    # without averaging there are no live weights apart: model/ is the live model
    run(tmp_path, mnist_dir, name="plain", checkpoint_every=0, **{**recipe, "ema_decay": 0.0})
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "ckpt-00000020.h5")
    assert LIVE_WEIGHTS not in plain.extra
    model.load_state_dict(plain.model_state)
    np.testing.assert_array_equal(flat_state(model).numpy(), ckpt.extra[LIVE_WEIGHTS])


def test_averaging_can_start_or_stop_at_a_resume(tmp_path, mnist_dir):
    """A checkpoint written without --ema-decay resumes with it (the average starts at its weights);
    one written with it resumes without it from its live weights."""
    from psadv.averaging import LIVE_WEIGHTS

    run(tmp_path, mnist_dir, name="plain", steps=4, eval_every=0, checkpoint_every=0)
    plain = load_checkpoint(tmp_path / "plain" / "checkpoints" / "ckpt-00000004.h5")
    assert plain.config["ema_decay"] == 0.0
    run(tmp_path, mnist_dir, name="started", resume=str(plain.path), steps=6, ema_decay=0.5)
    started = load_checkpoint(tmp_path / "started" / "checkpoints" / "ckpt-00000006.h5")
    assert started.config["ema_decay"] == 0.5 and LIVE_WEIGHTS in started.extra
    run(tmp_path, mnist_dir, name="stopped", resume=str(started.path), steps=8, ema_decay=0.0)
    run(tmp_path, mnist_dir, name="averaged", resume=str(started.path), steps=8)
    stopped = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "ckpt-00000008.h5")
    averaged = load_checkpoint(tmp_path / "averaged" / "checkpoints" / "ckpt-00000008.h5")
    assert LIVE_WEIGHTS not in stopped.extra
    model = build_model("mnist-small", in_channels=1, num_classes=10)
    model.load_state_dict(stopped.model_state)  # the live weights trained on from the same ones
    np.testing.assert_array_equal(flat_state(model).numpy(), averaged.extra[LIVE_WEIGHTS])


def test_reused_perturbations_refuse_augmentation():
    with pytest.raises(ConfigError, match="--reuse-perturbations needs --augment none"):
        make_config({"reuse_perturbations": True, "augment": "crop-flip"})


def test_evaluation_frequency_does_not_change_training(tmp_path, mnist_dir):
    run(tmp_path, mnist_dir, name="often", steps=10, eval_every=2)
    run(tmp_path, mnist_dir, name="never", steps=10, eval_every=0)
    a = weights(tmp_path / "often" / "checkpoints" / "ckpt-00000010.h5")
    b = weights(tmp_path / "never" / "checkpoints" / "ckpt-00000010.h5")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_emulated_staleness_changes_training(tmp_path, mnist_dir):
    fresh = run(tmp_path, mnist_dir, name="fresh", steps=10, eval_every=0)
    stale = run(tmp_path, mnist_dir, name="stale", steps=10, eval_every=0, emulate_staleness=8)
    assert fresh["version"] == stale["version"] == 10
    a = weights(tmp_path / "fresh" / "checkpoints" / "ckpt-00000010.h5")
    b = weights(tmp_path / "stale" / "checkpoints" / "ckpt-00000010.h5")
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_stale_ring_returns_state_from_s_versions_ago():
    model = build_model("mnist-small", in_channels=1, num_classes=10)
    ring = StaleRing(3)
    snapshots = []
    for v in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ring.push(model)
        snapshots.append(flat_state(model))
        assert ring.staleness() == min(v, 3)
        assert torch.equal(ring.oldest(), snapshots[max(0, v - 3)])
    restored = StaleRing(3)
    restored.load_array(ring.to_array())
    assert torch.equal(restored.oldest(), ring.oldest()) and restored.staleness() == 3


def test_target_robust_accuracy_stops_early(tmp_path, mnist_dir):
    summary = run(tmp_path, mnist_dir, steps=200, eval_every=5, target_robust_acc=0.05, eps=0.01)
    assert summary["stop_reason"] == "robust-accuracy target"
    assert summary["version"] < 200 and summary["time_to_target"] is not None


def test_time_budget_stops(tmp_path, mnist_dir):
    summary = run(tmp_path, mnist_dir, time_budget=2.0, eval_every=0)
    assert summary["stop_reason"] == "time budget"
    assert 0 < summary["version"] and summary["elapsed"] >= 2.0


def test_a_time_budget_buys_training_not_monitoring():
    # periodic evaluation would pause training inside the budget: off unless asked for or needed
    assert make_config({"time_budget": 60}).eval_every == 0
    assert make_config({"time_budget": 60, "target_robust_acc": 0.9}).eval_every == 500  # it stops the run
    assert make_config({"time_budget": 60}, {"eval_every": 300}).eval_every == 300
    assert make_config({"steps": 60}).eval_every == make_config({}).eval_every == 500


def test_the_start_up_line_names_the_adversary():
    assert adversary_line(make_config({})) == "adversary: PGD-5 linf eps=0.3"
    assert adversary_line(make_config({"attack": "fgsm-rs", "reuse_perturbations": True})) == \
        "adversary: FGSM-RS linf eps=0.3, reused perturbations"
    assert adversary_line(make_config({"attack": "fgsm-rs", "attack_step_ratio": 1.0})) == \
        "adversary: FGSM-RS linf eps=0.3 step=1ε"  # a step other than the attack's published one is named
    assert adversary_line(make_config({"attack_steps_schedule": "2,5@0.5", "attack_restarts": 2})) == \
        "adversary: PGD (steps 2,5@0.5) linf eps=0.3 x2 restarts"
    assert adversary_line(make_config({"dataset": "fashion-mnist"})) == "adversary: PGD-10 linf eps=0.1"
    assert adversary_line(make_config({"clean_share": 0.25})) == \
        "adversary: PGD-5 linf eps=0.3, 25% of each batch clean"
    assert adversary_line(make_config({"eps": 0})) == "adversary: none (clean training)"


def test_existing_run_dir_is_not_clobbered(tmp_path, mnist_dir):
    run(tmp_path, mnist_dir, steps=5)
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(UsageError, match="already holds a run"):
        run(tmp_path, mnist_dir, steps=5)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    run(tmp_path, mnist_dir, steps=3, overwrite=True)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["version"] == 3
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("*.h5")] == ["ckpt-00000003.h5"]


def test_resume_with_another_model_is_refused(tmp_path, mnist_dir):
    run(tmp_path, mnist_dir, steps=5)
    with pytest.raises(IncompatibleCheckpoint, match="mnist-small"):
        run(tmp_path, mnist_dir, resume=str(tmp_path / "run"), model="mnist-madry")


# --- configuration and schedules ----------------------------------------------------------------

def test_config_layers_and_unknown_keys(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('eps = 0.1\nattack-steps = 3\nmodel = "mnist-madry"\n')
    values = read_toml(toml)
    cfg = make_config(values, {"eps": 0.2})
    assert (cfg.eps, cfg.attack_steps, cfg.model) == (0.2, 3, "mnist-madry")
    toml.write_text("epsilon = 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'epsilon'"):
        read_toml(toml)
    toml.write_text('eps-ramp = 0.1\neps_ramp = 0.3\n')
    with pytest.raises(ConfigError, match="repeats 'eps_ramp'"):
        read_toml(toml)
    toml.write_text('eps = "big"\n')
    with pytest.raises(ConfigError, match="eps"):
        read_toml(toml)
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")


@pytest.mark.parametrize("values, message", [
    ({"eps": -0.1}, "--eps"), ({"eps": 1.5}, "--eps"), ({"steps": -1}, "--steps"),
    ({"batch_size": 0}, "--batch-size"), ({"model": "resnet9000"}, "--model"),
    ({"attack": "bim"}, "--attack"), ({"optimizer": "lbfgs"}, "--optimizer"),
    ({"attack_steps_schedule": "5@0.2"}, "schedule"), ({"attack_steps_schedule": "1,5@0.6,10@0.3"}, "schedule"),
    ({"device": "tpu"}, "--device"), ({"ema_decay": 1.0}, "--ema-decay must be below 1"),
    ({"ema_decay": -0.5}, "--ema-decay"), ({"device": "cuda:x"}, "--device"), ({"device": "cudafoo"}, "--device"),
    ({"seed": 2**31}, "--seed must be <="), ({"threads": 10**12}, "--threads must be <="),
    ({"attack": "none", "reuse_perturbations": True}, "--reuse-perturbations needs a training attack"),
    ({"eps": 0.0, "reuse_perturbations": True}, "--reuse-perturbations needs a training attack"),
    ({"attack": "fgsm", "attack_steps_schedule": "2,5@0.3"}, "is for --attack pgd"),
    ({"target_robust_acc": 0.9, "eval_every": 0}, "--target-robust-acc needs periodic evaluation"),
    # given, and ignored by the rest of the config
    ({"optimizer": "adam", "momentum": 0.5}, "--momentum is SGD's; --optimizer adam has none"),
    ({"attack": "fgsm", "attack_steps": 7}, "--attack-steps is PGD's; --attack fgsm always takes 1 step:"),
    ({"attack": "none", "attack_steps": 7}, "--attack none always takes 0 steps"),
    ({"eps": 0.0, "attack_step_ratio": 1.0}, "--attack-step-ratio needs a training attack"),
    ({"attack": "fgsm", "attack_restarts": 3}, "--attack-restarts needs .* random start; --attack fgsm has none"),
    ({"refine_steps": 0, "refine_step_ratio": 1.0}, "--refine-step-ratio sizes --refine-steps, which is 0"),
    ({"lr_damping": True}, "--lr-damping is for --push gradients"),
    ({"steps": 0, "epochs": 0.0}, "all 0, which leaves the run no budget"),
])
def test_config_validation(values, message):
    with pytest.raises(ConfigError, match=message):
        make_config(values)


@pytest.mark.parametrize("values", [
    {"optimizer": "sgd", "momentum": 0.5}, {"attack": "pgd", "attack_steps": 7},
    {"attack": "fgsm-rs", "attack_restarts": 2}, {"push": "gradients", "lr_damping": True},
    {"lr_damping": False}, {"time_budget": 30.0, "epochs": 0.0},
    {"dataset": "cifar10"},  # its recipe's momentum comes with its SGD
    {"dataset": "fashion-mnist", "attack": "fgsm-rs"},  # the recipe's PGD-10 is not the user's
])
def test_options_the_config_uses_and_recipe_values_are_not_refused(values):
    make_config(values)


def test_a_resume_is_refused_only_what_it_asks(mnist_dir, tmp_path):
    run(tmp_path, mnist_dir, "a", steps=2, attack="fgsm")
    # the checkpoint's config holds attack_steps and momentum; asking nothing new is fine
    assert resolve_run({}, resume=str(tmp_path / "a"), prepare_dir=False).cfg.attack == "fgsm"
    with pytest.raises(ConfigError, match="--attack-steps is PGD's"):
        resolve_run({"attack_steps": 7}, resume=str(tmp_path / "a"), prepare_dir=False)


def test_model_and_dataset_shapes_must_fit_and_the_error_names_models_that_do():
    assert model_args_for("mnist-small", (1, 28, 28), 10) == {"in_channels": 1, "num_classes": 10}
    with pytest.raises(ConfigError, match=r"model preact-resnet18 expects 3x32x32 inputs, but the dataset has "
                                          r"1x28x28; models for 1x28x28 inputs: mnist-small, mnist-madry$"):
        model_args_for("preact-resnet18", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match=r"has 3x28x28$"):  # no model fits: no hint
        model_args_for("mnist-small", (3, 28, 28), 10)


def test_schedules_are_pure_functions_of_progress():
    cfg = Config(lr=1.0, lr_schedule="onecycle", eps=0.3, eps_ramp=0.5, attack_steps=10,
                 attack_steps_schedule="2,5@0.3,10@0.6")
    assert schedules.lr_at(0.0, cfg) == 0.0 and schedules.lr_at(0.4, cfg) == pytest.approx(1.0)
    assert schedules.lr_at(1.0, cfg) == 0.0 and schedules.lr_at(0.7, cfg) == pytest.approx(0.5)
    cfg.lr_schedule = "piecewise"
    assert [schedules.lr_at(p, cfg) for p in (0.1, 0.6, 0.9)] == pytest.approx([1.0, 0.1, 0.01])
    assert schedules.eps_at(0.25, cfg) == pytest.approx(0.15) and schedules.eps_at(0.9, cfg) == 0.3
    adversary = schedules.AttackSchedule(cfg)
    assert [adversary.steps_at(p) for p in (0.0, 0.3, 0.59, 0.6)] == [2, 5, 5, 10]
    attack = adversary.at(0.25)
    assert attack.eps == pytest.approx(0.15) and attack.effective_steps == 2
    assert attack.effective_step_size == pytest.approx(2.5 * 0.15 / 2)
    cfg.attack_step_ratio = 0.1
    assert schedules.AttackSchedule(cfg).at(0.8).effective_step_size == pytest.approx(0.03)


def test_budget_and_progress():
    cfg = Config()
    assert schedules.total_versions(cfg, 600) == 6000  # 10 epochs by default
    cfg.steps, cfg.epochs = 500, 2
    assert schedules.total_versions(cfg, 600) == 500
    cfg.steps, cfg.epochs, cfg.time_budget = 0, 0, 60
    assert schedules.total_versions(cfg, 600) == 0
    assert schedules.progress(100, 30.0, 0, 60) == 0.5
    assert schedules.progress(300, 30.0, 400, 60) == 0.75
    assert schedules.progress(900, 90.0, 400, 60) == 1.0


@pytest.mark.parametrize("stale", [{}, {"emulate_staleness": 2, "refine_steps": 1}])
def test_a_clean_share_trains_on_batches_whose_last_share_is_clean(tmp_path, mnist_dir, monkeypatch, stale):
    """--clean-share 0.2: every step sees the whole batch, its last fifth exactly as drawn and the rest
    attacked inside the ε-ball, also after the trainer refines a stale batch (as the MPI server does);
    the run's config keeps the share, and 1 is refused."""
    from psadv.training import Trainer
    seen = []
    step = Trainer.step

    def spy(self, x_adv, y, clean=None):
        seen.append((x_adv.clone(), self.training_attack()))
        return step(self, x_adv, y, clean=clean)

    perturbed = []
    import psadv.single
    original = psadv.single.perturb

    def remember(model, x, y, attack, start=None):
        perturbed.append(x.clone())
        return original(model, x, y, attack, start=start)

    monkeypatch.setattr(Trainer, "step", spy)
    monkeypatch.setattr(psadv.single, "perturb", remember)
    summary = run(tmp_path, mnist_dir, steps=6, eval_every=0, eps_ramp=0.0, clean_share=0.2, **stale)
    assert summary["version"] == 6 and summary["examples_seen"] == 6 * 50
    assert len(seen) == len(perturbed) == 6
    for (x_adv, attack), x in zip(seen, perturbed):
        assert x_adv.shape == x.shape and attack.clean_share == 0.2
        assert torch.equal(x_adv[40:], x[40:])  # the last 10 of 50, as drawn
        moved = (x_adv[:40] - x[:40]).flatten(1).abs().amax(1)
        assert (moved > 0).all() and moved.max() <= 0.3 + 1e-6
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["clean_share"] == 0.2
    with pytest.raises(ConfigError, match="--clean-share must be below 1"):
        make_config({"clean_share": 1.0})
