"""The push-mode registry (psadv.pushmodes): one object a ``--push`` mode, found by name."""

import pytest

from psadv.config import FIELDS, make_config
from psadv.errors import ConfigError
from psadv.pushmodes import OWNED_OPTIONS, PUSH_MODES, push_mode


def test_the_registry_is_what_push_offers():
    assert FIELDS["push"].metadata["choices"] == tuple(PUSH_MODES)
    assert list(PUSH_MODES) == ["examples", "gradients", "sync"]
    with pytest.raises(ValueError, match="unknown push mode 'bogus'"):
        push_mode("bogus")


def test_each_mode_says_how_its_pushes_are_counted():
    examples, gradients, sync = (push_mode(name) for name in ("examples", "gradients", "sync"))
    assert [m.staleness_limit(32) for m in (examples, gradients, sync)] == [32, 32, 0]
    assert [m.damps(True) for m in (examples, gradients, sync)] == [False, True, False]
    assert [m.batches_per_version(4) for m in (examples, gradients, sync)] == [1, 4, 1]
    assert [m.epoch_size(60000, 4) for m in (examples, gradients, sync)] == [60000, 60000, 15000]
    assert examples.sends_examples and not gradients.sends_examples and not sync.sends_examples


@pytest.mark.parametrize("option", OWNED_OPTIONS)
def test_a_modes_own_option_is_refused_with_another_mode(option):
    value = 2 if option == "accumulate" else True if option == "lr_damping" else 0.5
    make_config({}, {"push": "gradients", option: value}, attackers=2)
    for name in ("examples", "sync"):
        with pytest.raises(ConfigError, match=f"--{option.replace('_', '-')} is for --push gradients"):
            make_config({}, {"push": name, option: value}, attackers=2)
    make_config({}, {"push": "examples", option: FIELDS[option].default}, attackers=2)  # a default is no choice
