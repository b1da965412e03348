"""The N-attacker emulation: push order, versions and refresh rules, without torch or MPI."""

import numpy as np
import pytest

from psadv.emulate import SnapshotStore, VirtualAttackers


def taus(n, refresh, pushes, reject_above=None):
    emu, version, out = VirtualAttackers(n, refresh), 0, []
    for _ in range(pushes):
        push = emu.next_push()
        tau = version - push.version
        applied = reject_above is None or tau <= reject_above
        if applied:
            version += 1
            out.append(tau)
        emu.judged(push, version, applied)
    return out


def test_one_attacker_fresh_every_version_is_one_version_behind():
    assert taus(1, 1, 10) == [0] + [1] * 9


@pytest.mark.parametrize("n,refresh", [(1, 4), (2, 4), (8, 1), (8, 4), (64, 4), (3, 7)])
def test_steady_state_staleness_is_n_plus_the_refresh_lag(n, refresh):
    """τ = N + (V mod r) at pick-up: mean N + (r - 1)/2, support N .. N + r - 1."""
    steady = taus(n, refresh, 40 * n * refresh)[4 * n * refresh:]
    assert min(steady) == n and max(steady) == n + refresh - 1
    assert np.mean(steady) == pytest.approx(n + (refresh - 1) / 2, abs=0.05)


def test_the_first_round_uses_the_initial_parameters():
    assert taus(4, 1, 4) == [0, 1, 2, 3]


def test_a_rejected_attacker_gets_fresh_parameters():
    emu = VirtualAttackers(2, 100)
    # at version 5 attacker 0 still holds and computes with version 0: its push is rejected
    emu.held, emu.computing = [0, 5], [0, 5]
    push = emu.next_push()
    assert (push.attacker, push.version) == (0, 0)
    emu.judged(push, 5, applied=False)
    assert emu.held == [5, 5]
    # its batch in progress was started before the refresh; the one after uses version 5
    assert [(p.attacker, p.version) for p in (emu.next_push() for _ in range(3))] == [(1, 5), (0, 0), (1, 5)]
    assert emu.next_push().version == 5


def test_a_staleness_limit_below_n_rejects_and_still_makes_progress():
    applied = taus(8, 1, 400, reject_above=4)
    assert applied and max(applied) <= 4


def test_state_round_trip_continues_identically():
    a = VirtualAttackers(5, 3)
    for v in range(17):
        a.judged(a.next_push(), v + 1, True)
    b = VirtualAttackers(5, 3)
    b.restore(a.state())
    assert [a.next_push() for _ in range(12)] == [b.next_push() for _ in range(12)]
    c = VirtualAttackers(4, 3)
    c.restore(a.state())  # another N starts afresh
    assert c.turn == 0


def test_snapshots_are_shared_and_dropped_when_unused():
    emu, store, version = VirtualAttackers(16, 4), SnapshotStore(), 0
    store.take(0, object())
    for _ in range(500):
        push = emu.next_push()
        assert push.version in store.snapshots
        version += 1
        emu.judged(push, version, True)
        if version % 4 == 0:
            store.take(version, object())
        store.keep_only(emu.versions_in_use())
        # at most two refresh generations are alive, however many attackers share them
        assert len(store.snapshots) <= 16 // 4 + 2


# --- in the single-process trainer ---------------------------------------------------------------
# pushes of examples: the staleness these tests emulate (the default, sync, has none)
SMALL = dict(batch_size=50, attack_steps=2, eval_examples=100, eval_steps=2, eval_every=0, log_every=5, threads=1,
             push="examples")


def emulated_run(tmp_path, mnist_dir, name, resume=None, **options):
    from psadv.runsetup import resolve_run
    from psadv.single import train_single

    overrides = {**({} if resume else SMALL), "data_dir": str(mnist_dir), "run_dir": str(tmp_path / name), **options}
    return train_single(resolve_run(overrides, resume=resume), show_progress=False)


def test_an_emulated_run_has_the_predicted_staleness_and_resumes_exactly(tmp_path, mnist_dir):
    import h5py

    from psadv.checkpoint import find_checkpoint

    recipe = dict(emulate_attackers=4, refresh_every=2, eval_every=0)
    s = emulated_run(tmp_path, mnist_dir, "straight", steps=24, checkpoint_every=12, **recipe)
    predicted = VirtualAttackers(4, 2)
    expected = {}
    for version in range(24):
        push = predicted.next_push()
        expected[str(version - push.version)] = expected.get(str(version - push.version), 0) + 1
        predicted.judged(push, version + 1, True)
    assert s["emulated_attackers"] == 4 and s["staleness_histogram"] == expected and s["applied"] == 24
    assert s["staleness_max"] == 5  # N + r - 1
    # a branch from the middle checkpoint ends where the straight run did
    emulated_run(tmp_path, mnist_dir, "halves", resume=str(tmp_path / "straight/checkpoints/ckpt-00000012.h5"))
    with h5py.File(find_checkpoint(tmp_path / "straight"), "r") as a, \
            h5py.File(find_checkpoint(tmp_path / "halves"), "r") as b:
        for key in a["model"]:
            np.testing.assert_array_equal(a["model"][key][()], b["model"][key][()])
        np.testing.assert_array_equal(a["extra/staleness_hist"][()], b["extra/staleness_hist"][()])


