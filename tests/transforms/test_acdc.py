"""AC/DC: the published phase table, exact target sparsity in every compressed phase, dense phases really dense,
momentum reset at decompression, the reduction to one-shot magnitude retraining, and the wrapper's invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _invariants import (
    batch_at,
    live,
    make_step,
    mlp_loss,
    mlp_params,
    run,
    sharded_equals_unsharded,
)

import jaxsparse as js
from jaxsparse.allocation import keep_count
from jaxsparse.transforms.acdc import acdc, acdc_phases

T = 40


def test_default_phase_table_is_the_published_imagenet_schedule():
    # pruner [start 10, freq 10, end 71] with 5-epoch phases, final compressed [85, 100) of 100 epochs
    assert acdc_phases(100) == (
        (10, 15), (20, 25), (30, 35), (40, 45), (50, 55), (60, 65), (70, 75), (85, 100),
    )  # fmt: skip
    assert acdc_phases(10, warmup=0.0, decompressed=0.0, cycles_end=1.0) == ((0, 10),)


def test_target_sparsity_exact_in_compressed_phases_dense_otherwise_and_ends_compressed():
    tx = acdc(optax.adam(0.1), 0.8, total_steps=T)
    params, state, history, traces = run(tx, T)
    n_sparse = sum(p["kernel"].size for p in mlp_params().values())
    budget = sum(keep_count(0.8, p["kernel"].size) for p in mlp_params().values())
    compressed = {t for a, b in acdc_phases(T) for t in range(a, b)}
    masks_at = {}
    for t, (_, after, _) in enumerate(history):
        nnz = sum(int(m.sum()) for m in live(after))
        assert nnz == (budget if t in compressed else n_sparse), t
        masks_at[t] = after
    # the final model has the target sparsity; masks change between compressed phases
    assert sum(int((p["kernel"] != 0).sum()) for p in params.values()) <= budget
    first, last = acdc_phases(T)[0][0], acdc_phases(T)[-1][0]
    assert any(
        (np.asarray(a) != np.asarray(b)).any()
        for a, b in zip(live(masks_at[first]), live(masks_at[last]))
    )
    assert len(traces) == 1


def test_pruned_weights_re_enter_at_zero_and_all_moments_are_reset_at_decompression():
    tx = acdc(optax.sgd(0.05, momentum=0.9), 0.8, total_steps=T)
    params, state = mlp_params(), tx.init(mlp_params())
    step = make_step(tx, [])
    stop = acdc_phases(T)[0][1]  # first step of the first decompressed phase
    for t in range(stop):
        params, state = step(params, state, batch_at(t))
    before = params
    grads = jax.grad(mlp_loss)(params, batch_at(stop))
    params, state = step(params, state, batch_at(stop))
    trace = state.inner_state.inner[0].trace
    # the reset happened before the update: the new trace is this step's (now unmasked) gradient alone
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), trace, grads)
    for name in before:
        w0, w1, lr = before[name]["kernel"], params[name]["kernel"], 0.05
        pruned = np.asarray(w0 == 0)
        np.testing.assert_allclose(
            np.asarray(w1)[pruned], -lr * np.asarray(grads[name]["kernel"])[pruned], rtol=1e-6
        )
    assert all(bool(m.all()) for m in live(state.masks))


def test_no_decompressed_phases_equals_one_shot_magnitude_retraining():
    kw = dict(warmup=0.25, decompressed=0.0, cycles_end=1.0)
    tx = acdc(optax.adam(1e-2), 0.8, total_steps=T, **kw)
    start = acdc_phases(T, **kw)[0][0]
    ref = js.one_shot_pruning(optax.adam(1e-2), 0.8, scope="global", step=start)
    p1, s1, _, _ = run(tx, T)
    p2, s2, _, _ = run(ref, T)
    jax.tree.map(np.testing.assert_array_equal, s1.masks, s2.masks)
    # same masks at every step; params equal up to rounding (the two programs fuse the update differently)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p2)


def test_sharded_equals_unsharded():
    sharded_equals_unsharded(acdc(optax.sgd(0.05, momentum=0.9), 0.8, total_steps=8), 8)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(sparsity=0.8, total_steps=0), ValueError, "total_steps"),
        (dict(sparsity=1.2, total_steps=10), ValueError, "sparsity"),
        (dict(sparsity=0.8, total_steps=10, warmup=1.5), ValueError, "warmup"),
        (dict(sparsity=0.8, total_steps=10, scope="net"), ValueError, "scope"),
        (dict(sparsity=0.8, total_steps=10, compressed="x"), TypeError, "compressed"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        acdc.rule(**kwargs)


def test_rule_is_the_bare_mask_algorithm():
    algo = acdc.rule(0.5, 10)
    assert isinstance(algo, js.MaskAlgorithm) and algo.grows
    masks, _ = algo.init({"w": jnp.ones((4, 4))}, jax.random.PRNGKey(0))
    assert bool(masks["w"].all())
