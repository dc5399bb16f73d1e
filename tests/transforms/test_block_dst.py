"""Block RigL / SET on block-sparse Linen layers: fixed capacity and block count, growth by the dense gradient's
block norms, grown blocks and their Adam moments start at zero, the dense gradient is computed on update steps
only, one compilation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsparse.flax.linen import BlockSparseDense
from jaxsparse.flax.train import block_sparse_weights
from jaxsparse.masks import block_scores
from jaxsparse.transforms.block_dst import block_dst_step
from pallas_kernels.block_sparse import block_mask_of, block_sparse_to_dense


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(BlockSparseDense(16, block=(4, 4), capacity=6, name="fc0")(x))
        return BlockSparseDense(8, block=(4, 4), capacity=4, name="fc1")(x)


X = jax.random.normal(jax.random.PRNGKey(0), (32, 16))
Y = jnp.tanh(X[:, :8] * 2)


def sparse_loss(params, pattern):
    return jnp.mean((Net().apply({"params": params, "sparse_pattern": pattern}, X) - Y) ** 2)


def dense_grads(params, pattern):
    """dL/dW of each layer as a dense (K, N) array: the same loss with dense kernels."""
    ws = block_sparse_weights(params, pattern)
    kernels = {k: block_sparse_to_dense(w) for k, w in ws.items()}

    def loss(kernels):
        h = jax.nn.relu(X @ kernels["fc0"] + params["fc0"]["bias"])
        return jnp.mean((h @ kernels["fc1"] + params["fc1"]["bias"] - Y) ** 2)

    return jax.grad(loss)(kernels)


def setup():
    v = Net().init(jax.random.PRNGKey(1), X[:1])
    return v["params"], v["sparse_pattern"]


def make_step(tx, calls, traces, **kw):
    def counted(params, pattern):
        jax.debug.callback(lambda: calls.append(1))
        return dense_grads(params, pattern)

    @jax.jit
    def step(params, pattern, state, t):
        traces.append(1)
        g = jax.grad(sparse_loss)(params, pattern)
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        return block_dst_step(
            params, pattern, state, t, tx=tx, dense_grads=lambda: counted(params, pattern), **kw
        )

    return step


def test_block_rigl_keeps_counts_grows_by_dense_gradient_and_zeroes_new_blocks():
    params, pattern = setup()
    tx = optax.adam(1e-2)
    state, calls, traces = tx.init(params), [], []
    step = make_step(tx, calls, traces, update_every=3, end_step=30, drop_fraction=0.5)
    counts = {k: int(w.nnz) for k, w in block_sparse_weights(params, pattern).items()}
    moved = 0
    for t in range(1, 13):
        before = {k: block_mask_of(w) for k, w in block_sparse_weights(params, pattern).items()}
        new_params, new_pattern, state = step(params, pattern, state, t)
        after = block_sparse_weights(new_params, new_pattern)
        for k, w in after.items():
            assert int(w.nnz) == counts[k] and w.data.shape[0] == (6 if k == "fc0" else 4)
            grown = np.asarray(block_mask_of(w) & ~before[k])
            if grown.any():
                moved += int(grown.sum())
                # new blocks are zero, with zero Adam moments
                dense = np.asarray(block_sparse_to_dense(w)).reshape(
                    w.grid_shape[0], 4, w.grid_shape[1], 4
                )
                assert not dense.transpose(0, 2, 1, 3)[grown].any()
                mu = block_sparse_to_dense(
                    w.__class__(**{**w.__dict__, "data": state[0].mu[k]["kernel_blocks"]})
                )
                mu = (
                    np.asarray(mu)
                    .reshape(w.grid_shape[0], 4, w.grid_shape[1], 4)
                    .transpose(0, 2, 1, 3)
                )
                assert not mu[grown].any()
        params, pattern = new_params, new_pattern
    assert moved > 0
    assert len(calls) == 4  # the dense gradient ran on the 4 update steps (3, 6, 9, 12) only
    assert len(traces) == 1


def test_growth_picks_the_largest_dense_gradient_blocks():
    params, pattern = setup()
    tx = optax.sgd(0.0)  # no weight change: the update is the only thing that moves blocks
    state = tx.init(params)
    g = dense_grads(params, pattern)
    before = {k: block_mask_of(w) for k, w in block_sparse_weights(params, pattern).items()}
    params2, pattern2, _ = block_dst_step(
        params,
        pattern,
        state,
        3,
        tx=tx,
        dense_grads=lambda: g,
        update_every=3,
        end_step=30,
        drop_fraction=0.5,
    )
    for k, w in block_sparse_weights(params2, pattern2).items():
        new = np.asarray(block_mask_of(w))
        grown = new & ~np.asarray(before[k])
        scores = np.asarray(block_scores(g[k], (4, 4)))
        assert grown.any()
        # candidates are all blocks not kept (a just-dropped block may come back): grown ones score highest
        assert scores[grown].min() >= scores[~new].max()


def test_block_set_and_bad_arguments():
    params, pattern = setup()
    tx = optax.sgd(0.1)
    out = block_dst_step(
        params,
        pattern,
        tx.init(params),
        3,
        tx=tx,
        grow="random",
        key=jax.random.PRNGKey(0),
        update_every=3,
        end_step=30,
    )
    assert all(
        int(w.nnz) == int(w0.nnz)
        for w, w0 in zip(
            block_sparse_weights(out[0], out[1]).values(),
            block_sparse_weights(params, pattern).values(),
        )
    )
    with pytest.raises(ValueError, match="dense_grads"):
        block_dst_step(params, pattern, tx.init(params), 3, tx=tx, end_step=30)
    with pytest.raises(ValueError, match="key"):
        block_dst_step(params, pattern, tx.init(params), 3, tx=tx, grow="random", end_step=30)
