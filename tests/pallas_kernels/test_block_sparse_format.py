"""Block-sparse format: exact round trips, pattern invariants, packing under jit, capacity overflow, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallas_kernels.block_sparse import (
    BlockSparseWeight,
    block_mask_from_dense,
    block_mask_of,
    block_sparse_from_dense,
    block_sparse_to_dense,
    bsr_matmul,
    reference,
)


def _expand(mask, bk, bn):
    return np.kron(np.asarray(mask, np.float32), np.ones((bk, bn), np.float32)).astype(bool)


@st.composite
def _configs(draw):
    kb, nb = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    bk, bn = draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 2, 4, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    extra = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    return kb, nb, bk, bn, seed, density, extra, dtype


@given(_configs())
def test_round_trip_is_exact_and_pattern_is_consistent(cfg):
    kb, nb, bk, bn, seed, density, extra, dtype = cfg
    rng = np.random.default_rng(seed)
    mask = rng.random((kb, nb)) < density
    w = jnp.asarray(rng.standard_normal((kb * bk, nb * bn)), dtype)
    capacity = min(kb * nb, max(1, int(mask.sum()) + extra))
    # one jitted program per example: packing, unpacking and the mask round trip
    pack = jax.jit(
        lambda w, m: (lambda b: (b, block_sparse_to_dense(b), block_mask_of(b)))(
            block_sparse_from_dense(w, m, block=(bk, bn), capacity=capacity)
        )
    )
    bsw, dense, mask_back = jax.device_get(pack(w, mask))

    expected = np.where(_expand(mask, bk, bn), np.asarray(w, np.float32), 0)
    np.testing.assert_array_equal(np.asarray(dense, np.float32), expected)
    np.testing.assert_array_equal(mask_back, mask)
    assert bsw.data.dtype == dtype and bsw.data.shape == (capacity, bk, bn)

    nnz = int(bsw.nnz)
    assert nnz == mask.sum() and int(bsw.num_dropped) == 0
    row, col = np.asarray(bsw.row_idx), np.asarray(bsw.col_idx)
    t_row, t_col, t_perm = (
        np.asarray(bsw.t_row_idx),
        np.asarray(bsw.t_col_idx),
        np.asarray(bsw.t_perm),
    )
    # column-grouped order sorted by (col, row); transposed order sorted by (row, col)
    assert [tuple(p) for p in zip(col[:nnz], row[:nnz])] == sorted(zip(*np.nonzero(mask.T)))
    assert [tuple(p) for p in zip(t_row[:nnz], t_col[:nnz])] == sorted(zip(*np.nonzero(mask)))
    np.testing.assert_array_equal(row[t_perm[:nnz]], t_row[:nnz])
    np.testing.assert_array_equal(col[t_perm[:nnz]], t_col[:nnz])
    # padding repeats the last live entry (no new DMA) and holds zeros
    if nnz:
        for arr in (row, col, t_row, t_col):
            assert (arr[nnz:] == arr[nnz - 1]).all()
    assert not np.asarray(bsw.data[nnz:], np.float32).any()
    np.testing.assert_array_equal(np.diff(np.asarray(bsw.col_ptr)), mask.sum(0))
    np.testing.assert_array_equal(np.diff(np.asarray(bsw.row_ptr)), mask.sum(1))
    assert ((0 <= row) & (row < kb) & (0 <= col) & (col < nb) & (t_perm < capacity)).all()


def test_pack_inside_jit_compiles_once_across_patterns():
    rng = np.random.default_rng(0)
    traces = []

    @jax.jit
    def repack(w, mask):
        traces.append(1)
        return block_sparse_from_dense(w, mask, block=(4, 8), capacity=6)

    w = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
    for density in (0.1, 0.4, 0.6):
        mask = rng.random((4, 4)) < density
        mask[0, 0] = True
        mask.flat[np.nonzero(mask.reshape(-1))[0][6:]] = False  # keep within capacity
        bsw = repack(w, jnp.asarray(mask))
        np.testing.assert_array_equal(
            block_sparse_to_dense(bsw), np.where(_expand(mask, 4, 8), w, 0)
        )
    assert len(traces) == 1
    assert repack._cache_size() == 1


def test_block_mask_from_dense_recovers_pattern():
    rng = np.random.default_rng(1)
    mask = rng.random((3, 4)) < 0.5
    w = np.where(_expand(mask, 2, 4), rng.standard_normal((6, 16)) + 5.0, 0)
    np.testing.assert_array_equal(block_mask_from_dense(jnp.asarray(w), block=(2, 4)), mask)


def test_capacity_smaller_than_mask_raises_when_concrete():
    mask = np.ones((2, 3), bool)
    with pytest.raises(
        ValueError, match=r"capacity=4 is smaller than the number of blocks in block_mask \(6\)"
    ):
        block_sparse_from_dense(jnp.ones((4, 6)), mask, block=(2, 2), capacity=4)


def test_capacity_overflow_under_jit_poisons_instead_of_truncating():
    mask = jnp.ones((2, 3), bool)
    pack = jax.jit(lambda w, m: block_sparse_from_dense(w, m, block=(2, 2), capacity=4))
    bsw = pack(jnp.ones((4, 6)), mask)
    assert int(bsw.num_dropped) == 2 and int(bsw.nnz) == 4
    assert np.isnan(np.asarray(bsw.data)).all()
    # the product is NaN under jit, and eager use refuses the weight outright
    y = jax.jit(lambda x, w: bsr_matmul(x, w, impl="xla"))(jnp.ones((1, 4)), bsw)
    assert np.isnan(np.asarray(y)).all()
    with pytest.raises(ValueError, match="overflowed its capacity: 2 mask blocks were dropped"):
        bsr_matmul(jnp.ones((1, 4)), bsw)


def test_empty_mask_keeps_one_zero_slot():
    bsw = block_sparse_from_dense(
        jnp.ones((4, 4)), np.zeros((2, 2), bool), block=(2, 2), capacity=1
    )
    assert int(bsw.nnz) == 0
    assert not np.asarray(block_sparse_to_dense(bsw)).any()
    for strategy in ("densify", "gather"):
        assert not np.asarray(reference.matmul(jnp.ones((3, 4)), bsw, strategy)).any()


@pytest.mark.parametrize("strategy", ["densify", "gather"])
def test_reference_strategies_match_dense(strategy):
    rng = np.random.default_rng(2)
    mask = rng.random((3, 4)) < 0.5
    mask[:, 1] = False  # an empty block column
    w = jnp.asarray(rng.standard_normal((12, 32)), jnp.float32)
    bsw = block_sparse_from_dense(w, mask, block=(4, 8), capacity=int(mask.sum()) + 1)
    dense = block_sparse_to_dense(bsw)
    x = jnp.asarray(rng.standard_normal((5, 12)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((5, 32)), jnp.float32)
    np.testing.assert_allclose(reference.matmul(x, bsw, strategy), x @ dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        reference.matmul_transposed(dy, bsw, strategy), dy @ dense.T, rtol=1e-5, atol=1e-5
    )
    full = (x.T @ dy).reshape(3, 4, 4, 8).transpose(0, 2, 1, 3)
    nnz = int(bsw.nnz)
    expected = np.zeros(bsw.data.shape, np.float32)
    expected[:nnz] = np.asarray(full)[np.asarray(bsw.row_idx[:nnz]), np.asarray(bsw.col_idx[:nnz])]
    np.testing.assert_allclose(
        reference.sddmm(x, dy, bsw, strategy), expected, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "w, mask, kwargs, error, message",
    [
        (
            jnp.ones((2, 4, 4)),
            np.ones((2, 2), bool),
            dict(block=(2, 2), capacity=4),
            ValueError,
            r"w must be a 2-D \[K, N\] weight; got shape \(2, 4, 4\)",
        ),
        (
            jnp.ones((6, 4)),
            np.ones((2, 2), bool),
            dict(block=(4, 2), capacity=4),
            ValueError,
            r"block=\(4, 2\) must divide the weight shape \(6, 4\)",
        ),
        (
            jnp.ones((4, 4), jnp.int32),
            np.ones((2, 2), bool),
            dict(block=(2, 2), capacity=4),
            TypeError,
            "floating dtype",
        ),
        (
            jnp.ones((4, 4)),
            np.ones((3, 2), bool),
            dict(block=(2, 2), capacity=4),
            ValueError,
            r"block_mask must have shape \(K // bk, N // bn\) = \(2, 2\)",
        ),
        (
            jnp.ones((4, 4)),
            np.ones((2, 2), bool),
            dict(block=(2, 2), capacity=0),
            ValueError,
            "capacity must be a static int >= 1",
        ),
        (
            jnp.ones((4, 4)),
            np.ones((2, 2), bool),
            dict(block=(0, 2), capacity=4),
            ValueError,
            "block must be a pair of positive ints",
        ),
        (
            jnp.ones((4, 4)),
            np.ones((2, 2), bool),
            dict(block=(2, 2), capacity=5),
            ValueError,
            "exceeds the number of blocks",
        ),
    ],
)
def test_bad_format_input_is_rejected(w, mask, kwargs, error, message):
    with pytest.raises(error, match=message):
        block_sparse_from_dense(w, mask, **kwargs)


def test_weight_is_a_pytree_with_static_metadata():
    bsw = block_sparse_from_dense(jnp.ones((4, 4)), np.eye(2, dtype=bool), block=(2, 2), capacity=2)
    leaves, treedef = jax.tree_util.tree_flatten(bsw)
    assert len(leaves) == 10
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (
        isinstance(rebuilt, BlockSparseWeight)
        and rebuilt.shape == (4, 4)
        and rebuilt.block == (2, 2)
    )
