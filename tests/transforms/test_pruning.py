"""Gradual magnitude pruning follows the closed-form schedule exactly; one-shot pruning and IMP helpers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse.lottery import imp_masks


def params_tree(key=0):
    k = jax.random.split(jax.random.PRNGKey(key), 3)
    return {
        "a": jax.random.normal(k[0], (24, 16)),
        "b": jax.random.normal(k[1], (16, 10)),
        "bias": jnp.zeros(10),
    }


def noisy_grads(params, t):
    return jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(t), p.shape) * 0.1, params)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gmp_sparsity_equals_schedule_at_every_step(scope):
    s_f, t0, t1, dt, s_i = 0.9, 3, 23, 5, 0.2
    tx = js.gradual_magnitude_pruning(
        optax.sgd(0.05), s_f, t0, t1, dt, initial_sparsity=s_i, scope=scope
    )
    params = params_tree()
    state = tx.init(params)
    step = jax.jit(
        lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p))
    )
    prev = None
    for t in range(30):
        params, state = step(params, state, noisy_grads(params, t))
        tq = t0 + (min(max(t, t0), t1) - t0) // dt * dt
        s_t = s_f + (s_i - s_f) * (1 - (tq - t0) / (t1 - t0)) ** 3  # closed form, in doubles
        nnz = {k: int(state.masks[k].sum()) for k in ("a", "b")}
        expected = {k: params[k].size - math.floor(s_t * params[k].size) for k in nnz}
        # the schedule is traced float32, so a count may round one weight off the double-precision closed form
        if scope == "layer":
            assert all(abs(nnz[k] - expected[k]) <= 1 for k in nnz), (t, nnz, expected)
        else:
            assert abs(sum(nnz.values()) - sum(expected.values())) <= 2, (t, nnz, expected)
        if prev is not None:  # nested: nothing pruned ever comes back
            assert all(bool(jnp.all(state.masks[k] <= prev[k])) for k in nnz)
        prev = state.masks
        assert int((params["a"] != 0).sum()) <= nnz["a"]
    assert state.masks["bias"] is None


def test_gmp_layer_prunes_smallest_magnitudes():
    params = params_tree()
    tx = js.gradual_magnitude_pruning(optax.sgd(0.0), 0.5, 0, 0, 1)
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    kept, dropped = jnp.abs(params["a"])[state.masks["a"]], jnp.abs(params["a"])[~state.masks["a"]]
    assert float(kept.min()) >= float(dropped.max())


def test_gmp_erk_keeps_budget_proportions():
    params = params_tree()
    budget = js.budget(0.8, "erk")
    finals = budget(params)
    tx = js.gradual_magnitude_pruning(optax.sgd(0.0), budget, 0, 10, 5)
    state = tx.init(params)
    for _t in range(11):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
    for k in ("a", "b"):
        assert int(state.masks[k].sum()) == params[k].size - math.floor(finals[k] * params[k].size)


def test_one_shot_methods_match_pure_functions():
    params = params_tree()
    loss = lambda p, x: jnp.sum((x @ p["a"] @ p["b"]) ** 2)
    x = jax.random.normal(jax.random.PRNGKey(9), (4, 24))
    grads = jax.grad(loss)(params, x)
    for method, expected in [
        ("magnitude", js.magnitude_masks(params, 0.7)),
        ("snip", js.snip_masks(loss, params, x, 0.7, scope="layer")),
    ]:
        tx = js.one_shot_pruning(optax.sgd(0.0), 0.7, method=method, step=0)
        _, state = tx.update(grads, tx.init(params), params)
        for k in ("a", "b"):
            np.testing.assert_array_equal(state.masks[k], expected[k])
    tx = js.one_shot_pruning(optax.sgd(0.0), 0.7, method="random", step=2)
    state = tx.init(params)
    for t in range(3):
        _, state = tx.update(grads, state, params)
        assert int(state.masks["a"].sum()) == (384 if t < 2 else 384 - math.floor(0.7 * 384))


def test_snip_matches_linear_least_squares_closed_form():
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 6))
    y = jax.random.normal(jax.random.PRNGKey(1), (32, 3))
    w = jax.random.normal(jax.random.PRNGKey(2), (6, 3))
    loss = lambda p, b: 0.5 * jnp.mean(jnp.sum((b[0] @ p["w"] - b[1]) ** 2, axis=1))
    score = jnp.abs(w * (x.T @ (x @ w - y)) / 32)
    np.testing.assert_array_equal(
        js.snip_masks(loss, {"w": w}, (x, y), 0.5, "layer")["w"], js.topk_mask(score, 9)
    )
    # invariant to a positive rescaling of the loss
    scaled = lambda p, b: 7.0 * loss(p, b)
    np.testing.assert_array_equal(
        js.snip_masks(scaled, {"w": w}, (x, y), 0.5)["w"],
        js.snip_masks(loss, {"w": w}, (x, y), 0.5)["w"],
    )


def test_imp_rounds_nested_and_rewind_exact():
    theta0 = params_tree(1)
    params = jax.tree.map(lambda p: p * 1.7 + 0.1, theta0)  # "trained" weights
    masks = {"a": jnp.ones((24, 16), bool), "b": jnp.ones((16, 10), bool), "bias": None}
    total = 24 * 16 + 16 * 10
    nnz = total
    for _r in range(1, 6):
        new = imp_masks(params, masks, 0.2)
        assert all(bool(jnp.all(new[k] <= masks[k])) for k in ("a", "b"))
        nnz = nnz - math.ceil(0.2 * nnz)
        assert sum(int(new[k].sum()) for k in ("a", "b")) == nnz
        masks = new
        params = js.apply_masks(theta0, masks)
        np.testing.assert_array_equal(params["a"], jnp.where(masks["a"], theta0["a"], 0.0))
    assert 1 - nnz / total == pytest.approx(1 - 0.8**5, abs=5 / total)


def test_fixed_masks_train_inside_the_mask():
    params = params_tree()
    masks = js.random_masks(jax.random.PRNGKey(5), params, 0.6)
    tx = js.fixed_masks(optax.adamw(0.01, weight_decay=0.1), masks)
    state = tx.init(params)
    for t in range(3):
        u, state = tx.update(noisy_grads(params, t), state, params)
        params = optax.apply_updates(params, u)
    for k in ("a", "b"):
        np.testing.assert_array_equal(params[k] != 0, masks[k])
    with pytest.raises(ValueError, match="same tree structure"):
        js.fixed_masks(optax.sgd(0.1), {"a": masks["a"]}).init(params)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (
            lambda: js.gradual_magnitude_pruning(optax.sgd(0.1), 1.0, 0, 10),
            ValueError,
            r"`sparsity` must be in \[0, 1\)",
        ),
        (
            lambda: js.gradual_magnitude_pruning(optax.sgd(0.1), 0.5, 10, 5),
            ValueError,
            "ends before it begins",
        ),
        (
            lambda: js.gradual_magnitude_pruning(optax.sgd(0.1), 0.5, 0, 10, frequency=0),
            ValueError,
            "`frequency` must be >= 1",
        ),
        (
            lambda: js.gradual_magnitude_pruning(optax.sgd(0.1), 0.5, 0, 10, scope="net"),
            ValueError,
            "`scope` must be one of",
        ),
        (
            lambda: js.one_shot_pruning(optax.sgd(0.1), 0.5, method="taylor"),
            ValueError,
            "`method` must be one of",
        ),
        (
            lambda: imp_masks({"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2), bool)}, 1.5),
            ValueError,
            "`fraction`",
        ),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
