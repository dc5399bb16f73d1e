"""sr_ste_decay: the SR-STE term, its reduction to STE at lambda = 0, composition with optimizers, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsparse.estimators import nm_masks, ste_nm
from jaxsparse.transforms.nm import sr_ste_decay


def _problem():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "dense": {"kernel": jax.random.normal(k[0], (8, 4)), "bias": jnp.zeros(4)},
        "conv": jax.random.normal(k[1], (3, 3, 4, 2)),
    }
    x = jax.random.normal(k[2], (16, 8))
    y = jax.random.normal(k[3], (16, 4))

    def loss(p):
        q = ste_nm(p, 2, 4)
        return jnp.mean((x @ q["dense"]["kernel"] + q["dense"]["bias"] - y) ** 2) + 0.1 * jnp.sum(
            q["conv"] ** 2
        )

    return params, loss


def _train(tx, params, loss, steps=4):
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    return params


def test_term_is_lambda_w_on_pruned_and_zero_on_kept():
    params, loss = _problem()
    tx = sr_ste_decay(2, 4, decay=0.3)
    g = jax.tree.map(jnp.zeros_like, params)
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    masks = nm_masks(params, 2, 4)
    for key in ("conv",):
        assert (u[key] == jnp.where(masks[key], 0.0, jnp.float32(0.3) * params[key])).all()
    k = params["dense"]["kernel"]
    assert (
        u["dense"]["kernel"] == jnp.where(masks["dense"]["kernel"], 0.0, jnp.float32(0.3) * k)
    ).all()
    assert (u["dense"]["bias"] == 0).all()  # not prunable: untouched


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
def test_lambda_zero_equals_plain_ste(name):
    inner = {
        "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
        "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-3),
    }[name]
    params, loss = _problem()
    a = _train(optax.chain(sr_ste_decay(2, 4, decay=0.0), inner()), params, loss)
    b = _train(inner(), params, loss)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if name == "sgd_momentum":
            assert (x == y).all()
        else:  # the two programs fuse Adam's arithmetic differently: equal up to float32 rounding
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_decay_shrinks_pruned_weights_and_passes_through_momentum():
    params, loss = _problem()
    a = _train(optax.chain(sr_ste_decay(2, 4, decay=1.0), optax.sgd(0.05)), params, loss, steps=1)
    b = _train(optax.sgd(0.05), params, loss, steps=1)
    masks = nm_masks(params, 2, 4)
    pruned = ~masks["conv"]
    # one SGD step: a = b - lr * lambda * w on pruned coordinates, identical elsewhere
    assert np.allclose(a["conv"][pruned], (b["conv"] - 0.05 * params["conv"])[pruned], atol=1e-6)
    assert (a["conv"][~pruned] == b["conv"][~pruned]).all()


def test_transposable_and_where_options():
    params = {"w": jax.random.normal(jax.random.PRNGKey(1), (8, 8)), "v": jnp.ones((8, 8))}
    tx = sr_ste_decay(2, 4, decay=1.0, transposable=True, where={"w": True, "v": False})
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert (u["v"] == 0).all()
    kept = u["w"] == 0
    assert (kept.reshape(2, 4, 8).sum(1) == 2).all() and (kept.reshape(8, 2, 4).sum(2) == 2).all()


def test_bad_input():
    with pytest.raises(
        ValueError, match=r"`decay` \(SR-STE's lambda\) must be a finite float >= 0; got -0.1"
    ):
        sr_ste_decay(2, 4, decay=-0.1)
    with pytest.raises(TypeError, match="`decay` must be a float"):
        sr_ste_decay(2, 4, decay="big")
    with pytest.raises(ValueError, match=r"`n` must be <= `m`; got n=3, m=2"):
        sr_ste_decay(3, 2)
    with pytest.raises(ValueError, match=r"`m` must be <= 16; got m=17"):
        sr_ste_decay(1, 17)
    tx = sr_ste_decay()
    with pytest.raises(ValueError, match="needs `params`"):
        tx.update({"w": jnp.ones((4, 4))}, tx.init(None))
    with pytest.raises(ValueError, match=r"'w'.*length 6.*not divisible by m=4"):
        tx.update({"w": jnp.ones((6, 4))}, tx.init(None), {"w": jnp.ones((6, 4))})
