"""Chase: channels removed on the cubic schedule with per-layer floors, removed channels exactly zero in producer,
bias and consumer, constant total density, the compact export computes the same function, wrapper invariants."""

import math

import numpy as np
import optax
import pytest
from _invariants import batch_at, mlp_apply, mlp_params, run, sharded_equals_unsharded

from jaxsparse.allocation import keep_count
from jaxsparse.transforms.chase import chase, chase_compact

LAYERS = ["Dense_0", "Dense_1", "Dense_2"]
SPARSITY = {name: {"kernel": 0.7, "bias": None} for name in LAYERS}
T = 24


def make(**kw):
    args = dict(
        layers=LAYERS,
        total_steps=T,
        channel_sparsity=0.5,
        min_ratio=0.5,
        update_every=3,
        channel_every=3,
    )
    args.update(kw)
    return chase(optax.adam(1e-2), SPARSITY, seed=0, **args)


def test_channels_follow_the_schedule_removed_channels_are_zero_and_density_is_constant():
    params, state, history, traces = run(make(), T)
    target = sum(keep_count(0.7, p["kernel"].size) for p in mlp_params().values())
    widths = [16, 8]
    prev = [np.ones(w, bool) for w in widths]
    for _, after, st in history:
        chans = [np.asarray(c) for c in st.extra.channels]
        for p, c, w in zip(prev, chans, widths):
            assert (c <= p).all()  # a removed channel never comes back
            assert c.sum() >= int(w * 0.5 * 0.5)  # per-layer floor
        prev = chans
        assert (
            sum(int(after[n]["kernel"].sum()) for n in LAYERS) == target
        )  # freed weights redistributed
        for i, c in enumerate(chans):
            assert not np.asarray(after[LAYERS[i]]["kernel"])[:, ~c].any()
            assert not np.asarray(after[LAYERS[i + 1]]["kernel"])[~c, :].any()
            np.testing.assert_array_equal(np.asarray(after[LAYERS[i]]["bias"]), c)
    assert sum(int(c.sum()) for c in prev) == math.ceil(24 * 0.5)  # the final channel count
    for i, c in enumerate(prev):
        assert not np.asarray(params[LAYERS[i]]["bias"])[~c].any()
    assert len(traces) == 1


def test_compact_export_computes_the_same_function():
    params, state, _, _ = run(make(), T)
    small = chase_compact(params, state.extra.channels, LAYERS)
    assert small["Dense_0"]["kernel"].shape[1] + small["Dense_1"]["kernel"].shape[1] == 12
    x = batch_at(7)[0]
    np.testing.assert_allclose(mlp_apply(small, x), mlp_apply(params, x), rtol=1e-5, atol=1e-6)


def test_without_channel_sparsity_no_channel_is_removed_and_sharded_equals_unsharded():
    _, state, _, _ = run(make(channel_sparsity=0.0), 9)
    assert all(bool(c.all()) for c in state.extra.channels)
    sharded_equals_unsharded(make(), 8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="layers"):
        chase.rule(0.5, layers=["Dense_0"], total_steps=10)
    with pytest.raises(ValueError, match="score"):
        chase.rule(0.5, layers=LAYERS, total_steps=10, score="l2")
    tx = chase(
        optax.sgd(0.1),
        {n: {"kernel": None, "bias": None} for n in LAYERS},
        layers=LAYERS,
        total_steps=10,
    )
    with pytest.raises(ValueError, match="sparse 'kernel'"):
        tx.init(mlp_params())
