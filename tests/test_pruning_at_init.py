"""GraSP and SynFlow masks: closed forms on linear models, exact counts, the iterative schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js
from jaxsparse.pruning_at_init import grasp_masks, synflow_masks


def test_grasp_keeps_the_largest_w_times_hessian_gradient_of_least_squares():
    kx, ky, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    x, y = jax.random.normal(kx, (20, 6)), jax.random.normal(ky, (20, 3))
    params = {"w": jax.random.normal(kw, (6, 3))}
    loss = lambda p, b: 0.5 * jnp.mean(jnp.sum((b[0] @ p["w"] - b[1]) ** 2, -1))
    h = x.T @ x / 20
    g = x.T @ (x @ params["w"] - y) / 20
    closed = params["w"] * (h @ g)
    for scope in ("global", "layer"):
        m = grasp_masks(loss, params, (x, y), 0.7, scope)
        np.testing.assert_array_equal(m["w"], js.masks_from_scores({"w": closed}, {"w": 0.7})["w"])
        assert int(m["w"].sum()) == 18 - int(0.7 * 18)


def test_synflow_one_round_closed_form_and_iterative_rounds_reach_exact_counts():
    ka, kb = jax.random.split(jax.random.PRNGKey(1))
    params = {"a": jax.random.normal(ka, (8, 6)), "b": jax.random.normal(kb, (6, 4))}
    f = lambda p, x: x @ p["a"] @ p["b"]
    # R = 1^T |A| |B| 1, so dR/dA_ij = (|B| 1)_j and dR/dB_jk = (1^T |A|)_j
    sa = jnp.abs(params["a"]) * jnp.abs(params["b"]).sum(1)[None]
    sb = jnp.abs(params["b"]) * jnp.abs(params["a"]).sum(0)[:, None]
    expected = js.masks_from_scores({"a": sa, "b": sb}, {"a": 0.6, "b": 0.6}, "global")
    got = synflow_masks(f, params, (1, 8), 0.6, iterations=1)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    # iterative: exact final global count, no layer emptied
    coarse = synflow_masks(f, params, (1, 8), 0.5, iterations=5)
    fine = synflow_masks(f, params, (1, 8), 0.9, iterations=10)
    assert sum(int(m.sum()) for m in jax.tree.leaves(fine)) == (48 - int(0.9 * 48)) + (
        24 - int(0.9 * 24)
    )
    assert all(int(m.sum()) > 0 for m in jax.tree.leaves(fine))  # no layer collapse
    assert sum(int(m.sum()) for m in jax.tree.leaves(coarse)) > sum(
        int(m.sum()) for m in jax.tree.leaves(fine)
    )
    with pytest.raises(ValueError, match="iterations"):
        synflow_masks(f, params, (1, 8), 0.5, iterations=0)
