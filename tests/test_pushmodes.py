"""The push-mode registry (psadv.pushmodes): one object a ``--push`` mode, found by name."""

import pytest

from psadv.config import FIELDS, make_config
from psadv.errors import ConfigError
from psadv.pushmodes import OWNED_OPTIONS, PUSH_MODES, examples_per_step, push_mode


def test_the_registry_is_what_push_offers():
    assert FIELDS["push"].metadata["choices"] == tuple(PUSH_MODES)
    assert list(PUSH_MODES) == ["examples", "gradients", "sync"]
    with pytest.raises(ValueError, match="unknown push mode 'bogus'"):
        push_mode("bogus")


def test_each_mode_says_how_its_pushes_are_counted():
    examples, gradients, sync = (push_mode(name) for name in ("examples", "gradients", "sync"))
    assert [m.staleness_limit(32) for m in (examples, gradients, sync)] == [32, 32, 0]
    assert [m.damps(True) for m in (examples, gradients, sync)] == [False, True, False]
    # --accumulate 4 with 8 attackers: a gradients version takes 4 pushes, a sync round 8
    assert [m.batches_per_version(4, 8) for m in (examples, gradients, sync)] == [1, 4, 8]
    assert examples.sends_examples and not gradients.sends_examples and not sync.sends_examples


@pytest.mark.parametrize("option", OWNED_OPTIONS)
def test_a_modes_own_option_is_refused_with_another_mode(option):
    value = 2 if option == "accumulate" else True if option == "lr_damping" else 0.5
    make_config({}, {"push": "gradients", option: value}, attackers=2)
    for name in ("examples", "sync"):
        with pytest.raises(ConfigError, match=f"--{option.replace('_', '-')} is for --push gradients"):
            make_config({}, {"push": name, option: value}, attackers=2)
    make_config({}, {"push": "examples", option: FIELDS[option].default}, attackers=2)  # a default is no choice


def test_emulated_synchronous_attackers_train_on_every_batch_of_a_round():
    assert examples_per_step(100, "sync", 8) == 800
    assert examples_per_step(100, "sync", 0) == 100  # no emulation: one process's batch
    assert [examples_per_step(100, mode, 8) for mode in ("examples", "gradients")] == [100, 100]


def test_synchronous_attackers_share_one_batch_at_their_own_peak():
    from psadv.config import SYNC_BATCH, SYNC_LR

    # the default: N attackers, real or emulated, split SYNC_BATCH examples, at SYNC_LR
    for n in (1, 8, 32, 3):
        for cfg in (make_config({}, attackers=n), make_config({"emulate_attackers": n})):
            assert cfg.push == "sync" and cfg.lr == SYNC_LR and cfg.batch_size == -(-SYNC_BATCH // n)
    assert make_config({}, attackers=32).batch_size * 32 == 416  # 13 each
    # asked for, they stay; one process keeps its own batch and peak
    cfg = make_config({"batch_size": 64, "lr": 1e-3}, attackers=8)
    assert (cfg.batch_size, cfg.lr) == (64, 1e-3)
    assert (make_config({}).batch_size, make_config({}).lr) == (100, FIELDS["lr"].default)
    # a stale push wants the smaller peak, and its own batch
    cfg = make_config({"push": "examples"}, attackers=8)
    assert cfg.lr < FIELDS["lr"].default and cfg.batch_size == 100
