"""Gradient pushes made staleness-tolerant: accumulation of K pushes per step and delay compensation.

The pure pieces (psadv.staleness) are driven directly; psadv.gradpush.GradientPushes with a stand-in
trainer; the emulation of N attackers pushing gradients through the single-process trainer; the
MPI server in test_mpi.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psadv.gradpush import GradientPushes
from psadv.models import flat_state, param_views
from psadv.staleness import GradientAccumulator, delay_compensate
from test_emulate import emulated_run


def test_the_accumulator_steps_on_the_mean_of_k_pushes_and_copies_what_it_is_given():
    acc = GradientAccumulator(3)
    pushes = [([torch.full((2,), float(i))], [torch.full((1,), 10.0 + i)], 50, scale) for i, scale in
              zip(range(1, 4), (1.0, 0.5, 0.0))]
    assert acc.add(*pushes[0]) is None
    pushes[0][0][0].fill_(100.0)  # the receive buffer is reused after add(): the sum must not see it
    assert acc.add(*pushes[1]) is None
    grads, buffers, examples, lr_scale = acc.add(*pushes[2])
    assert grads[0].tolist() == [2.0, 2.0] and buffers[0].tolist() == [13.0] and examples == 150
    assert lr_scale == pytest.approx(0.5)
    # and it starts afresh
    assert acc.add([torch.ones(2)], [], 1) is None and acc.count == 1


def test_one_push_per_step_is_the_push_itself():
    g = [torch.tensor([1.0, -2.0])]
    grads, _, examples, scale = GradientAccumulator(1).add(g, [], 7, 0.25)
    assert torch.equal(grads[0], g[0]) and grads[0] is not g[0] and examples == 7 and scale == 0.25


def test_delay_compensation_is_the_first_order_dc_asgd_correction():
    g, now, then = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    before = (g.clone(), now.clone(), then.clone())
    out = delay_compensate([g], [now], [then], 0.1)[0]
    assert torch.allclose(out, g + 0.1 * g * g * (now - then))
    assert out.tolist() == pytest.approx([1.05, -2.2, 3.0])  # no correction where the weight did not move
    assert all(torch.equal(a, b) for a, b in zip((g, now, then), before))  # pure
    # the adaptive form divides by √v per coordinate; a parameter without v yet is corrected plainly
    v = torch.tensor([4.0, 1.0, 1.0])
    adaptive = delay_compensate([g, g], [now, now], [then, then], 0.1, [v, None])
    assert torch.allclose(adaptive[0], g + 0.1 * g * g / (v.sqrt() + 1e-8) * (now - then))
    assert torch.allclose(adaptive[1], out)
    assert torch.equal(delay_compensate([g], [now], [now], 5.0)[0], g)


def test_param_views_pick_the_parameters_out_of_a_flat_state_with_buffers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model.train()
    model(torch.randn(8, 3))  # moves the BatchNorm statistics away from their initial values
    views = param_views(model, flat_state(model))
    params = list(model.parameters())
    assert len(views) == len(params) == 6
    assert all(v.shape == p.shape and torch.equal(v, p.detach()) for v, p in zip(views, params))


class StandInTrainer:
    """What GradientPushes needs of psadv.training.Trainer: a model, its version, Adam's v, a step."""

    def __init__(self):
        self.device = torch.device("cpu")
        self.model = torch.nn.Linear(2, 1, bias=False)
        self.version = 0
        self.steps = []

    def second_moments(self):
        return None

    def apply_gradients(self, grads, buffers, examples, lr_scale=1.0):
        self.steps.append((grads, examples, lr_scale))
        self.version += 1


def test_a_stale_gradient_is_compensated_against_the_weights_it_was_computed_with():
    trainer = StandInTrainer()
    pushes = GradientPushes(trainer, delay_compensation=0.5, keep_versions=4)
    with torch.no_grad():
        trainer.model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    pushes.sent(0, flat_state(trainer.model))
    g = torch.tensor([[2.0, 1.0]])
    assert pushes.apply([g], [], 10, push_version=0)  # fresh: applied as it is
    assert torch.equal(trainer.steps[-1][0][0], g)
    with torch.no_grad():
        trainer.model.weight.copy_(torch.tensor([[1.5, 1.0]]))  # the server moved on to version 1
    assert pushes.apply([g], [], 10, push_version=0)  # τ = 1: corrected for the move since version 0
    assert torch.allclose(trainer.steps[-1][0][0], g + 0.5 * g * g * torch.tensor([[0.5, -1.0]]))
    # a version the server no longer keeps (older than --max-staleness, or before a resume): as it is
    for version in range(1, 7):
        pushes.sent(version, flat_state(trainer.model))
    assert 0 not in pushes.snapshots and len(pushes.snapshots) == 5
    trainer.version = 9
    assert pushes.apply([g], [], 10, push_version=0) and torch.equal(trainer.steps[-1][0][0], g)