def test_a_staleness_limit_rejects_emulated_pushes(tmp_path, mnist_dir):
    s = emulated_run(tmp_path, mnist_dir, "limit", steps=30, emulate_attackers=6, max_staleness=6, refresh_every=4)
    assert s["rejected_stale"] > 0 and s["staleness_max"] <= 6 and s["applied"] == 30
    assert s["staleness_histogram"][">6"] == s["rejected_stale"]


def test_emulations_exclude_each_other():
    from psadv.config import make_config
    from psadv.errors import ConfigError

    with pytest.raises(ConfigError, match="exclude each other"):
        make_config({"emulate_attackers": 2, "emulate_staleness": 3})


def count_attacks(monkeypatch) -> list[tuple]:
    """(warm-started, attack name, steps) of every attack the single-process trainer makes."""
    from psadv import single

    calls = []
    real = single.perturb

    real_refine = single.refine

    def counting(model, x, y, attack, start=None):
        calls.append((start is not None, attack.name, attack.effective_steps))
        return real(model, x, y, attack, start=start)

    def refining(model, x, y, attack, start):
        calls.append((True, attack.name, attack.effective_steps))
        return real_refine(model, x, y, attack, start=start)

    monkeypatch.setattr(single, "perturb", counting)
    monkeypatch.setattr(single, "refine", refining)
    return calls


def test_stale_pushes_are_refined_against_the_current_model(tmp_path, mnist_dir, monkeypatch):
    calls = count_attacks(monkeypatch)
    s = emulated_run(tmp_path, mnist_dir, "refine", steps=12, emulate_attackers=3, refresh_every=1, refine_steps=2)
    stale = sum(int(n) for tau, n in s["staleness_histogram"].items() if tau != "0")
    assert stale == 11  # the first round's τ are 0, 1, 2, then every push is 3 versions old
    refines = [c for c in calls if c[0]]
    assert len(refines) == stale and all(c[1:] == ("pgd", 2) for c in refines)
    assert len(calls) - len(refines) == 12  # one attack per applied batch


def test_a_warm_started_attack_stays_in_the_ball():
    import torch

    from psadv.attacks import Attack, perturb
    from psadv.models import build_model
    from psadv.schedules import refine_attack

    torch.manual_seed(0)
    model = build_model("mnist-small", in_channels=1, num_classes=10)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    attack = Attack(name="fgsm-rs", eps=0.3)
    start = perturb(model, x, y, attack)
    refine = refine_attack(attack, 3)
    assert (refine.name, refine.effective_steps, refine.effective_step_size) == ("pgd", 3, attack.effective_step_size)
    assert refine_attack(attack, 1, step_ratio=0.5).effective_step_size == pytest.approx(0.15)
    out = perturb(model, x, y, refine, start=start)
    assert (out - x).abs().max() <= 0.3 + 1e-6 and out.min() >= 0 and out.max() <= 1
    assert torch.equal(perturb(model, x, y, Attack(steps=0), start=start), start)


def test_refinement_never_weakens_an_example():
    import torch

    from psadv.attacks import Attack, perturb, refine
    from psadv.attacks.losses import cross_entropy_loss
    from psadv.models import build_model
    from psadv.schedules import refine_attack

    torch.manual_seed(0)
    model = build_model("mnist-small", in_channels=1, num_classes=10).eval()
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    # half near a local maximum, where a big step overshoots, half at random points, where it helps
    strong = perturb(model, x, y, Attack(eps=0.3, steps=20))
    noise = (x + torch.empty_like(x).uniform_(-0.3, 0.3)).clamp(0, 1)
    start = torch.cat([strong[:32], noise[32:]])
    step = refine_attack(Attack(eps=0.3, steps=10), 1, step_ratio=1.25)
    plain, guarded = perturb(model, x, y, step, start=start), refine(model, x, y, step, start=start)
    with torch.no_grad():
        loss = {name: cross_entropy_loss(model(t), y) for name, t in
                (("start", start), ("plain", plain), ("guarded", guarded))}
    assert (loss["plain"] < loss["start"]).any()  # the unguarded step does weaken some examples
    assert (loss["guarded"] >= loss["start"]).all() and (loss["guarded"] >= loss["plain"]).all()
    kept = (guarded == start).flatten(1).all(1)
    assert kept.any() and not kept.all()  # each example is one or the other, whole
    assert ((guarded == plain).flatten(1).all(1) | kept).all()
    assert (guarded - x).abs().max() <= 0.3 + 1e-6


