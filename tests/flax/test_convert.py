"""Masked dense <-> compressed conversion (bit-exact, NNX and Linen), orbax round trips, bad input."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsparse
from jaxsparse import checkpoint
from jaxsparse.flax import convert
from jaxsparse.flax.linen import BlockSparseDense, NMDense
from jaxsparse.flax.nnx import BlockSparseLinear, NMLinear, SparsePattern


def _block_mask(key, grid, block, p=0.5):
    return jnp.kron(jax.random.bernoulli(key, p, grid), jnp.ones(block)).astype(bool)


class DenseMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="fc2")(jax.nn.relu(nn.Dense(16, name="fc1")(x)))


class BlockMLP(nn.Module):
    caps: tuple = (3, 4)

    @nn.compact
    def __call__(self, x):
        h = BlockSparseDense(16, block=(4, 4), capacity=self.caps[0], name="fc1")(x)
        return BlockSparseDense(8, block=(4, 4), capacity=self.caps[1], name="fc2")(jax.nn.relu(h))


class NMMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return NMDense(8, name="fc2")(jax.nn.relu(NMDense(16, name="fc1")(x)))


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_linen_block_round_trip_from_a_jaxsparse_algorithm(tmp_path):
    x = jax.random.normal(jax.random.key(0), (4, 8))
    params = DenseMLP().init(jax.random.key(1), x)["params"]
    masks = {
        "fc1": {"kernel": _block_mask(jax.random.key(2), (2, 4), (4, 4)), "bias": None},
        "fc2": {"kernel": _block_mask(jax.random.key(3), (4, 2), (4, 4), 0.7), "bias": None},
    }
    # Train with a jaxsparse wrapper: its params are masked dense, its state holds the masks.
    tx = jaxsparse.fixed_masks(optax.sgd(0.1), masks)
    state = tx.init(params)
    grads = jax.grad(lambda p: jnp.sum(DenseMLP().apply({"params": p}, x) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    caps = {"fc1": 5, "fc2": 8}
    cparams, pattern = convert.compress(
        params, state.masks, format="block", block=(4, 4), capacity=caps
    )
    dense, dmasks = convert.decompress(cparams, pattern)
    _assert_trees_equal(dense, jax.tree.map(lambda a: a, dict(params)))
    for layer in ("fc1", "fc2"):
        np.testing.assert_array_equal(dmasks[layer]["kernel"], state.masks[layer]["kernel"])
        assert dmasks[layer]["bias"] is None
    # The compressed tree is exactly a BlockSparseDense model's variables, with the same outputs.
    model = BlockMLP(caps=(5, 8))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, {"params": cparams, "sparse_pattern": pattern}) == jax.tree.map(
        jnp.shape, shapes
    )
    y = model.apply({"params": cparams, "sparse_pattern": pattern}, x)
    np.testing.assert_allclose(y, DenseMLP().apply({"params": params}, x), rtol=1e-5, atol=1e-5)
    # Orbax round trip of the compressed variables, bit-exact, plus a readable layout.
    variables = {"params": cparams, "sparse_pattern": pattern}
    checkpoint.save(tmp_path / "c", variables)
    back = checkpoint.restore(tmp_path / "c", jax.eval_shape(lambda: variables))
    _assert_trees_equal(back, variables)
    desc = json.load(open(tmp_path / "c" / "layout.json"))
    assert (
        desc["layers"]["fc1"]["format"] == "block_sparse" and desc["layers"]["fc1"]["capacity"] == 5
    )
    assert desc["layers"]["fc1"]["arrays"]["col_ptr"] == "sparse_pattern/fc1/pattern/col_ptr"


def test_nm_round_trip_linen_and_nnx():
    x = jax.random.normal(jax.random.key(0), (4, 8))
    params = DenseMLP().init(jax.random.key(1), x)["params"]
    from jaxsparse.nm_compression import one_shot_nm

    pruned = one_shot_nm({k: {"kernel": v["kernel"]} for k, v in params.items()}, 2, 4)
    masks = {k: {"kernel": pruned[k]["kernel"] != 0, "bias": None} for k in params}
    cparams, pattern = convert.compress(params, masks, format="nm", n=2, m=4)
    dense, _ = convert.decompress(cparams, pattern)
    for k in params:
        np.testing.assert_array_equal(dense[k]["kernel"], pruned[k]["kernel"])
    y = NMMLP().apply({"params": cparams, "sparse_pattern": pattern}, x)
    np.testing.assert_allclose(y, DenseMLP().apply({"params": dense}, x), rtol=1e-5, atol=1e-5)


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs), nnx.Linear(16, 8, rngs=rngs)])

    def __call__(self, x):
        return self.blocks[1](jax.nn.relu(self.blocks[0](jax.nn.relu(self.fc1(x)))))


@pytest.mark.parametrize("fmt", ["block", "nm"])
def test_nnx_model_round_trip_and_checkpoint(fmt, tmp_path):
    model = NNXModel(nnx.Rngs(0))
    masks = jax.tree.map(lambda _: None, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    if fmt == "block":
        masks["fc1"]["kernel"] = _block_mask(jax.random.key(1), (2, 4), (4, 4))
        masks["blocks"][1]["kernel"] = _block_mask(jax.random.key(2), (4, 2), (4, 4))
        kw = dict(block=(4, 4))
    else:

        def nm_mask(w, n, m):  # groups of m along the input axis, ranked by |w|
            return jaxsparse.nm_mask(jnp.abs(w), n, m, axis=0)

        masks["fc1"]["kernel"] = nm_mask(model.fc1.kernel[...], 2, 4)
        masks["blocks"][1]["kernel"] = nm_mask(model.blocks[1].kernel[...], 3, 4)
        with pytest.raises(ValueError, match=r"'blocks/1/kernel': the mask is not 2:4"):
            convert.to_sparse_nnx(model, masks, format="nm", n=2, m=4)
        masks["blocks"][1]["kernel"] = nm_mask(model.blocks[1].kernel[...], 2, 4)
        kw = dict(n=2, m=4)
    sparse = convert.to_sparse_nnx(model, masks, format=fmt, impl="xla", **kw)
    kind = BlockSparseLinear if fmt == "block" else NMLinear
    assert isinstance(sparse.fc1, kind) and isinstance(sparse.blocks[1], kind)
    assert isinstance(sparse.blocks[0], nnx.Linear) and isinstance(
        model.fc1, nnx.Linear
    )  # input untouched
    masked = jaxsparse.apply_masks(nnx.to_pure_dict(nnx.state(model, nnx.Param)), masks)
    back = convert.to_dense_nnx(sparse)
    _assert_trees_equal(nnx.to_pure_dict(nnx.state(back, nnx.Param)), masked)
    x = jax.random.normal(jax.random.key(3), (2, 8))
    np.testing.assert_allclose(sparse(x), back(x), rtol=1e-5, atol=1e-5)
    # Checkpoint the compressed model and restore it into a freshly built one.
    checkpoint.save(tmp_path / "m", nnx.state(sparse))
    fresh = convert.to_sparse_nnx(
        NNXModel(nnx.Rngs(9)), masks if fmt == "nm" else masks, format=fmt, **kw
    )
    restored = checkpoint.restore(tmp_path / "m", nnx.state(fresh))
    nnx.update(fresh, restored)
    _assert_trees_equal(nnx.to_pure_dict(nnx.state(fresh)), nnx.to_pure_dict(nnx.state(sparse)))


def test_training_state_checkpoint_and_mismatches(tmp_path):
    model = nnx.Module()
    model.fc = BlockSparseLinear(8, 16, block=(4, 4), capacity=5, rngs=nnx.Rngs(0))
    model.nm = NMLinear(16, 8, rngs=nnx.Rngs(1))
    _, params, pattern = nnx.split(model, nnx.Param, SparsePattern)
    tx = optax.adamw(1e-3)
    state = {"params": params, "pattern": pattern, "opt": tx.init(params), "step": jnp.int32(7)}
    checkpoint.save(tmp_path / "s", state)
    _assert_trees_equal(checkpoint.restore(tmp_path / "s", state), state)
    with pytest.raises(ValueError, match="already exists"):
        checkpoint.save(tmp_path / "s", state)

    def other(**kw):
        m = nnx.Module()
        m.fc = BlockSparseLinear(8, 16, **{"block": (4, 4), "capacity": 5, **kw}, rngs=nnx.Rngs(0))
        m.nm = NMLinear(16, 8, rngs=nnx.Rngs(1))
        _, p, s = nnx.split(m, nnx.Param, SparsePattern)
        return {"params": p, "pattern": s, "opt": tx.init(p), "step": jnp.int32(0)}

    with pytest.raises(
        ValueError, match=r"layer 'fc': checkpoint has capacity=5, the target layer has capacity=6"
    ):
        checkpoint.restore(tmp_path / "s", other(capacity=6))
    with pytest.raises(ValueError, match=r"layer 'fc': checkpoint has block=\[4, 4\]"):
        checkpoint.restore(tmp_path / "s", other(block=(2, 4), capacity=5))
    wrong_dtype = other(param_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"layer 'fc': checkpoint has dtype=float32"):
        checkpoint.restore(tmp_path / "s", wrong_dtype)
    with pytest.raises(ValueError, match="no layout.json"):
        checkpoint.restore(tmp_path, state)


@pytest.mark.parametrize(
    "n, m, pack_tile, dtype", [(2, 4, None, jnp.float32), (3, 8, 16, jnp.bfloat16)]
)
def test_compress_nm_and_flax_compress_pack_identically(n, m, pack_tile, dtype):
    """One packing: jaxsparse.compress_nm's NMWeight and flax.compress's kernel_values + NMPattern hold the same
    bits for the same kernel and mask (under-full groups, i.e. padding slots, included)."""
    k = jax.random.split(jax.random.key(7), 3)
    kernel = jax.random.normal(k[0], (64, 12)).astype(dtype)
    score = jax.random.uniform(k[1], kernel.shape)
    mask = jaxsparse.nm_mask(score, n, m) & jax.random.bernoulli(k[2], 0.7, kernel.shape)
    assert (mask.reshape(-1, m, 12).sum(1) < n).any()  # some groups are under-full
    params = {"fc": {"kernel": kernel, "bias": jnp.zeros(12)}}
    masks = {"fc": {"kernel": mask, "bias": None}}
    w = jaxsparse.compress_nm(params, n, m, masks=masks, pack_tile=pack_tile)["fc"]["kernel"]
    cparams, pattern = convert.compress(params, masks, format="nm", n=n, m=m, pack_tile=pack_tile)
    p = pattern["fc"]["pattern"]
    assert (p.n, p.m, p.pack_tile, p.shape) == (w.n, w.m, w.pack_tile, w.shape)
    for a, b in ((cparams["fc"]["kernel_values"], w.values), (p.meta, w.meta)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    # and the same errors, naming the leaf
    bad = {"fc": {"kernel": mask.at[:m, 0].set(True), "bias": None}}
    msg = rf"params leaf 'fc/kernel': the mask is not {n}:{m}: group 0 \(rows 0\.\.{m - 1}\) of column 0"
    with pytest.raises(ValueError, match=msg):
        jaxsparse.compress_nm(params, n, m, masks=bad)
    with pytest.raises(ValueError, match=msg):
        convert.compress(params, bad, format="nm", n=n, m=m)


def test_bad_conversion_input():
    params = {
        "fc": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)},
        "conv": {"kernel": jnp.ones((3, 3, 2, 4))},
    }
    unstructured = jnp.eye(8, dtype=bool)
    with pytest.raises(
        ValueError,
        match=r"'fc/kernel': the mask is not block-structured for block=\(4, 4\): block \(0, 0\)",
    ):
        convert.compress(params, {"fc": {"kernel": unstructured}}, format="block", block=(4, 4))
    with pytest.raises(ValueError, match=r"'fc/kernel': the mask is not 2:4"):
        convert.compress(params, {"fc": {"kernel": jnp.ones((8, 8), bool)}}, format="nm")
    with pytest.raises(
        ValueError, match=r"leaf 'fc/kernel'` axis 0 has length 8 .* not divisible by m=3"
    ):
        convert.compress(params, {"fc": {"kernel": jnp.eye(8, dtype=bool)}}, format="nm", n=1, m=3)
    for fmt in ("nm", "block"):
        with pytest.raises(TypeError, match=r"mask of leaf 'fc/kernel' must be a bool array"):
            convert.compress(params, {"fc": {"kernel": jnp.eye(8)}}, format=fmt, block=(4, 4))
        with pytest.raises(
            ValueError, match=r"mask of leaf 'fc/kernel' must have its parameter's shape"
        ):
            convert.compress(
                params, {"fc": {"kernel": jnp.eye(4, dtype=bool)}}, format=fmt, block=(4, 4)
            )
    with pytest.raises(
        ValueError, match=r"'fc/kernel': capacity=1 is below the mask's block count 4"
    ):
        convert.compress(
            params,
            {"fc": {"kernel": jnp.ones((8, 8), bool)}},
            format="block",
            block=(4, 4),
            capacity=1,
        )
    with pytest.raises(ValueError, match=r"'conv/kernel': only 2-D 'kernel' leaves"):
        convert.compress(
            params, {"conv": {"kernel": jnp.ones((3, 3, 2, 4), bool)}}, format="block", block=(1, 1)
        )
    with pytest.raises(ValueError, match=r"not in params: \['fc/w'\]"):
        convert.compress(params, {"fc": {"w": unstructured}}, format="block", block=(4, 4))


def test_compress_refuses_packed_masks_naming_the_accessor():
    """Masks from a packed_masks=True state are bits, not bool masks: compress says how to read them (it used
    to report leaves '.../bits' missing from params)."""
    js = jaxsparse
    params = {"fc": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
    state = js.sparse_training(
        optax.sgd(0.1), js.fixed_masks.rule(js.magnitude_masks(params, 0.5)), packed_masks=True
    ).init(params)
    with pytest.raises(ValueError, match="state_masks"):
        convert.compress(params, state.masks, format="block", block=(4, 4))
