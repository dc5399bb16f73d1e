"""N:M format: exact round trip, N:M validity, packed-metadata size, jit, and bad-input errors."""

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from pallas_kernels.nm import (
    NMWeight,
    index_bits,
    is_nm_mask,
    nm_matmul,
    nm_nbytes,
    pack_nm,
    unpack_indices,
    unpack_nm,
)
from pallas_kernels.nm.masks import nm_mask

NM_ALL = [(1, 2), (2, 4), (1, 4), (2, 8), (4, 8), (3, 8), (1, 16), (8, 16), (16, 16), (5, 7)]


def _weight(rng, k, cols, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal((k, cols)), dtype)


def _counts(mask, m):
    mask = np.asarray(mask)
    return mask.reshape(mask.shape[0] // m, m, -1).sum(axis=1)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _magnitude_round_trip(w, *, n, m):
    w_nm = pack_nm(w, n=n, m=m)
    return unpack_nm(w_nm), nm_mask(jnp.abs(w), n, m, axis=0), unpack_indices(w_nm)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def _masked_round_trip(w, mask, *, n, m):
    return unpack_nm(pack_nm(w, mask, n=n, m=m))


# few distinct shapes so that the jitted round trips are compiled once per (shape, n, m)
GROUPS = st.sampled_from([1, 9, 40])
COLS = st.sampled_from([1, 5])


@given(
    nm=st.sampled_from(NM_ALL),
    groups=GROUPS,
    cols=COLS,
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_magnitude_mask(nm, groups, cols, dtype, seed):
    n, m = nm
    w = _weight(np.random.default_rng(seed), groups * m, cols, dtype)
    dense, mask, idx = _magnitude_round_trip(w, n=n, m=m)
    assert (_counts(mask, m) == n).all()
    assert dense.dtype == w.dtype and dense.shape == w.shape
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(jnp.where(mask, w, 0)))
    # kept entries are the n largest |w| of each group
    a = np.abs(np.asarray(w, np.float32)).reshape(groups, m, cols)
    kept_min = np.where(np.asarray(mask).reshape(groups, m, cols), a, np.inf).min(axis=1)
    dropped_max = np.where(np.asarray(mask).reshape(groups, m, cols), -np.inf, a).max(axis=1)
    assert (kept_min >= dropped_max).all()
    idx = np.asarray(idx)
    assert idx.min() >= 0 and idx.max() < m and (np.diff(idx, axis=0) > 0).all()


@given(
    nm=st.sampled_from(NM_ALL),
    groups=GROUPS,
    cols=COLS,
    seed=st.integers(0, 2**16),
    keep=st.floats(0.0, 1.0),
)
def test_round_trip_explicit_mask_at_most_n(nm, groups, cols, seed, keep):
    """Any mask with <= n per group (including empty groups) packs and unpacks to w * mask exactly."""
    n, m = nm
    rng = np.random.default_rng(seed)
    w = _weight(rng, groups * m, cols)
    mask = np.array(
        _magnitude_round_trip(jnp.asarray(rng.standard_normal(w.shape), jnp.float32), n=n, m=m)[1]
    )
    mask &= rng.random(w.shape) < keep
    dense = _masked_round_trip(w, jnp.asarray(mask), n=n, m=m)
    np.testing.assert_array_equal(np.asarray(dense), np.where(mask, np.asarray(w), 0))
    assert bool(is_nm_mask(mask, n, m))


def test_pack_inside_jit_matches_eager_and_round_trips():
    rng = np.random.default_rng(0)
    w = _weight(rng, 96, 40, jnp.bfloat16)
    mask = nm_mask(jnp.abs(w), 2, 8, axis=0)
    f = jax.jit(lambda w, mask: unpack_nm(pack_nm(w, mask, n=2, m=8)))
    np.testing.assert_array_equal(np.asarray(f(w, mask)), np.asarray(jnp.where(mask, w, 0)))
    a, b = jax.jit(lambda w: pack_nm(w, n=2, m=8))(w), pack_nm(w, n=2, m=8)
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
    np.testing.assert_array_equal(np.asarray(a.meta), np.asarray(b.meta))
    # pytree: only values and meta are leaves; n, m, shape, pack_tile are static
    leaves, treedef = jax.tree.flatten(a)
    assert len(leaves) == 2 and jax.tree.unflatten(treedef, leaves).m == 8


def test_pack_tile_variants_round_trip():
    w = _weight(np.random.default_rng(1), 4 * 100, 3)
    for tile in (16, 32, 64, 128, 256):
        w_nm = pack_nm(w, n=2, m=4, pack_tile=tile)
        assert w_nm.meta.shape[1] == -(-100 // tile) * tile // 16
        np.testing.assert_array_equal(
            np.asarray(unpack_nm(w_nm)),
            np.asarray(jnp.where(nm_mask(jnp.abs(w), 2, 4, axis=0), w, 0)),
        )


@pytest.mark.parametrize(
    "nm,max_ratio", [((2, 4), 0.57), ((1, 4), 0.29), ((2, 8), 0.32), ((4, 8), 0.63)]
)
def test_compressed_bytes_bf16(nm, max_ratio):
    """2:4 bf16 takes <= 0.57x the dense bytes (1 B values + 1/8 B metadata per dense element)."""
    n, m = nm
    w = _weight(np.random.default_rng(2), 4096, 512, jnp.bfloat16)
    w_nm = pack_nm(w, n=n, m=m)
    ratio = nm_nbytes(w_nm) / (w.size * w.dtype.itemsize)
    expected = (n / m * 2 + n / m * index_bits(m) / 8) / 2
    assert ratio == pytest.approx(expected, rel=1e-6)
    assert ratio <= max_ratio


def test_metadata_bits():
    assert [index_bits(m) for m in (2, 3, 4, 5, 8, 9, 16)] == [1, 2, 2, 4, 4, 4, 4]
    w_nm = pack_nm(jnp.ones((4096, 8)), n=2, m=4)
    assert (
        w_nm.meta.dtype == jnp.int32 and w_nm.meta.size * 32 == 4096 // 4 * 8 * 4
    )  # 4 bits / group


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "n,m,exc,words",
    [
        (5, 4, ValueError, ["n=5", "1 <= n <= m"]),
        (0, 4, ValueError, ["n=0", "1 <= n <= m"]),
        (2, 32, ValueError, ["m=32", "16"]),
        (2.0, 4, TypeError, ["n=2.0", "int"]),
        (2, 3, ValueError, ["K=8", "m=3"]),
    ],
)
def test_bad_nm_arguments(n, m, exc, words):
    with pytest.raises(exc) as e:
        pack_nm(jnp.ones((8, 4)), n=n, m=m)
    for word in words:
        assert word in str(e.value)


def test_mask_not_nm_raises_with_location():
    mask = np.zeros((8, 3), bool)
    mask[4:7, 2] = True  # 3 kept in group 1 of column 2
    with pytest.raises(ValueError, match=r"mask is not 2:4: group 1 .* column 2 keeps 3 > n=2"):
        pack_nm(jnp.ones((8, 3)), jnp.asarray(mask), n=2, m=4)
    assert not bool(is_nm_mask(mask, 2, 4))


def test_mask_shape_and_dtype_errors():
    with pytest.raises(ValueError, match=r"mask.shape=\(4, 4\) must equal w.shape=\(8, 4\)"):
        pack_nm(jnp.ones((8, 4)), jnp.ones((4, 4), bool))
    with pytest.raises(TypeError, match="mask must be a bool array"):
        pack_nm(jnp.ones((8, 4)), jnp.ones((8, 4)))
    with pytest.raises(ValueError, match=r"2-D \(K, N\)"):
        pack_nm(jnp.ones((8,)))
    with pytest.raises(ValueError, match="pack_tile=12"):
        pack_nm(jnp.ones((64, 4)), pack_tile=12)


def test_metadata_from_other_nm_is_rejected():
    w = jnp.asarray(np.random.default_rng(3).standard_normal((64, 16)), jnp.float32)
    w24 = pack_nm(w, n=2, m=4)
    with pytest.raises(ValueError, match=r"w_nm holds 2:4 metadata but n=2, m=8 was requested"):
        nm_matmul(jnp.ones((1, 64)), w24, n=2, m=8)
    # a hand-built weight whose metadata belongs to another N:M (1:4 words under a 2:4 header)
    w14 = pack_nm(w, n=1, m=4)
    forged = NMWeight(
        values=w24.values, meta=w14.meta, n=2, m=4, shape=(64, 16), pack_tile=w24.pack_tile
    )
    with pytest.raises(ValueError, match=r"w_nm.meta .* is not 2:4 metadata"):
        nm_matmul(jnp.ones((1, 64)), forged)
    with pytest.raises(TypeError, match="w_nm must be an NMWeight"):
        nm_matmul(jnp.ones((1, 64)), w)
    with pytest.raises(ValueError, match=r"x.shape=\(1, 32\)"):
        nm_matmul(jnp.ones((1, 32)), w24)
    with pytest.raises(ValueError, match="'triton'"):
        nm_matmul(jnp.ones((1, 64)), w24, impl="triton")
