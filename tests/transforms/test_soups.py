"""Sparse Model Soups / SWAMP: a soup of one is its ingredient and one ingredient is IMP, averaging keeps the mask's
zeros exactly, greedy soups never lose to the best ingredient, rewinding, one compilation, loud leaks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _invariants import batch_at, mlp_loss, mlp_params

import jaxsparse as js
from jaxsparse.transforms.soups import greedy_soup, soup, sparse_model_soups, swa_update

TRACES = []


def train(params, masks, i, steps=8):
    """Ingredient i: Adam inside the masks on its own batch order (fold_in of the index)."""
    TRACES.append(1)
    tx = js.fixed_masks(optax.adam(1e-2), masks)

    def step(t, carry):
        p, s = carry
        g = jax.grad(mlp_loss)(p, batch_at(t + 1000 * i))
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))[0]


def test_soup_of_one_is_its_ingredient_and_one_ingredient_is_imp():
    params = mlp_params()
    one = jax.tree.map(lambda x: x[None], params)
    jax.tree.map(np.testing.assert_array_equal, soup(one), params)
    res = sparse_model_soups(train, params, ingredients=1, rounds=2, fraction=0.5)
    # IMP without rewinding, by hand: prune 50% of the remaining by global magnitude, retrain, twice
    p, m = params, None
    for _ in range(2):
        m = js.imp_masks(p, m, 0.5)
        p = jax.jit(train)(js.apply_masks(p, m), m, jnp.int32(0))
    jax.tree.map(np.testing.assert_array_equal, res.masks, m)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), res.params, p)


def test_averaged_params_have_exactly_the_masks_zeros_and_one_compilation():
    TRACES.clear()
    res = sparse_model_soups(train, mlp_params(), ingredients=3, rounds=3, fraction=0.54)
    assert len(TRACES) == 1  # vmap over ingredients, same compiled program for every round
    n = sum(p["kernel"].size for p in mlp_params().values())
    kept = sum(int(m["kernel"].sum()) for m in res.masks.values())
    assert kept / n == pytest.approx(0.46**3, abs=0.01)
    for name, m in res.masks.items():
        w, stack = (
            np.asarray(res.params[name]["kernel"]),
            np.asarray(res.ingredients[name]["kernel"]),
        )
        mask = np.asarray(m["kernel"])
        assert (w[~mask] == 0).all() and (w[mask] != 0).mean() > 0.99
        assert not np.array_equal(stack[0], stack[1])  # the ingredients really differ
        np.testing.assert_allclose(w, stack.mean(0), rtol=1e-6)
        assert m["bias"] is None


def test_greedy_soup_is_at_least_the_best_ingredient():
    res = sparse_model_soups(train, mlp_params(), ingredients=3, rounds=1, fraction=0.5)
    evaluate = lambda p: -float(mlp_loss(p, batch_at(99)))
    best = max(evaluate(jax.tree.map(lambda x: x[i], res.ingredients)) for i in range(3))
    assert evaluate(greedy_soup(res.ingredients, evaluate)) >= best
    assert float(soup(res.ingredients, jnp.array([0.0, 1.0, 0.0]))["Dense_0"]["bias"][0]) == float(
        res.ingredients["Dense_0"]["bias"][1, 0]
    )
    with pytest.raises(ValueError, match="weights"):
        soup(res.ingredients, jnp.array([-1.0, 1.0, 1.0]))


def test_swamp_rewinds_each_round_and_swa_is_the_running_mean():
    params, theta0 = mlp_params(0), mlp_params(1)
    ident = lambda p, m, i: p
    res = sparse_model_soups(ident, params, ingredients=2, rounds=2, fraction=0.5, rewind_to=theta0)
    jax.tree.map(np.testing.assert_array_equal, res.params, js.apply_masks(theta0, res.masks))
    snaps = [jnp.array(x) for x in (1.0, 5.0, 6.0)]
    avg = jnp.array(0.0)
    for n, x in enumerate(snaps):
        avg = swa_update(avg, x, n)
    assert float(avg) == pytest.approx(4.0)


def test_a_train_that_leaks_outside_the_mask_is_an_error():
    with pytest.raises(ValueError, match="outside the masks"):
        sparse_model_soups(lambda p, m, i: jax.tree.map(jnp.ones_like, p), mlp_params(), rounds=1)
    with pytest.raises(ValueError, match="evaluate"):
        sparse_model_soups(train, mlp_params(), combine="greedy")
