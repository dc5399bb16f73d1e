"""Non-finite gradients, weights and scores never corrupt masks (issue: "nothing fails silently", failure 3).

* the wrapper: a step whose gradient holds a NaN or an infinity runs no mask rule and leaves the algorithm's
  state (SNFS's EMA) unchanged; a non-finite weight outside the masks is an explicit error;
* the rules themselves: NaN/Inf scores can never make growth land on a kept connection or the drop keep an
  inactive one, so counts stay exact;
* property: nnz is invariant under random NaN/Inf injection for every DST algorithm, with sgd, adam and adamw,
  on float32 and bfloat16.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse.transforms.growth import drop_and_grow, drop_scores, prune_and_regrow

KEY = jax.random.PRNGKey(0)
POISON = (jnp.nan, jnp.inf, -jnp.inf)


def _nnz(masks):
    return [int(m.sum()) for m in jax.tree.leaves(masks)]


def _rule(name):
    """The algorithm's MaskAlgorithm (``transform.rule``), updating masks on every step."""
    common = dict(update_every=1, drop_fraction=0.5, decay="constant", end_step=100)
    if name == "static":
        return js.static_sparse.rule(0.5)
    if name == "set":
        return js.set_training.rule(0.5, **common)
    if name == "rigl":
        return js.rigl.rule(0.5, **common)
    if name == "snfs":
        return js.snfs.rule(0.5, **common)
    return js.granet.rule(
        0.5,
        initial_sparsity=0.5,
        update_every=1,
        drop_fraction=0.5,
        prune_end_step=50,
        regrow_end_step=100,
    )


def _dst(name, inner):
    return js.sparse_training(inner, _rule(name))


# ------------------------------------------------------------------------------------------------ failure 3
def test_rigl_all_nan_gradient_on_update_step_keeps_nnz():
    """Failure 3a: one all-NaN gradient on an update step took an 8x8 layer at 50% from 32 to 23 weights."""
    params = {"w": jax.random.normal(KEY, (8, 8))}
    tx = js.rigl(optax.sgd(1e-2), 0.5, update_every=1, total_steps=100)
    state = tx.init(params)
    step = jax.jit(tx.update)
    params = js.apply_masks(params, state.masks)
    before = state.masks["w"]
    _, state = step({"w": jnp.full((8, 8), jnp.nan)}, state, params)  # NaN updates are not applied
    np.testing.assert_array_equal(state.masks["w"], before)  # the rule did not run on NaN
    for t in range(3):  # and later finite updates still conserve the count
        updates, state = step({"w": jnp.cos(params["w"] + t)}, state, params)
        params = optax.apply_updates(params, updates)
        assert int(state.masks["w"].sum()) == 32


