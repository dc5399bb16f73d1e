"""Stacked (scanned) layers: a leaf of shape (layers, d_in, d_out) marked with a budget's ``layer_axis`` behaves
exactly as ``layers`` separate leaves — budgets, per-layer top-k, drop-and-grow and N:M act per layer slice."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsparse as js
from jaxsparse.transforms.growth import drop_and_grow

L, DIN, DOUT = 3, 16, 8


def _trees():
    ks = jax.random.split(jax.random.PRNGKey(0), L + 1)
    slices = [jax.random.normal(k, (DIN, DOUT)) for k in ks[:L]]
    head = jax.random.normal(ks[-1], (DOUT, 4))
    stacked = {"head": head, "layers": {"kernel": jnp.stack(slices)}}
    plain = {"head": head, **{f"layer{i}": {"kernel": s} for i, s in enumerate(slices)}}
    return stacked, plain


def _unstack(tree):
    return [tree["layers"]["kernel"][i] for i in range(L)]


AXIS = {"layers/": 0}


def test_erk_budget_uses_the_slice_shape():
    stacked, plain = _trees()
    s = js.budget(0.8, "erk", layer_axis=AXIS)(stacked)
    p = js.budget(0.8, "erk")(plain)
    assert s["layers"]["kernel"] == pytest.approx(p["layer0"]["kernel"], abs=1e-12)
    assert s["head"] == pytest.approx(p["head"], abs=1e-12)
    assert js.layer_axes(js.budget(0.8, layer_axis=AXIS), stacked) == {
        "head": None,
        "layers": {"kernel": 0},
    }
    assert js.layer_axes(js.budget(0.8), stacked) is None


def test_layer_axis_is_checked():
    stacked, _ = _trees()
    with pytest.raises(ValueError, match="layer_axis"):
        js.budget(0.5, layer_axis={"nothing/": 0})(stacked)  # a pattern that matches no leaf
    with pytest.raises(ValueError, match="layer_axis"):
        js.budget(0.5, layer_axis={"layers/": 3})(stacked)  # no such axis
    # a matched leaf whose layer slices are 1-D (a stacked bias) stays dense, as an unstacked bias would
    assert js.budget(0.5, layer_axis={"head": 0})(stacked)["head"] is None
    with pytest.raises(TypeError, match="layer_axis"):
        js.budget(0.5, layer_axis=0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_masks_per_layer_slice(scope):
    stacked, plain = _trees()
    ms = js.magnitude_masks(stacked, js.budget(0.7, layer_axis=AXIS), scope)
    mp = js.magnitude_masks(plain, js.budget(0.7), scope)
    for i, m in enumerate(_unstack(ms)):
        if scope == "layer":
            assert int(m.sum()) == js.keep_count(0.7, DIN * DOUT)
        np.testing.assert_array_equal(m, mp[f"layer{i}"]["kernel"])


def test_random_masks_and_static_sparse_count_per_slice():
    stacked, _ = _trees()
    b = js.budget(0.75, layer_axis=AXIS)
    for m in _unstack(js.random_masks(jax.random.PRNGKey(3), stacked, b)):
        assert int(m.sum()) == js.keep_count(0.75, DIN * DOUT)
    state = js.static_sparse(optax.sgd(0.1), b).init(stacked)
    assert [int(m.sum()) for m in _unstack(state.masks)] == [js.keep_count(0.75, DIN * DOUT)] * L


def test_drop_and_grow_per_slice_equals_separate_leaves():
    stacked, plain = _trees()
    masks_p = js.magnitude_masks(plain, js.budget(0.5))
    masks_s = {
        "head": masks_p["head"],
        "layers": {"kernel": jnp.stack([masks_p[f"layer{i}"]["kernel"] for i in range(L)])},
    }
    g_p = jax.tree.map(lambda x: jnp.abs(jnp.cos(3.0 * x)), plain)
    g_s = jax.tree.map(lambda x: jnp.abs(jnp.cos(3.0 * x)), stacked)
    new_p = drop_and_grow(masks_p, plain, g_p, 0.3)
    new_s = drop_and_grow(masks_s, stacked, g_s, 0.3, layer_axes=(None, 0))
    for i, m in enumerate(_unstack(new_s)):
        np.testing.assert_array_equal(m, new_p[f"layer{i}"]["kernel"])
    # without the layer axis the stacked leaf is one big leaf: its slices' counts drift apart
    whole = drop_and_grow(masks_s, stacked, g_s, 0.3)
    assert int(whole["layers"]["kernel"].sum()) == int(masks_s["layers"]["kernel"].sum())


def _train(tx, params, steps, grad_fn):
    state = tx.init(params)
    params = js.apply_masks(params, state.masks)
    step = jax.jit(tx.update)
    for t in range(steps):
        updates, state = step(grad_fn(params, t), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("method", ["rigl", "set", "gmp"])
def test_training_keeps_per_slice_counts(method):
    stacked, _ = _trees()
    b = js.budget(0.75, layer_axis=AXIS)
    if method == "rigl":
        tx = js.rigl(optax.adam(1e-2), b, update_every=2, total_steps=12)
    elif method == "set":
        tx = js.set_training(optax.adam(1e-2), b, update_every=2, total_steps=12)
    else:
        tx = js.gradual_magnitude_pruning(optax.adam(1e-2), b, 0, 8, 2)
    grad_fn = lambda p, t: jax.tree.map(lambda x: jnp.sin(x * (t + 1)), p)  # noqa: E731
    params, state = _train(tx, stacked, 10, grad_fn)
    keep = js.keep_count(0.75, DIN * DOUT)
    for i, m in enumerate(_unstack(state.masks)):
        assert int(m.sum()) == keep, (i, int(m.sum()))
        assert not np.asarray(params["layers"]["kernel"][i])[~np.asarray(m)].any()


def test_nm_masks_act_per_layer_slice():
    stacked, _ = _trees()
    w = stacked["layers"]["kernel"]
    got = js.nm_masks({"w": w}, 2, 4)["w"]
    for i in range(L):
        np.testing.assert_array_equal(got[i], js.nm_mask(jnp.abs(w[i]), 2, 4, axis=-2))


def test_linen_nn_scan_model():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jnp.tanh(nn.Dense(DIN)(x)), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L
            )
            x, _ = scan(name="blocks")(x, None)
            return nn.Dense(4, name="head")(x)

    model, x = Model(), jnp.ones((2, DIN))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    assert params["blocks"]["Dense_0"]["kernel"].shape == (L, DIN, DIN)
    b = js.budget(0.5, layer_axis={"blocks/": 0})
    loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)  # noqa: E731
    params, state = _train(
        js.rigl(optax.adam(1e-2), b, update_every=1, total_steps=8),
        params,
        4,
        lambda p, t: jax.grad(loss)(p),
    )
    masks = state.masks["blocks"]["Dense_0"]["kernel"]
    assert [int(masks[i].sum()) for i in range(L)] == [js.keep_count(0.5, DIN * DIN)] * L


def test_nnx_scan_model():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(DIN, DIN, rngs=rngs)

    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return Block(nnx.Rngs(key))

    blocks = make(jax.random.split(jax.random.PRNGKey(0), L))
    params = nnx.state(blocks, nnx.Param)
    kernel = params["lin"]["kernel"]
    assert kernel.shape == (L, DIN, DIN)
    b = js.budget(0.5, layer_axis={"lin/kernel": 0})
    tx = js.rigl(optax.adam(1e-2), b, update_every=1, total_steps=8)
    state = tx.init(params)
    m = state.masks["lin"]["kernel"]
    assert [int(m[i].sum()) for i in range(L)] == [js.keep_count(0.5, DIN * DIN)] * L

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
        return jnp.tanh(block.lin(x))

    x = jnp.ones((2, DIN))
    graphdef, _ = nnx.split(blocks)
    plain = js.apply_masks(jax.tree.map(lambda v: v, nnx.state(blocks, nnx.Param)), state.masks)

    def loss(p):
        return jnp.sum(forward(x, nnx.merge(graphdef, p)) ** 2)

    grads = jax.grad(loss)(plain)
    updates, state = jax.jit(tx.update)(grads, state._replace(step=jnp.ones((), jnp.int32)), plain)
    m = state.masks["lin"]["kernel"]
    assert [int(m[i].sum()) for i in range(L)] == [js.keep_count(0.5, DIN * DIN)] * L
