"""Post-training pruning raises a clear error on non-finite calibration statistics or weights (issue: "nothing
fails silently", failure 3e: NaN calibration data was accepted and NaN kernels reported sparsity 0.5; Wanda with
one NaN activation norm pruned that whole input row)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxsparse.posttraining import (
    dsnot_prune,
    init_activation_stats,
    magnitude_prune_layer,
    prune_nnx,
    sparsegpt_prune,
    update_activation_stats,
    wanda_prune,
)

W = jax.random.normal(jax.random.PRNGKey(0), (8, 4))


def test_wanda_one_nan_activation_norm_raises():
    norms = jnp.ones(8).at[3].set(jnp.nan)
    with pytest.raises(ValueError, match=r"`act_sq_norm` has 1 non-finite entry.*calibration"):
        wanda_prune(W, norms, 0.5)


def test_nan_kernel_raises_for_every_method():
    bad = W.at[0, 0].set(jnp.inf)
    for call in (
        lambda: magnitude_prune_layer(bad, 0.5),
        lambda: wanda_prune(bad, jnp.ones(8), 0.5),
        lambda: sparsegpt_prune(bad, jnp.eye(8), 0.5),
        lambda: dsnot_prune(bad, jnp.ones((8, 4), bool), jnp.zeros(8), jnp.ones(8), jnp.ones(8)),
    ):
        with pytest.raises(ValueError, match=r"`weight` has 1 non-finite entry"):
            call()


def test_sparsegpt_nan_hessian_raises():
    with pytest.raises(ValueError, match=r"`hessian` has 8 non-finite entries.*X\^T X"):
        sparsegpt_prune(W, jnp.eye(8).at[2].set(jnp.nan), 0.5)


def test_prune_nnx_with_nan_calibration_batch_raises():
    model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
    batch = jnp.ones((4, 8)).at[1, 2].set(jnp.nan)
    with pytest.raises(ValueError, match="non-finite"):
        prune_nnx(model, [batch], method="wanda", sparsity=0.5, progress=False)


def test_jitted_pruning_still_traces():
    s = update_activation_stats(init_activation_stats(8), jnp.ones((3, 8)))
    pruned, mask = jax.jit(wanda_prune, static_argnums=2)(W, s.sq_sum, 0.5)
    assert int(mask.sum()) == 16
