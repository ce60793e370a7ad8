"""The scaling-wall grid's pure parts: seed statistics, the effective range, training FLOPs and the
modes it builds (benchmarks.wall.stats, benchmarks.wall.modes)."""

import math

import pytest

from benchmarks.wall import stats
from benchmarks.wall.modes import build_modes, remedy_modes

# t(0.975) with 2 and 4 degrees of freedom, from printed tables
T975 = {2: 4.303, 4: 2.776}


def test_interval_is_the_t_interval_of_the_mean():
    out = stats.interval([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["sd"] == 1.0 and out["n"] == 3
    assert out["high"] - out["mean"] == pytest.approx(T975[2] / math.sqrt(3), rel=1e-3)
    assert out["mean"] - out["low"] == pytest.approx(out["high"] - out["mean"])
    five = stats.interval([0.1, 0.2, 0.3, 0.4, 0.5])
    assert five["high"] - five["mean"] == pytest.approx(T975[4] * five["sd"] / math.sqrt(5),
                                                        rel=1e-3)
    one = stats.interval([0.5])
    assert one["sd"] is None and one["low"] is None and one["high"] is None


def test_significantly_above_needs_the_whole_interval_above_zero():
    assert stats.significantly_above([0.010, 0.011, 0.012])
    assert not stats.significantly_above([0.010, -0.010, 0.020])
    assert not stats.significantly_above([-0.01, -0.02, -0.03])
    assert not stats.significantly_above([0.5])  # one seed: undefined, not significant


def _losses(curves):
    """seed -> k' -> loss from one list of losses per seed (k' = 1 ...)."""
    return {seed: dict(enumerate(curve, 1)) for seed, curve in enumerate(curves, 1)}


def test_effective_range_stops_at_the_first_significant_rise():
    # flat to k' = 3 (noise around 0), a consistent rise from k' = 4
    losses = _losses([[5.0, 4.0, 4.001, 4.05, 4.1, 4.2],
                      [5.1, 4.1, 4.098, 4.16, 4.2, 4.3],
                      [4.9, 3.9, 3.902, 3.96, 4.0, 4.1]])
    assert stats.effective_range(losses, 2) == 3
    # falling all the way: the whole range
    falling = _losses([[5.0, 4.0, 3.9, 3.8, 3.7, 3.6], [5.1, 4.1, 4.0, 3.9, 3.8, 3.7],
                       [5.2, 4.2, 4.1, 4.0, 3.95, 3.9]])
    assert stats.effective_range(falling, 2) == 6
    # a rise at k' = 3 ends the range at k even if the loss falls again later
    assert stats.effective_range(_losses([[5, 4, 4.1, 3], [5, 4, 4.12, 3], [5, 4, 4.11, 3]]), 2) == 2


def test_summarize_pairs_by_seed():
    mode = _losses([[5.0, 4.0, 4.1], [5.2, 4.3, 4.2], [5.1, 4.2, 4.3]])
    reference = _losses([[5.1, 4.1, 4.3], [5.3, 4.35, 4.4], [5.2, 4.3, 4.5]])
    out = stats.summarize(mode, 2, reference)
    assert out["seeds"] == [1, 2, 3] and out["best_k"] == 2
    assert out["at_k"]["mean"] == pytest.approx((4.0 + 4.3 + 4.2) / 3)
    assert out["at_3k"] is None  # no k' = 6 here
    diffs = [-0.1, -0.05, -0.1]
    assert out["minus_topk"]["2"]["mean"] == pytest.approx(sum(diffs) / 3)
    assert out["minus_topk"]["2"]["high"] < 0  # consistently below the reference
    # only the seeds both have are paired
    partial = stats.paired({1: mode[1], 2: mode[2]}, reference)
    assert partial[1]["n"] == 2


def test_training_flops_grow_with_k_by_the_expert_matmuls():
    sizes = {"num_layers": 2, "hidden_size": 64, "seq_length": 128, "num_experts": 16,
             "moe_ffn_hidden_size": 64}
    one, two = (stats.training_flops_per_token(sizes, k, vocab=4096) for k in (1, 2))
    assert two - one == 3 * 2 * 6 * 64 * 64
    assert stats.training_flops_per_token(sizes, 1.5, 4096) == pytest.approx((one + two) / 2)


@pytest.mark.parametrize("k", [2, 4])
def test_modes_follow_the_training_k(k):
    modes = build_modes(k, pretrain_iters=400)
    specialists = {m.train_k for m in modes.values() if m.group == "specialist"}
    assert specialists == set(range(1, 2 * k + 1)) - {k}
    assert {"topk", "emoe", "emoe-no-hr", "topk-hr", f"emoe-pool{k + 1}", f"emoe-pool{3 * k}",
            "mmoe-layer", "mmoe-model-global", "mmoe-model-micro", "mmoe-token",
            "mmoe-layer-capacity"} <= set(modes)
    for name, mode in modes.items():
        assert mode.settings == ("a" if mode.group == "remedy" else "ab"), name
        flags = dict(zip(mode.flags[::2], mode.flags[1::2]))
        if mode.group == "mmoe":
            assert (flags["--mmoe-k-min"], flags["--mmoe-k-max"]) == ("1", str(2 * k))
    assert "--emoe-hr-loss-coeff" not in modes["emoe-no-hr"].flags
    assert modes["topk-k1"].flags[-1] == "--moe-router-pre-softmax"
    widen = modes["emoe-widen"].flags
    assert widen[widen.index("--emoe-k-ideal-start") + 1] == str(k)
    assert widen[widen.index("--emoe-k-ideal-ramp-iters") + 1] == "200"
    assert set(remedy_modes(modes, k)) == {"emoe-widen", "emoe-narrow", "emoe-topk-first",
                                           f"emoe-pool{k + 1}", "mmoe-layer"}
