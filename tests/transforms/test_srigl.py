"""SRigL: exact constant fan-in without ablation, ablation rules, the wrapper's invariants, and the gather format."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _invariants import (
    adam_moments_zero_where_grown,
    live,
    mlp_params,
    run,
    sharded_equals_unsharded,
)

import jaxsparse as js
from jaxsparse.allocation import keep_count
from jaxsparse.transforms.common import MaskContext
from jaxsparse.transforms.srigl import constant_fan_in, fan_in_matmul, srigl

SPARSITY = 0.75


def targets(params):
    return {k: keep_count(SPARSITY, v["kernel"].size) for k, v in params.items()}


def test_without_ablation_every_column_keeps_exactly_the_same_fan_in_at_every_step():
    tx = srigl(optax.adam(1e-2), SPARSITY, total_steps=40, update_every=3, ablation=0.0, seed=2)
    params, state, history, traces = run(tx, 20)
    params0 = mlp_params()
    moved = 0
    for before, after, _ in history:
        for name, n_target in targets(params0).items():
            m = np.asarray(after[name]["kernel"])
            k0 = n_target // m.shape[-1]
            np.testing.assert_array_equal(m.sum(0), np.full(m.shape[-1], k0))
            moved += int((m != np.asarray(before[name]["kernel"])).sum())
        assert after["Dense_0"]["bias"] is None
    assert moved > 0  # the masks really changed
    assert adam_moments_zero_where_grown(history) > 0
    assert len(traces) == 1  # update and non-update steps share one compilation
    assert not bool(jnp.any(state.extra.ablated["Dense_1"]["kernel"]))


@functools.cache
def ablation_run():
    tx = srigl(optax.adam(1e-2), SPARSITY, total_steps=40, update_every=3, ablation=0.9, seed=0)
    return run(tx, 24)


def test_with_ablation_live_neurons_keep_exactly_k_and_ablated_are_empty():
    params, state, history, traces = ablation_run()
    n_targets = targets(params)
    n_ablated = 0
    for _, after, st in history:
        for name in ("Dense_0", "Dense_1", "Dense_2"):
            m = np.asarray(after[name]["kernel"])
            ablated = np.asarray(st.extra.ablated[name]["kernel"])
            n_live = m.shape[-1] - ablated.sum()
            k = min(n_targets[name] // n_live, m.shape[0])
            np.testing.assert_array_equal(m.sum(0)[~ablated], k)
            assert m[:, ablated].sum() == 0
            assert m.sum() <= n_targets[name]
            assert n_live >= n_targets[name] // m.shape[0] + 1  # at least min_neurons + 1 live
            n_ablated += int(ablated.sum())
        assert not np.asarray(
            st.extra.ablated["Dense_2"]["kernel"]
        ).any()  # last layer never ablated
    assert n_ablated > 0
    assert len(traces) == 1


def test_ablation_removes_the_neurons_with_few_salient_weights():
    """Columns 0-2 have tiny weights and zero gradient: only they fall below the salient-count threshold."""
    w = jax.random.normal(jax.random.PRNGKey(0), (16, 8)) + 3.0
    w = w.at[:, :3].set(1e-3)
    g = jnp.ones((16, 8)).at[:, :3].set(0.0)
    algo = srigl.rule(
        0.5, end_step=100, update_every=1, drop_fraction=0.5, ablation=0.5, no_ablation=[]
    )
    params = {"w": w}
    masks, extra = algo.init(params, jax.random.PRNGKey(1))
    masks, extra = algo.update(
        MaskContext(
            masks,
            js.apply_masks(params, masks),
            {"w": g},
            jnp.int32(1),
            jax.random.PRNGKey(2),
            extra,
        )
    )
    np.testing.assert_array_equal(np.asarray(extra.ablated["w"]), [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(masks["w"]).sum(0), [0, 0, 0, 12, 12, 12, 12, 12])


def test_wrapper_invariants_sharded_equals_unsharded():
    tx = srigl(optax.sgd(0.1, momentum=0.9), SPARSITY, total_steps=20, update_every=2, seed=1)
    ref, _ = sharded_equals_unsharded(tx, 6)
    assert any(
        (np.asarray(a) != np.asarray(b)).any()
        for b, a, _ in ref[2]
        for a, b in zip(live(a), live(b))
    )


def test_gather_format_round_trip_and_matmul_with_gradients():
    params, state, _, _ = ablation_run()
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        w, m = params[name]["kernel"], state.masks[name]["kernel"]
        c = constant_fan_in(w, m)
        np.testing.assert_array_equal(np.asarray(c.todense()), np.asarray(jnp.where(m, w, 0)))
        assert c.columns.shape[0] == int(m.shape[-1] - state.extra.ablated[name]["kernel"].sum())
        x = jax.random.normal(jax.random.PRNGKey(3), (5, w.shape[0]))
        dense = lambda x, w: jnp.sum(jnp.sin(x @ w))
        gather = lambda x, vals: jnp.sum(
            jnp.sin(fan_in_matmul(x, c.__class__(vals, c.rows, c.columns, c.shape)))
        )
        np.testing.assert_allclose(fan_in_matmul(x, c), x @ c.todense(), rtol=1e-5, atol=1e-5)
        gx, gw = jax.grad(dense, argnums=(0, 1))(x, c.todense())
        hx, hv = jax.grad(gather, argnums=(0, 1))(x, c.values)
        np.testing.assert_allclose(hx, gx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(hv, gw[c.rows, c.columns[None]], rtol=1e-5, atol=1e-5)


def test_gather_format_works_for_conv_kernels_and_rejects_uneven_fan_in():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 5))
    m = srigl(optax.sgd(0.1), 0.8, end_step=10, ablation=0.0).init({"w": w}).masks["w"]
    c = constant_fan_in(w, m)
    assert c.values.shape == (keep_count(0.8, w.size) // 5, 5)
    np.testing.assert_array_equal(np.asarray(c.todense()), np.asarray(jnp.where(m, w, 0)))
    with pytest.raises(ValueError, match="constant fan-in"):
        constant_fan_in(jnp.ones((4, 2)), jnp.array([[1, 1], [1, 0], [0, 0], [0, 0]], bool))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(sparsity=0.5), ValueError, "total_steps"),
        (dict(sparsity=1.5, total_steps=10), ValueError, "sparsity"),
        (dict(sparsity=0.5, total_steps=10, ablation=2.0), ValueError, "ablation"),
        (dict(sparsity=0.5, total_steps=10, update_every=0), ValueError, "update_every"),
        (
            dict(sparsity=0.5, total_steps=10, no_ablation="Dense_0/kernel"),
            TypeError,
            "no_ablation",
        ),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        srigl.rule(**kwargs)


def test_bad_leaves_fail_at_init():
    tx = srigl(optax.sgd(0.1), 0.99, total_steps=10)
    with pytest.raises(ValueError, match="fewer weights"):
        tx.init({"w": jnp.ones((4, 8))})
    tx = srigl(optax.sgd(0.1), 0.5, total_steps=10, no_ablation=["nope"])
    with pytest.raises(ValueError, match="not sparse leaves"):
        tx.init(mlp_params())