def test_snfs_nan_gradient_leaves_momentum_ema_unchanged():
    """Failure 3b: SNFS's momentum EMA stayed NaN for ever after one NaN gradient."""
    params = {"a": jax.random.normal(KEY, (8, 8)), "b": jax.random.normal(KEY, (8, 4))}
    tx = js.snfs(optax.sgd(0.0), 0.5, update_every=2, total_steps=100)
    state = tx.init(params)
    params = js.apply_masks(params, state.masks)
    step = jax.jit(tx.update)
    _, state = step(jax.tree.map(jnp.ones_like, params), state, params)  # sgd(0): params unchanged
    ema = state.extra
    _, state = step(jax.tree.map(lambda p: jnp.full_like(p, jnp.inf), params), state, params)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(state.extra)):
        np.testing.assert_array_equal(a, b)
    _, state = step(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(bool(jnp.isfinite(e).all()) for e in jax.tree.leaves(state.extra))
    assert sum(_nnz(state.masks)) == 48


def test_granet_nan_gradient_on_update_step_keeps_masks():
    """Failure 3c: GraNet regrew through the same NaN growth path."""
    params = {"w": jax.random.normal(KEY, (8, 8))}
    tx = _dst("granet", optax.sgd(1e-2))
    state = tx.init(params)
    params = js.apply_masks(params, state.masks)
    before = state.masks["w"]
    _, state = jax.jit(tx.update)({"w": jnp.full((8, 8), jnp.nan)}, state, params)
    np.testing.assert_array_equal(state.masks["w"], before)


def test_prune_and_regrow_nan_grow_scores_never_land_on_kept():
    """The rule itself: NaN grow scores used to rank below the -inf that excludes kept positions."""
    masks = {"w": jnp.arange(64).reshape(8, 8) % 2 == 0}
    params = {"w": jnp.where(masks["w"], jax.random.normal(KEY, (8, 8)), 0.0)}
    grow = {"w": jnp.full((8, 8), jnp.nan)}
    new, kept = prune_and_regrow(masks, drop_scores(params, masks), {"w": 24}, grow, {"w": 8})
    assert int(kept["w"].sum()) == 24 and int(new["w"].sum()) == 32
    assert not bool((kept["w"] & ~masks["w"]).any())


def test_drop_scores_nan_weight_is_dropped_first_and_count_exact():
    masks = {"w": jnp.ones((4, 4), bool).at[0].set(False)}
    w = jax.random.normal(KEY, (4, 4)).at[1, 1].set(jnp.nan).at[2, 2].set(jnp.inf)
    new = drop_and_grow(masks, {"w": w}, {"w": jnp.full((4, 4), jnp.nan)}, 0.25)
    assert int(new["w"].sum()) == 12
    assert not bool(new["w"][1, 1]) or bool(new["w"][0].any())  # the NaN weight goes, or is regrown
    assert bool(new["w"][2, 2])  # +inf magnitude is the largest: kept


def test_magnitude_masks_nan_inside_nested_masks_never_regrows():
    """GraNet's pruning step: a NaN weight inside the masks used to rank below pruned (-inf) positions."""
    masks = {"w": jnp.array([True, True, True, False, False, False])}
    w = {"w": jnp.array([jnp.nan, 1.0, 2.0, 0.0, 0.0, 0.0])}
    new = js.magnitude_masks(w, {"w": 0.5}, masks=masks)
    assert new["w"].tolist() == [True, True, True, False, False, False]
    new = js.magnitude_masks(w, {"w": 4 / 6}, masks=masks)
    assert new["w"].tolist() == [False, True, True, False, False, False]


def test_pruned_inf_weight_is_an_explicit_error():
    """Failure 3d: pruning an inf weight silently left NaN (p + (-p)); now the next step raises."""
    params = {"w": jnp.array([[jnp.inf, 1.0], [2.0, 3.0]])}
    tx = js.fixed_masks(optax.sgd(0.1), {"w": jnp.array([[False, True], [True, True]])})
    state = tx.init(params)
    step = jax.jit(tx.update)
    grads = {"w": jnp.ones((2, 2))}
    with pytest.raises(Exception, match="pruned weight is inf/NaN"):
        for _ in range(2):
            updates, state = step(grads, state, params)
            params = optax.apply_updates(params, updates)
        jax.block_until_ready(params)


# ------------------------------------------------------------------------------------------------ properties
ALGOS = ("static", "set", "rigl", "snfs", "granet")
OPTS = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw}
CONFIGS = [(opt, dtype) for opt in OPTS for dtype in (jnp.float32, jnp.bfloat16)]
STEPS = 4