def test_a_plain_checkpoint_resumes_into_an_emulation_from_its_version(tmp_path, mnist_dir):
    emulated_run(tmp_path, mnist_dir, "plain", steps=10)
    s = emulated_run(tmp_path, mnist_dir, "branch", resume=str(tmp_path / "plain"), steps=22, emulate_attackers=2,
                     refresh_every=1)
    # every virtual attacker starts from version 10: τ 0 and 1, then 2 — nothing rejected or spurious
    assert s["applied"] == 12 and s["rejected_stale"] == 0
    assert s["staleness_histogram"] == {"0": 1, "1": 1, "2": 10}


def test_refinement_is_on_by_default_where_there_are_stale_examples_to_refine():
    from psadv.config import make_config

    cfg = make_config({"emulate_staleness": 4})
    assert (cfg.refine_steps, cfg.refine_step_ratio) == (1, 1.25)
    # one process takes the push mode's: its config is what a resume under MPI continues with
    assert make_config({}).refine_steps == 0 and make_config({"push": "examples"}).refine_steps == 1
    assert make_config({"push": "examples"}, attackers=2).refine_steps == 1
    assert make_config({"push": "examples", "emulate_attackers": 2}).refine_steps == 1
    # attackers that push no examples (the default, sync, among them) have none to refine
    for where in ({"push": "gradients"}, {"push": "sync"}, {}):
        assert make_config(where, attackers=2).refine_steps == 0, where
        assert make_config({**where, "emulate_attackers": 2}).refine_steps == 0, where
    for where in ({"augment": "crop-flip"}, {"dataset": "cifar10"}):
        assert make_config({**where, "push": "examples"}).refine_steps == 0, where
    # asked for, it stays (and the MPI launch refuses the combinations it cannot do)
    assert make_config({"push": "gradients", "refine_steps": 2}).refine_steps == 2
    assert make_config({"augment": "crop-flip"}, {"refine_steps": 1}).refine_steps == 1


def test_the_peak_learning_rate_is_lower_against_staleness():
    from psadv.config import STALENESS_LR, make_config

    assert make_config({}).lr == 1e-2 != STALENESS_LR
    for where in ({"emulate_attackers": 8, "push": "examples"}, {"emulate_staleness": 4},
                  {"emulate_attackers": 8, "push": "gradients"}):
        assert make_config(where).lr == STALENESS_LR, where
    assert make_config({"push": "examples"}, attackers=2).lr == STALENESS_LR  # under MPI
    # asked for, or set by a dataset's recipe, it stays
    assert make_config({"emulate_attackers": 8, "push": "examples"}, {"lr": 1e-2}).lr == 1e-2
    assert make_config({"dataset": "cifar10"}, attackers=2).lr == 0.2


def test_a_plain_run_has_nothing_to_refine(tmp_path, mnist_dir, monkeypatch):
    calls = count_attacks(monkeypatch)
    emulated_run(tmp_path, mnist_dir, "plain", steps=4, refine_steps=3)
    assert [warm for warm, _, _ in calls] == [False] * 4


def test_a_fixed_emulated_staleness_is_refined_once_stale(tmp_path, mnist_dir, monkeypatch):
    calls = count_attacks(monkeypatch)
    emulated_run(tmp_path, mnist_dir, "s3", steps=8, emulate_staleness=3, refine_steps=1)
    # version 0 attacks with itself; from version 1 on the attack model is 1, 2, 3, 3, … versions old
    warm = [c[0] for c in calls]
    assert warm.count(True) == 7 and warm.count(False) == 8


def test_emulated_synchronous_attackers_train_one_process_on_their_rounds(tmp_path, mnist_dir):
    """--emulate-attackers N --push sync: a version is one step on every attacker's batch of a round,
    which for mnist-small (no BatchNorm) is exactly one process's step on a batch N times larger."""
    import h5py

    from psadv.checkpoint import find_checkpoint

    s = emulated_run(tmp_path, mnist_dir, "sync", steps=6, emulate_attackers=4, push="sync", batch_size=10, lr=1e-2)
    plain = emulated_run(tmp_path, mnist_dir, "plain", steps=6, batch_size=40, lr=1e-2)
    assert s["emulated_attackers"] == 4 and s["staleness_max"] == 0
    assert s["examples_seen"] == plain["examples_seen"] == 6 * 40
    with h5py.File(find_checkpoint(tmp_path / "sync"), "r") as a, h5py.File(find_checkpoint(tmp_path / "plain"), "r") as b:
        for key in a["model"]:
            np.testing.assert_array_equal(a["model"][key][()], b["model"][key][()])


def test_emulated_synchronous_attackers_need_a_batch_from_every_shard(tmp_path, mnist_dir):
    from psadv.errors import ConfigError

    with pytest.raises(ConfigError, match="exceeds an emulated attacker's shard with 64 attackers"):
        emulated_run(tmp_path, mnist_dir, "big", steps=1, emulate_attackers=64, push="sync", batch_size=1000)
