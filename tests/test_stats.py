"""Sparsity summaries and FLOPs estimates on hand-countable examples."""

import jax.numpy as jnp
import pytest

from jaxsparse.lottery import imp_masks
from jaxsparse.stats import flops, global_sparsity, sparsity_summary


def test_summary_counts_exact_nonzeros():
    params = {
        "conv": {"kernel": jnp.zeros((3, 3, 2, 4)).at[0, 0, 0, 0].set(1.0)},
        "bias": jnp.array([0.0, 2.0]),
    }
    s = sparsity_summary(params)
    assert s["conv/kernel"].size == 72 and s["conv/kernel"].nnz == 1 and s["bias"].nnz == 1
    assert global_sparsity(params) == pytest.approx(71 / 72)


def test_flops_dense_and_conv():
    dense = jnp.ones((10, 20)).at[:5].set(0.0)  # half the weights zero
    conv = jnp.ones((3, 3, 4, 8))
    params = {"Conv_0": {"kernel": conv}, "Dense_0": {"kernel": dense, "bias": jnp.ones(20)}}
    total, sparse = flops(params, spatial={"Conv_0/kernel": (16, 16)})
    assert total == 2 * 3 * 3 * 4 * 8 * 16 * 16 + 2 * 10 * 20
    assert sparse == 2 * 3 * 3 * 4 * 8 * 16 * 16 + 2 * 10 * 20 / 2
    with pytest.raises(ValueError, match="conv kernel 'Conv_0/kernel'"):
        flops(params)


def test_imp_from_dense_selects_prunable_leaves():
    params = {"w": jnp.arange(1.0, 21.0).reshape(4, 5), "b": jnp.ones(5)}
    masks = imp_masks(params, None, 0.25)
    assert masks["b"] is None and int(masks["w"].sum()) == 15
    assert masks["w"].ravel().tolist() == [False] * 5 + [True] * 15
