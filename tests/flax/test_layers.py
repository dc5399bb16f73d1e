"""Sparse NNX/Linen layers == the masked dense computation (forward and gradients), Flax conventions, errors."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxsparse.flax
from jaxsparse.flax import BlockSparsePattern, NMPattern, convert, train, upgrade_patterns
from jaxsparse.flax.linen import BlockSparseDense, NMDense
from jaxsparse.flax.nnx import BlockSparseLinear, NMLinear, SparsePattern
from pallas_kernels.block_sparse import (
    block_mask_of,
    block_sparse_from_dense,
    block_sparse_to_dense,
    with_data,
)
from pallas_kernels.nm import unpack_nm

K, N, BLOCK = 16, 8, (4, 4)
IMPLS = [dict(impl="xla"), dict(impl="dense"), dict(impl="pallas", interpret="hlo")]


def _x(shape=(2, 3, K), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def _dense_reference(x, kernel, bias):
    return jnp.matmul(x, kernel, precision="highest") + bias


def _check_block_layer(apply, data, pattern_w, bias, x):
    """apply(data, bias, x) vs the dense masked product; grads at stored blocks equal the dense grads."""

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a)))

    apply = jax.jit(apply)
    y = apply(data, bias, x)
    dense = lambda d, b, xx: _dense_reference(xx, block_sparse_to_dense(with_data(pattern_w, d)), b)
    np.testing.assert_allclose(y, dense(data, bias, x), rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(loss(apply), argnums=(0, 1, 2)))(data, bias, x)
    g_ref = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(data, bias, x)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The stored-block gradient is the dense kernel gradient sampled at the mask.
    kernel = block_sparse_to_dense(pattern_w)
    gk = jax.grad(lambda k: jnp.sum(jnp.sin(_dense_reference(x, k, bias))))(kernel)
    mask = block_mask_of(pattern_w)
    expect = block_sparse_from_dense(
        gk, mask, block=pattern_w.block, capacity=pattern_w.capacity
    ).data
    live = np.arange(pattern_w.capacity) < int(pattern_w.nnz)
    np.testing.assert_allclose(
        np.asarray(g[0])[live], np.asarray(expect)[live], rtol=1e-5, atol=1e-5
    )
    assert not np.asarray(g[0])[~live].any()


@pytest.mark.parametrize("kw", IMPLS, ids=lambda kw: "-".join(kw.values()))
def test_nnx_block_sparse_matches_masked_dense(kw):
    layer = BlockSparseLinear(
        K, N, block=BLOCK, capacity=5, block_mask=None, rngs=nnx.Rngs(0), **kw
    )
    layer.bias[...] = jax.random.normal(jax.random.key(3), (N,))
    graphdef, params, pattern = nnx.split(layer, nnx.Param, SparsePattern)

    def apply(data, bias, x):
        p = jax.tree.map(lambda v: v, params)
        p["kernel_blocks"][...] = data
        p["bias"][...] = bias
        return nnx.merge(graphdef, p, pattern)(x)

    _check_block_layer(apply, layer.kernel_blocks[...], layer.weight, layer.bias[...], _x())


@pytest.mark.parametrize("kw", [IMPLS[0], IMPLS[2]], ids=lambda kw: "-".join(kw.values()))
def test_linen_block_sparse_matches_masked_dense(kw):
    model = BlockSparseDense(N, block=BLOCK, density=0.4, **kw)
    v = model.init(jax.random.key(0), jnp.ones((1, K)))
    v["params"]["bias"] = jax.random.normal(jax.random.key(3), (N,))
    from jaxsparse.flax.train import block_sparse_weights

    (w,) = block_sparse_weights(v["params"], v["sparse_pattern"]).values()
    assert w.capacity == 4  # ceil(0.4 * 8)

    def apply(data, bias, x):
        return model.apply(
            {
                "params": {"kernel_blocks": data, "bias": bias},
                "sparse_pattern": v["sparse_pattern"],
            },
            x,
        )

    _check_block_layer(apply, v["params"]["kernel_blocks"], w, v["params"]["bias"], _x())


def test_block_layer_init_matches_nnx_linear_and_dtypes():
    dense = nnx.Linear(K, N, rngs=nnx.Rngs(7))
    full = BlockSparseLinear(K, N, block=BLOCK, block_mask=jnp.ones((4, 2), bool), rngs=nnx.Rngs(7))
    assert full.capacity == 8
    np.testing.assert_array_equal(full.todense(), dense.kernel[...])
    np.testing.assert_array_equal(full.bias[...], dense.bias[...])
    x = _x()
    np.testing.assert_allclose(full(x), dense(x), rtol=1e-5, atol=1e-5)
    half = BlockSparseLinear(
        K,
        N,
        block=BLOCK,
        capacity=4,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        use_bias=False,
        precision=jax.lax.Precision.HIGHEST,
        rngs=nnx.Rngs(0),
    )
    assert half.bias is None and half.kernel_blocks.dtype == jnp.bfloat16
    assert half(x).dtype == jnp.bfloat16
    assert (
        BlockSparseLinear(K, N, block=BLOCK, capacity=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(
            x
        ).dtype
        == jnp.bfloat16
    )
    v = BlockSparseDense(N, block=BLOCK, capacity=2, use_bias=False, param_dtype=jnp.bfloat16).init(
        jax.random.key(0), x
    )
    assert "bias" not in v["params"] and v["params"]["kernel_blocks"].dtype == jnp.bfloat16


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_nm_layers_match_masked_dense(framework):
    x = _x()
    if framework == "nnx":
        layer = NMLinear(K, N, n=2, m=4, impl="xla", rngs=nnx.Rngs(0))
        layer.bias[...] = jnp.arange(N, dtype=jnp.float32)
        graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
        values, bias = layer.kernel_values[...], layer.bias[...]
        meta, pack_tile = layer.pattern.get_value().meta, layer.pack_tile

        def apply(values, bias, x):
            p = jax.tree.map(lambda v: v, params)
            p["kernel_values"][...] = values
            p["bias"][...] = bias
            return nnx.merge(graphdef, p, rest)(x)
    else:
        model = NMDense(N, n=2, m=4, impl="xla")
        v = model.init(jax.random.key(0), x)
        values, meta = v["params"]["kernel_values"], v["sparse_pattern"]["pattern"].meta
        bias = jnp.arange(N, dtype=jnp.float32)
        pack_tile = v["sparse_pattern"]["pattern"].pack_tile

        def apply(values, bias, x):
            return model.apply(
                {
                    "params": {"kernel_values": values, "bias": bias},
                    "sparse_pattern": v["sparse_pattern"],
                },
                x,
            )

    from pallas_kernels.nm import NMWeight

    def dense(values, bias, x):
        w = NMWeight(values=values, meta=meta, n=2, m=4, shape=(K, N), pack_tile=pack_tile)
        return _dense_reference(x, unpack_nm(w), bias)

    kernel = dense(values, jnp.zeros(N), jnp.eye(K))
    assert int((kernel != 0).sum()) == K * N // 2
    np.testing.assert_allclose(apply(values, bias, x), dense(values, bias, x), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    for a, b in zip(
        jax.grad(loss(apply), (0, 1, 2))(values, bias, x),
        jax.grad(loss(dense), (0, 1, 2))(values, bias, x),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bad_layer_arguments():
    with pytest.raises(
        ValueError, match=r"capacity=2 is below the block count of its block_mask \(4\)"
    ):
        BlockSparseLinear(
            K,
            N,
            block=BLOCK,
            capacity=2,
            block_mask=jnp.eye(4, 2, dtype=bool) | jnp.eye(4, 2, -1, dtype=bool),
            rngs=nnx.Rngs(0),
        )
    with pytest.raises(ValueError, match="capacity=2 is below"):
        BlockSparseDense(N, block=BLOCK, capacity=2, block_mask=np.ones((4, 2), bool)).init(
            jax.random.key(0), _x()
        )
    with pytest.raises(ValueError, match="must divide"):
        BlockSparseLinear(K, N, block=(3, 4), capacity=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="capacity= .* density= .* block_mask="):
        BlockSparseLinear(K, N, block=BLOCK, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block_mask must be a bool array of shape"):
        BlockSparseLinear(K, N, block=BLOCK, block_mask=jnp.ones((2, 2), bool), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not divisible by m"):
        NMLinear(10, N, n=2, m=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'sparse_pattern/pattern' of layer '' is missing"):
        model = BlockSparseDense(N, block=BLOCK, capacity=2)
        v = model.init(jax.random.key(0), _x())
        model.apply({"params": v["params"]}, _x())


def _nnx_layers():
    return [
        BlockSparseLinear(K, N, block=BLOCK, capacity=3, impl="xla", rngs=nnx.Rngs(0)),
        NMLinear(K, N, n=2, m=4, impl="xla", rngs=nnx.Rngs(0)),
    ]


def test_one_pattern_object_per_layer_with_static_config():
    """Each layer stores one pattern object; the static config is pytree metadata, never an array."""
    x = _x()
    for layer, kind, n_leaves in zip(_nnx_layers(), (BlockSparsePattern, NMPattern), (9, 1)):
        (var,) = jax.tree.leaves(
            nnx.state(layer, SparsePattern), is_leaf=lambda v: isinstance(v, nnx.Variable)
        )
        assert (
            isinstance(var.get_value(), kind) and len(jax.tree.leaves(var.get_value())) == n_leaves
        )
    linen = [
        BlockSparseDense(N, block=BLOCK, capacity=3).init(jax.random.key(0), x),
        NMDense(N, n=2, m=4).init(jax.random.key(0), x),
    ]
    for v, kind in zip(linen, (BlockSparsePattern, NMPattern)):
        assert list(v["sparse_pattern"]) == ["pattern"]
        assert isinstance(v["sparse_pattern"]["pattern"], kind)
    p = linen[1]["sparse_pattern"]["pattern"]
    assert (p.n, p.m, p.shape) == (2, 4, (K, N))
    assert [leaf.shape for leaf in jax.tree.leaves(p)] == [p.meta.shape]  # n, m, pack_tile: static
    b = linen[0]["sparse_pattern"]["pattern"]
    assert (b.shape, b.block, b.capacity, b.grid_shape) == ((K, N), BLOCK, 3, (4, 2))


def test_every_layer_method_runs_under_jit():
    """Methods, decompress and layout work on traced / abstract state (the old N:M config was an int32 array
    read back on the host: ``decompress`` raised under jit and layout lost m / pack_tile when abstract)."""
    x = _x()
    for layer in _nnx_layers():
        eager = (layer(x), layer.todense(), jax.tree.leaves(layer.weight))
        traced = nnx.jit(lambda m: (m(x), m.todense(), jax.tree.leaves(m.weight)))(layer)
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    block = _nnx_layers()[0]
    np.testing.assert_array_equal(nnx.jit(lambda m: m.block_mask())(block), block.block_mask())
    v = NMDense(N, n=2, m=4, impl="xla").init(jax.random.key(0), x)
    np.testing.assert_array_equal(
        jax.jit(NMDense(N, n=2, m=4, impl="xla").apply)(v, x),
        NMDense(N, n=2, m=4, impl="xla").apply(v, x),
    )
    params, pattern = {"fc": v["params"]}, {"fc": v["sparse_pattern"]}
    dense, masks = jax.jit(convert.decompress)(params, pattern)
    eager_dense, eager_masks = convert.decompress(params, pattern)
    np.testing.assert_array_equal(dense["fc"]["kernel"], eager_dense["fc"]["kernel"])
    np.testing.assert_array_equal(masks["fc"]["kernel"], eager_masks["fc"]["kernel"])
    assert int(masks["fc"]["kernel"].sum()) == K * N // 2
    abstract = jax.eval_shape(lambda: {"params": params, "sparse_pattern": pattern})
    desc = jaxsparse.flax._core.layer_layouts(abstract)["fc"]
    assert (desc["n"], desc["m"], desc["pack_tile"], desc["shape"]) == (2, 4, 16, [K, N])


def test_linen_layer_rejects_a_pattern_of_another_config():
    x = _x()
    v4 = NMDense(N, n=2, m=4).init(jax.random.key(0), x)
    v8 = NMDense(N, n=2, m=8).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="has m=8, the layer has m=4"):
        NMDense(N, n=2, m=4).apply(
            {"params": v4["params"], "sparse_pattern": v8["sparse_pattern"]}, x
        )
    vb = BlockSparseDense(N, block=BLOCK, capacity=3).init(jax.random.key(0), x)
    half = BlockSparseDense(N, block=BLOCK, capacity=3).init(jax.random.key(0), x[..., : K // 2])
    with pytest.raises(ValueError, match=r"has shape=\(8, 8\), the layer has shape=\(16, 8\)"):
        BlockSparseDense(N, block=BLOCK, capacity=3).apply(
            {"params": vb["params"], "sparse_pattern": half["sparse_pattern"]}, x
        )
    with pytest.raises(ValueError, match="must be a BlockSparsePattern; got NMPattern"):
        BlockSparseDense(N, block=BLOCK, capacity=3).apply(
            {"params": vb["params"], "sparse_pattern": v4["sparse_pattern"]}, x
        )


def test_block_masks_is_a_deprecated_name_for_stored_block_masks():
    for module in (jaxsparse.flax, train):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = module.block_masks
        assert fn is train.stored_block_masks
        assert [w.category for w in caught] == [DeprecationWarning]
        assert "stored_block_masks" in str(caught[0].message)
        assert "block_masks" not in module.__all__ and "stored_block_masks" in module.__all__


class _OldLayoutMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = BlockSparseDense(N, block=BLOCK, capacity=3, impl="xla", name="fc1")(x)
        return NMDense(N, n=2, m=4, impl="xla", name="fc2")(h)


def _old_layout(node):
    """A tree with pattern objects in the per-field layout of jaxsparse 0.1 (nm_config as an int32 array)."""
    out = {}
    for k, v in node.items():
        if isinstance(v, BlockSparsePattern):
            out.update({f: getattr(v, f) for f in ("row_idx", "col_idx", "t_row_idx", "t_col_idx")})
            out.update(
                {f: getattr(v, f) for f in ("t_perm", "col_ptr", "row_ptr", "nnz", "num_dropped")}
            )
        elif isinstance(v, NMPattern):
            out.update(meta=v.meta, nm_config=jnp.array([v.n, v.m, v.pack_tile], jnp.int32))
        else:
            out[k] = _old_layout(v) if isinstance(v, dict) else v
    return out


def _assert_same_patterns(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)  # static fields included
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_old_per_field_checkpoints_upgrade_to_pattern_objects(tmp_path):
    import orbax.checkpoint as ocp

    x = _x()
    model = _OldLayoutMLP()
    v = model.init(jax.random.key(0), x)
    old = {"params": v["params"], "sparse_pattern": _old_layout(v["sparse_pattern"])}
    with pytest.raises(ValueError, match="per-field layout of jaxsparse 0.1"):
        model.apply(old, x)
    with (
        ocp.StandardCheckpointer() as ckptr
    ):  # an old checkpoint's arrays, read back without a target
        ckptr.save(tmp_path / "old", old)
        ckptr.wait_until_finished()
        read = ckptr.restore(tmp_path / "old")
    new = upgrade_patterns(read["params"], read["sparse_pattern"])
    _assert_same_patterns(new, v["sparse_pattern"])
    y = model.apply({"params": read["params"], "sparse_pattern": new}, x)
    np.testing.assert_array_equal(y, model.apply(v, x))
    # An old NNX state as pure dicts, with each Variable's {"value": ...} level, in one tree.
    layer = _nnx_layers()
    state = {
        "fc1": nnx.to_pure_dict(nnx.state(layer[0])),
        "fc2": nnx.to_pure_dict(nnx.state(layer[1])),
    }
    wrapped = jax.tree.map(lambda a: {"value": a}, _old_layout(state))
    upgraded = upgrade_patterns(wrapped, wrapped)
    for name, lay in zip(("fc1", "fc2"), layer):
        _assert_same_patterns(upgraded[name]["pattern"], lay.pattern.get_value())
