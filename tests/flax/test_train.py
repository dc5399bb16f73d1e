"""Training on the kernels while block masks change: fixed-capacity re-pack, one compile, == masked dense."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from jaxsparse.allocation import keep_count
from jaxsparse.flax.linen import BlockSparseDense
from jaxsparse.flax.nnx import BlockSparseLinear, SparsePattern
from jaxsparse.flax.train import (
    block_gmp_step,
    block_magnitude_masks,
    block_sparse_weights,
    repack,
    stored_block_masks,
)
from pallas_kernels.block_sparse import (
    block_mask_of,
    block_sparse_from_dense,
    block_sparse_to_dense,
)

GRID, BLOCK, CAP = (4, 4), (2, 3), 9


@functools.cache
def _jitted_repack():
    def f(w_dense, old_mask, new_mask):
        w = block_sparse_from_dense(w_dense, old_mask, block=BLOCK, capacity=CAP)
        new, src = repack(w, new_mask)
        ref = block_sparse_from_dense(block_sparse_to_dense(w), new_mask, block=BLOCK, capacity=CAP)
        return w, new, src, ref

    return jax.jit(f)


@given(
    st.lists(st.booleans(), min_size=16, max_size=16),
    st.lists(st.booleans(), min_size=16, max_size=16),
)
def test_repack_is_bit_exact_and_moves_slots(old_bits, new_bits):
    old_bits, new_bits = (
        old_bits[:CAP] + [False] * (16 - CAP),
        new_bits[-CAP:] + [False] * (16 - CAP),
    )
    old_mask = jnp.array(old_bits).reshape(GRID)
    new_mask = jnp.array(new_bits[::-1]).reshape(GRID)
    w_dense = jax.random.normal(jax.random.key(0), (GRID[0] * BLOCK[0], GRID[1] * BLOCK[1]))
    w, new, src, ref = _jitted_repack()(w_dense, old_mask, new_mask)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(block_mask_of(new), new_mask)
    src, live = np.asarray(src), np.arange(CAP) < int(new.nnz)
    # A slot's source holds the same block in the old weight; -1 exactly for new blocks and padding.
    kept = live & (src >= 0)
    np.testing.assert_array_equal(np.asarray(w.row_idx)[src[kept]], np.asarray(new.row_idx)[kept])
    np.testing.assert_array_equal(np.asarray(w.col_idx)[src[kept]], np.asarray(new.col_idx)[kept])
    was = np.asarray(old_mask)[np.asarray(new.row_idx), np.asarray(new.col_idx)]
    np.testing.assert_array_equal(kept, live & was)


class MLP(nnx.Module):
    def __init__(self, d, rngs):
        self.fc1 = BlockSparseLinear(d, 4 * d, block=(4, 4), density=0.75, impl="xla", rngs=rngs)
        self.fc2 = BlockSparseLinear(4 * d, d, block=(4, 4), density=0.75, impl="xla", rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


def _dense_loss(kernels, biases, x, y):
    h = jax.nn.gelu(jnp.matmul(x, kernels[0], precision="highest") + biases[0])
    return jnp.mean((jnp.matmul(h, kernels[1], precision="highest") + biases[1] - y) ** 2)


def test_nnx_gmp_on_blocks_one_compile_and_equals_masked_dense():
    d = 8
    model = MLP(d, nnx.Rngs(0))
    graphdef, params, pattern = nnx.split(model, nnx.Param, SparsePattern)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    traces = []

    def loss_fn(params, pattern, x, y):
        return jnp.mean((nnx.merge(graphdef, params, pattern)(x) - y) ** 2)

    @jax.jit
    def step(params, pattern, opt_state, i, x, y):
        traces.append(1)
        loss, grads = jax.value_and_grad(loss_fn)(params, pattern, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params, pattern, opt_state = block_gmp_step(
            params,
            pattern,
            opt_state,
            i,
            tx=tx,
            final_sparsity=0.75,
            initial_sparsity=0.25,
            begin_step=0,
            end_step=6,
            frequency=2,
        )
        return params, pattern, opt_state, loss, grads

    dev = jax.devices()[0]
    put = lambda t: jax.device_put(t, dev)
    x = put(jax.random.normal(jax.random.key(1), (16, d)))
    y = put(jax.random.normal(jax.random.key(2), (16, d)))
    params, pattern, opt_state = put(params), put(pattern), put(opt_state)
    prev_masks, nnzs = stored_block_masks(params, pattern), []
    for i in range(8):
        kernels = [block_sparse_to_dense(w) for w in block_sparse_weights(params, pattern).values()]
        biases = [params["fc1"]["bias"][...], params["fc2"]["bias"][...]]
        ref_loss, ref_grads = jax.value_and_grad(_dense_loss, argnums=(0, 1))(kernels, biases, x, y)
        params, pattern, opt_state, loss, grads = step(
            params, pattern, opt_state, put(jnp.int32(i)), x, y
        )
        # The step's loss and gradients (on the kernels) equal the masked dense computation.
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for name, g_ref in zip(("fc1", "fc2"), ref_grads[0]):
            want = block_sparse_from_dense(g_ref, prev_masks[name], block=(4, 4), capacity=12).data
            np.testing.assert_allclose(
                grads[name]["kernel_blocks"][...], want, rtol=1e-4, atol=1e-6
            )
        np.testing.assert_allclose(grads["fc2"]["bias"][...], ref_grads[1][1], rtol=1e-4, atol=1e-6)
        masks = stored_block_masks(params, pattern)
        for name in masks:  # GMP on blocks never grows a block
            assert not np.any(np.asarray(masks[name]) & ~np.asarray(prev_masks[name]))
        prev_masks = masks
        nnzs.append(int(pattern["fc1"]["pattern"].get_value().nnz))
    assert len(traces) == 1 and step._cache_size() == 1
    jaxpr = str(jax.make_jaxpr(step)(params, pattern, opt_state, put(jnp.int32(0)), x, y))
    assert (
        jaxpr.count("custom_vjp_call") >= 2
    )  # both layers' products run through bsr_matmul's custom_vjp
    assert (
        nnzs[0] > nnzs[-1] and nnzs[-1] == 4
    )  # 0.75 of the 16 blocks pruned, one compiled step throughout
    assert params["fc1"]["kernel_blocks"][...].shape == (12, 4, 4)
    # Padding slots hold zeros in the params and in every Adam moment.
    live = np.arange(12) < nnzs[-1]
    assert not np.asarray(params["fc1"]["kernel_blocks"][...])[~live].any()
    for moment in (opt_state[0].mu, opt_state[0].nu):
        assert not np.asarray(moment["fc1"]["kernel_blocks"][...])[~live].any()


def test_linen_gmp_on_blocks_one_compile():
    model = BlockSparseDense(8, block=(2, 2), capacity=12, impl="xla")
    x = jax.random.normal(jax.random.key(0), (4, 8))
    v = model.init(jax.random.key(1), x)
    params, pattern = v["params"], v["sparse_pattern"]
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, pattern, opt_state, i):
        grads = jax.grad(
            lambda p: jnp.sum(model.apply({"params": p, "sparse_pattern": pattern}, x) ** 2)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return block_gmp_step(
            params,
            pattern,
            opt_state,
            i,
            tx=tx,
            final_sparsity=0.75,
            initial_sparsity=0.25,
            begin_step=0,
            end_step=3,
            frequency=1,
        )

    nnz = []
    for i in range(4):
        params, pattern, opt_state = step(params, pattern, opt_state, jnp.int32(i))
        nnz.append(int(pattern["pattern"].nnz))
    assert step._cache_size() == 1 and nnz[0] > nnz[-1] == 4 and nnz == sorted(nnz, reverse=True)
    (w,) = block_sparse_weights(params, pattern).values()
    dense = block_sparse_to_dense(w)
    np.testing.assert_allclose(
        model.apply({"params": params, "sparse_pattern": pattern}, x),
        x @ dense + params["bias"],
        rtol=1e-5,
        atol=1e-5,
    )
    # The momentum buffer moved with its blocks: it is zero exactly on padding slots and pruned blocks.
    trace = opt_state[0].trace["kernel_blocks"]
    assert not np.asarray(trace)[np.arange(12) >= nnz[-1]].any()


def test_pallas_kernel_in_the_step_across_mask_changes_and_set_block_mask():
    """The Pallas kernel (interpret mode on CPU) runs fwd+bwd in one compiled step while the mask changes."""
    layer = BlockSparseLinear(
        8, 8, block=(4, 4), capacity=3, impl="pallas", interpret="hlo", rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(0), (8, 8))
    masks = [
        jnp.array([[1, 1], [1, 0]], bool),
        jnp.array([[0, 1], [1, 1]], bool),
        jnp.array([[0, 0], [0, 1]], bool),
    ]

    traces = []

    @nnx.jit
    def step(layer, mask):
        traces.append(1)
        src = layer.set_block_mask(mask)
        grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))), argnums=nnx.DiffState(0, nnx.Param))(
            layer
        )
        return grads, src

    for mask in masks:
        kept = np.asarray(layer.block_mask()) & np.asarray(mask)
        before = np.asarray(layer.todense())
        grads, _ = step(layer, mask)
        np.testing.assert_array_equal(layer.block_mask(), mask)
        expect_dense = np.where(np.kron(kept, np.ones((4, 4))).astype(bool), before, 0)
        np.testing.assert_array_equal(
            layer.todense(), expect_dense
        )  # kept blocks keep values, new ones are zero
        g_dense = jax.grad(lambda k: jnp.sum(jnp.sin(x @ k + layer.bias[...])))(layer.todense())
        want = block_sparse_from_dense(g_dense, mask, block=(4, 4), capacity=3).data
        np.testing.assert_allclose(grads["kernel_blocks"][...], want, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1


@given(st.sampled_from([0.0, 0.1, 0.29, 0.5, 0.71, 0.99]))
def test_block_magnitude_masks_keep_exactly_keep_count(sparsity):
    """The layer keeps keep_count(s, Kb * Nb) blocks, the count rule of every jaxsparse API (at s = 0.29 on
    100 blocks: 72; the old round((1 - s) * n) kept 71)."""
    v = _full_layer_variables()
    masks = block_magnitude_masks(v["params"], v["sparse_pattern"], sparsity)
    assert int(masks[""].sum()) == keep_count(sparsity, 100)
    traced = _jitted_magnitude_masks()(v["params"], v["sparse_pattern"], jnp.float32(sparsity))
    assert int(traced[""].sum()) == int(keep_count(jnp.float32(sparsity), 100))


@functools.cache
def _full_layer_variables():
    layer = BlockSparseDense(10, block=(1, 1), capacity=100)
    return layer.init(jax.random.key(0), jnp.ones((1, 10)))


@functools.cache
def _jitted_magnitude_masks():
    return jax.jit(block_magnitude_masks)
