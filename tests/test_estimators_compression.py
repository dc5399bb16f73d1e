"""One-shot N:M and the round trip through the N:M kernel format (pallas_kernels.nm.NMWeight)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.estimators import ste_nm, transposable_nm_mask
from jaxsparse.nm_compression import NMLeaf, compress_nm, decompress_nm, one_shot_nm
from pallas_kernels.nm import NMWeight, nm_matmul


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (16, 6)), "bias": jnp.ones(6)},
        "conv": {"kernel": jax.random.normal(k[1], (3, 3, 8, 4))},
        "embed": jax.random.normal(k[2], (12, 8)),
    }


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 16)])
def test_one_shot_and_round_trip_exact(n, m):
    p = _params()
    p["dense"]["kernel"] = jax.random.normal(jax.random.PRNGKey(m), (16, 6))
    where = {"dense": {"kernel": True, "bias": False}, "conv": {"kernel": m <= 8}, "embed": False}
    pruned = one_shot_nm(p, n, m, where=where)
    ste = ste_nm(p, n, m, where=where)
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(ste)))
    c = jax.jit(lambda q: compress_nm(q, n, m, where=where))(p)
    assert isinstance(c["dense"]["kernel"], NMWeight) and c["dense"]["kernel"].values.shape == (
        n,
        16 // m,
        6,
    )
    if m <= 8:
        assert isinstance(c["conv"]["kernel"], NMLeaf)
    back = decompress_nm(c)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(pruned)))
    # compressing already-pruned weights is the identity too
    back2 = decompress_nm(compress_nm(pruned, n, m, where=where))
    assert all(
        bool((a == b).all()) for a, b in zip(jax.tree.leaves(back2), jax.tree.leaves(pruned))
    )


def test_explicit_transposable_masks_and_kernel_matmul():
    w = jax.random.normal(jax.random.PRNGKey(3), (16, 8))
    masks = {"w": transposable_nm_mask(jnp.abs(w), 2, 4)}
    c = compress_nm({"w": w}, 2, 4, masks=masks)
    assert (decompress_nm(c)["w"] == jnp.where(masks["w"], w, 0)).all()
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 16))
    y = nm_matmul(x, c["w"], impl="xla")
    assert np.allclose(y, x @ jnp.where(masks["w"], w, 0), atol=1e-5)


def test_other_axis_round_trip():
    w = {"w": jax.random.normal(jax.random.PRNGKey(5), (6, 8))}
    c = compress_nm(w, 2, 4, axis=-1)
    assert isinstance(c["w"], NMLeaf)
    assert (decompress_nm(c)["w"] == one_shot_nm(w, 2, 4, axis=-1)["w"]).all()


def test_bad_input():
    p = {"enc": {"kernel": jnp.ones((10, 4))}}
    with pytest.raises(ValueError, match=r"enc/kernel.*length 10.*not divisible by m=4"):
        compress_nm(p, 2, 4)
    with pytest.raises(ValueError, match=r"enc/kernel.*length 10.*not divisible by m=4"):
        one_shot_nm(p, 2, 4)
    with pytest.raises(TypeError, match=r"mask of leaf 'w' must be a bool array; got .* float32"):
        compress_nm({"w": jnp.ones((8, 4))}, 2, 4, masks={"w": jnp.ones((8, 4))})
    with pytest.raises(
        ValueError, match=r"mask of leaf 'w' must have its parameter's shape \(8, 4\)"
    ):
        compress_nm({"w": jnp.ones((8, 4))}, 2, 4, masks={"w": jnp.ones((4, 8), bool)})
    with pytest.raises(TypeError, match=r"`params leaf 'w'` must be a real floating-point array"):
        compress_nm({"w": jnp.ones((8, 4), jnp.int32)}, 2, 4, masks={"w": jnp.ones((8, 4), bool)})
    # not N:M: the leaf, the 2-D view a conv kernel is packed as, the group and what is allowed
    over = jnp.zeros((2, 2, 4, 3), bool).at[1, 0, :3, 2].set(True)
    with pytest.raises(
        ValueError,
        match=r"params leaf 'c/k' \(packed as its \(16, 3\) view, axis 2 along the rows\): the mask is "
        r"not 2:4: group 2 \(rows 8\.\.11\) of column 2 keeps 3 > n=2 entries; allowed: at most n=2",
    ):
        compress_nm({"c": {"k": jnp.ones((2, 2, 4, 3))}}, 2, 4, masks={"c": {"k": over}})
    with pytest.raises(ValueError, match=r"`n` must be <= `m`"):
        compress_nm({"w": jnp.ones((8, 4))}, 5, 4)