@functools.cache
def _runner(algo):
    """One compiled program per algorithm running STEPS steps of every (optimizer, dtype) configuration, each
    inner optimizer wrapped in apply_if_finite; the poison is an input, so examples reuse the program."""
    base = {
        "a": jax.random.normal(KEY, (8, 8)),
        "b": jax.random.normal(jax.random.PRNGKey(1), (8, 4)),
    }
    txs = [
        _dst(algo, optax.apply_if_finite(OPTS[opt](1e-2), max_consecutive_errors=10**6))
        for opt, _ in CONFIGS
    ]
    starts = []
    for tx, (_, dtype) in zip(txs, CONFIGS):
        params = jax.tree.map(lambda p, dtype=dtype: p.astype(dtype), base)
        starts.append((params, tx.init(params)))

    def one(tx, dtype, params, state, hits, values):
        def body(carry, xs):
            params, state = carry
            grads = jax.tree.map(lambda p: jnp.cos(p.astype(jnp.float32)), params)
            grads = jax.tree.map(lambda g, h, v: jnp.where(h, v, g).astype(dtype), grads, *xs)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), [jnp.sum(m) for m in jax.tree.leaves(state.masks)]

        (params, state), counts = jax.lax.scan(body, (params, state), (hits, values))
        return params, state, jnp.stack(counts, axis=1)

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(starts, hits, values):  # a tiny program run once: XLA's cheapest compile
        return [
            one(tx, dtype, params, state, hits, values)
            for tx, (_, dtype), (params, state) in zip(txs, CONFIGS, starts)
        ]

    return starts, run


def _poison(rng, shape):
    """Per step: which gradient entries are replaced (on about 60% of the steps) and by NaN, inf or -inf."""
    hits = np.zeros((STEPS, *shape), bool)
    for t in range(STEPS):
        if rng.random() < 0.6:
            hits[t] = rng.random(shape) < rng.choice([0.05, 0.5, 1.0])
    values = rng.choice(np.array(POISON, np.float32), size=(STEPS, *shape))
    return hits, values


@pytest.mark.parametrize("algo", ALGOS)
@hypothesis.settings(max_examples=3)
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_nnz_invariant_under_nan_inf_injection(algo, seed):
    """sgd, adam and adamw on float32 and bfloat16 (all in one program per algorithm)."""
    starts, run = _runner(algo)
    rng = np.random.default_rng(seed)
    (ha, va), (hb, vb) = _poison(rng, (8, 8)), _poison(rng, (8, 4))
    results = run(starts, {"a": ha, "b": hb}, {"a": va, "b": vb})
    for (opt, dtype), (_, state0), (params, state, counts) in zip(CONFIGS, starts, results):
        before, counts = _nnz(state0.masks), np.asarray(counts)  # counts: (steps, leaves)
        if algo == "snfs":  # regrowth moves across leaves; the network total is conserved
            assert (counts.sum(1) == sum(before)).all(), (opt, dtype)
        else:
            assert (counts == np.array(before)).all(), (opt, dtype)
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(state.masks)):
            assert bool(jnp.isfinite(p.astype(jnp.float32)).all()), (opt, dtype)
            assert int(jnp.sum((p != 0) & ~m)) == 0, (opt, dtype)


@pytest.mark.parametrize("algo", ["set", "rigl", "snfs", "granet"])
@hypothesis.settings(max_examples=4)
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_rule_counts_exact_with_nan_inf_in_weights_grads_and_momentum(algo, seed):
    """The mask rules alone (no wrapper guard): non-finite weights, gradients and EMA keep counts exact."""
    rule, params, masks, extra, update = _rule_runner(algo)
    rng = np.random.default_rng(seed)

    def poison(x):
        hit = rng.random(x.shape) < rng.choice([0.1, 0.5, 1.0])
        return jnp.where(hit, rng.choice(np.array(POISON, np.float32), size=x.shape), x)

    none = lambda x: x is None  # noqa: E731
    ctx = js.MaskContext(
        masks,
        jax.tree.map(poison, params),
        jax.tree.map(lambda p: poison(jnp.cos(p)), params),
        jnp.int32(1),
        KEY,
        jax.tree.map(lambda e: None if e is None else poison(e), extra, is_leaf=none),
    )
    new = update(ctx)
    before, after = _nnz(masks), _nnz(new)
    assert (sum(after) == sum(before)) if algo == "snfs" else (after == before)


@functools.cache
def _rule_runner(algo):
    params = {"a": jax.random.normal(KEY, (8, 8)), "b": jax.random.normal(KEY, (8, 4))}
    rule = _rule(algo)
    masks, extra = rule.init(params, KEY)
    return rule, params, masks, extra, jax.jit(lambda ctx: rule.update(ctx)[0])
