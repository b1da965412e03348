"""The parameter server's staleness policy, driven directly (no MPI)."""

import numpy as np
import pytest

from psadv.staleness import HIST_BINS, StalenessPolicy


def test_examples_mode_accepts_up_to_s_and_counts():
    p = StalenessPolicy("examples", max_staleness=2, attackers=2)
    verdicts = [p.judge(version, pushed) for version, pushed in [(5, 5), (5, 4), (5, 3), (5, 2), (9, 0)]]
    assert [v.tau for v in verdicts] == [0, 1, 2, 3, 9]
    assert [v.accepted for v in verdicts] == [True, True, True, False, False]
    assert all(v.lr_scale == 1.0 for v in verdicts)
    assert p.hist.tolist() == [1, 1, 1, 2]  # τ = 0, 1, 2, then the rejections
    assert (p.applied, p.rejected_stale, p.staleness_sum, p.staleness_max) == (3, 2, 3, 2)
    s = p.summary()
    assert s["staleness_histogram"] == {"0": 1, "1": 1, "2": 1, ">2": 2}
    assert s["staleness_mean"] == 1.0 and s["staleness_max"] == 2 and s["max_staleness"] == 2


def test_gradients_mode_damps_the_learning_rate_only_when_asked():
    damped = StalenessPolicy("gradients", max_staleness=8, attackers=1, lr_damping=True)
    assert [damped.judge(10, 10 - tau).lr_scale for tau in (0, 1, 4)] == [1.0, 1.0, 0.25]
    plain = StalenessPolicy("gradients", max_staleness=8, attackers=1)
    assert plain.judge(10, 6).lr_scale == 1.0
    assert StalenessPolicy("examples", max_staleness=8, attackers=1, lr_damping=True).judge(10, 6).lr_scale == 1.0


def test_sync_mode_rejects_any_staleness_into_the_rejection_bin():
    p = StalenessPolicy("sync", max_staleness=32, attackers=2)
    assert p.judge(3, 3).accepted
    rejected = p.judge(3, 2)
    assert not rejected.accepted and rejected.tau == 1
    assert p.hist.tolist() == [1, 1]  # τ = 0, then the rejection: never a numbered bin
    assert p.summary()["staleness_histogram"] == {"0": 1, ">0": 1}
    assert (p.applied, p.rejected_stale) == (1, 1)


def test_sync_mode_averages_one_gradient_per_attacker():
    p = StalenessPolicy("sync", max_staleness=0, attackers=3)
    assert p.add_sync(1, np.array([1.0, 2.0]), 10) is None
    assert p.add_sync(2, np.array([3.0, 4.0]), 10) is None
    step = p.add_sync(3, np.array([5.0, 0.0]), 5)
    np.testing.assert_array_equal(step.gradient, [3.0, 2.0])
    assert step.examples == 25
    # the next round starts empty
    assert p.add_sync(1, np.array([1.0, 1.0]), 1) is None
    p.add_sync(2, np.array([1.0, 1.0]), 1)
    np.testing.assert_array_equal(p.add_sync(3, np.array([4.0, 1.0]), 1).gradient, [2.0, 1.0])


def test_histogram_is_capped_and_large_staleness_goes_to_the_last_bin():
    p = StalenessPolicy("examples", max_staleness=5000, attackers=1)
    assert len(p.hist) == HIST_BINS + 1
    assert p.judge(3000, 0).accepted
    assert p.hist[-1] == 1 and p.staleness_max == 3000


def test_state_round_trip_and_old_histograms_fold_into_the_last_bin():
    p = StalenessPolicy("examples", max_staleness=3, attackers=2)
    for version, pushed in [(4, 4), (4, 2), (9, 1)]:
        p.judge(version, pushed)
    q = StalenessPolicy("examples", max_staleness=3, attackers=2)
    q.restore(p.state(), p.hist.copy())
    assert q.state() == p.state() and q.hist.tolist() == p.hist.tolist()
    # a sync checkpoint written with the old layout (S + 2 bins, rejections in bins 1..S)
    old = np.array([7, 2, 1, 0, 0], dtype=np.int64)
    s = StalenessPolicy("sync", max_staleness=3, attackers=2)
    s.restore({"applied": 7, "rejected_stale": 3, "staleness_sum": 0, "staleness_max": 0}, old)
    assert s.hist.tolist() == [7, 3] and s.summary()["rejected_stale"] == 3


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="push mode"):
        StalenessPolicy("broadcast", max_staleness=1, attackers=1)