def test_without_compensation_no_snapshot_is_kept():
    trainer = StandInTrainer()
    pushes = GradientPushes(trainer, accumulate=2)
    pushes.sent(0, flat_state(trainer.model))
    assert pushes.snapshots == {}
    assert not pushes.apply([torch.ones(1, 2)], [], 5, 0) and trainer.steps == []
    assert pushes.apply([torch.zeros(1, 2)], [], 5, 0) and trainer.steps[-1][1] == 10
    assert torch.equal(trainer.steps[-1][0][0], torch.full((1, 2), 0.5))


# --- the emulation: N attackers pushing gradients, in one process ----------------------------------
def test_emulated_gradient_pushes_accumulate_k_per_version_and_resume_exactly(tmp_path, mnist_dir):
    import h5py

    from psadv.checkpoint import find_checkpoint

    recipe = dict(emulate_attackers=4, push="gradients", accumulate=2, delay_compensation=1.0, refresh_every=1)
    s = emulated_run(tmp_path, mnist_dir, "straight", steps=12, checkpoint_every=6, **recipe)
    assert s["version"] == 12 and s["applied"] == 24 and s["examples_seen"] == 24 * 50
    # four attackers, two pushes a version, a refresh every version: each push 2 or 3 versions old
    assert set(s["staleness_histogram"]) <= {"0", "1", "2", "3"} and s["staleness_mean"] >= 1.5
    emulated_run(tmp_path, mnist_dir, "halves", resume=str(tmp_path / "straight/checkpoints/ckpt-00000006.h5"))
    with h5py.File(find_checkpoint(tmp_path / "straight"), "r") as a, \
            h5py.File(find_checkpoint(tmp_path / "halves"), "r") as b:
        for key in a["model"]:
            np.testing.assert_array_equal(a["model"][key][()], b["model"][key][()])


def test_delay_compensation_changes_what_stale_gradients_do(tmp_path, mnist_dir):
    from psadv.checkpoint import find_checkpoint, load_checkpoint

    base = dict(emulate_attackers=3, push="gradients", steps=8, seed=3)
    emulated_run(tmp_path, mnist_dir, "plain", **base)
    emulated_run(tmp_path, mnist_dir, "dc", delay_compensation=2.0, **base)
    plain, dc = (load_checkpoint(find_checkpoint(tmp_path / n)).model_state for n in ("plain", "dc"))
    assert any(not np.array_equal(plain[k].numpy(), dc[k].numpy()) for k in plain)


@pytest.mark.parametrize("option", [{"accumulate": 2}, {"delay_compensation": 1.0}])
def test_gradient_push_options_are_refused_for_pushes_of_examples(option):
    from psadv.config import make_config
    from psadv.errors import ConfigError

    with pytest.raises(ConfigError, match="is for --push gradients"):
        make_config(option)
    make_config({**option, "push": "gradients"})


# --- refinement on the attackers (--refine-on attackers) -------------------------------------------
def test_attackers_refine_against_their_newest_parameters_and_push_that_version(tmp_path, mnist_dir, monkeypatch):
    from psadv import single
    from psadv.models import flat_state

    from test_emulate import count_attacks

    seen = []
    real_refine = single.refine

    def which_model(model, x, y, attack, start):
        seen.append(flat_state(model))
        return real_refine(model, x, y, attack, start=start)

    calls = count_attacks(monkeypatch)
    monkeypatch.setattr(single, "refine", which_model)
    # eight attackers of PGD-2 (3 passes a batch): the last step sees the refresh ceil(8 / 3) = 3 versions back
    s = emulated_run(tmp_path, mnist_dir, "attackers", steps=30, emulate_attackers=8, refresh_every=1,
                     refine_on="attackers")
    taus = {int(t): n for t, n in s["staleness_histogram"].items()}
    assert max(taus) == 3 and taus[3] >= 20  # without it eight attackers' pushes are 8 versions old
    assert len([c for c in calls if not c[0]]) == 30  # one attack per applied batch
    # every push made with an older version was refined, each against the snapshot of its own version
    assert len(seen) >= 20
    assert len({tuple(v[:50].tolist()) for v in seen}) >= 20


def test_refine_on_needs_refinement_and_attackers():
    from psadv.config import make_config
    from psadv.errors import ConfigError

    with pytest.raises(ConfigError, match="--refine-on places --refine-steps, which is 0 here"):
        make_config({"refine_on": "attackers", "refine_steps": 0})
    with pytest.raises(ConfigError, match="needs attackers, real or emulated"):
        make_config({"refine_on": "attackers", "emulate_staleness": 4})
    make_config({"refine_on": "attackers", "emulate_attackers": 4, "push": "examples"})


def test_attackers_refine_augmented_batches_the_server_could_not():
    from psadv.config import make_config
    from psadv.errors import ConfigError
    from psadv.launch import check_mpi_options

    with pytest.raises(ConfigError, match="or --refine-on attackers"):
        check_mpi_options(make_config({"augment": "crop-flip", "refine_steps": 1, "push": "examples"}, attackers=2))
    check_mpi_options(make_config({"augment": "crop-flip", "refine_steps": 1, "refine_on": "attackers", "push": "examples"},
                                  attackers=2))
