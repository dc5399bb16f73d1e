"""Per-layer post-training pruners: exactness, N:M validity, an independent NumPy SparseGPT, error ordering."""

from __future__ import annotations

import math
import warnings

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given

from jaxsparse.posttraining import (
    dsnot_prune,
    hessian_from_stats,
    init_activation_stats,
    magnitude_prune_layer,
    sparsegpt_prune,
    update_activation_stats,
    wanda_prune,
    wanda_scores,
)


# ---------------------------------------------------------------------------------------------- helpers
def correlated_inputs(seed: int, tokens: int, features: int) -> np.ndarray:
    """Inputs with strongly correlated features and very different per-feature scales (like LLM activations)."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((tokens, features // 4))
    mix = rng.standard_normal((features // 4, features))
    x = latent @ mix + 0.3 * rng.standard_normal((tokens, features))
    return (x * np.exp(rng.normal(0.0, 1.0, features))).astype(np.float32)


def layer(seed: int, fan_in: int, fan_out: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((fan_in, fan_out)).astype(np.float32)


def is_nm(mask: np.ndarray, n: int, m: int) -> bool:
    groups = mask.reshape(mask.shape[0] // m, m, mask.shape[1]).sum(axis=1)
    return bool(np.all(groups == n))


def recon_error(w, w_hat, x) -> float:
    return float(
        np.linalg.norm(
            x.astype(np.float64) @ (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))
        )
    )


# ---------------------------------------------------------------------------------------------- NumPy SparseGPT
def sparsegpt_numpy(kernel, xtx, sparsity, blocksize, damp=0.01):
    """Independent float64 reimplementation of the reference sweep (torch layout: W is (out, in)).

    Unstructured counts per block are floor(s*rows*end) - floor(s*rows*start) (the library's exact-total rule).
    """
    W = np.asarray(kernel, np.float64).T.copy()
    H = np.asarray(xtx, np.float64).copy()
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * np.mean(np.diag(H)) * np.eye(cols)
    Hinv = np.linalg.inv(H)
    U = np.linalg.cholesky(Hinv).T  # upper: Hinv = U^T U
    Q = np.zeros_like(W)
    keep = np.zeros(W.shape, bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()
        U1 = U[i1:i2, i1:i2]
        Err1 = np.zeros_like(W1)
        if isinstance(sparsity, tuple):
            mask1 = np.zeros(W1.shape, bool)  # True = pruned
        else:
            score = W1**2 / np.diag(U1)[None, :] ** 2
            k = math.floor(sparsity * rows * i2 + 1e-9) - math.floor(sparsity * rows * i1 + 1e-9)
            mask1 = np.zeros(W1.size, bool)
            mask1[np.argsort(score.ravel(), kind="stable")[:k]] = True
            mask1 = mask1.reshape(W1.shape)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = U1[i, i]
            if isinstance(sparsity, tuple) and i % sparsity[1] == 0:
                n, m = sparsity
                tmp = W1[:, i : i + m] ** 2 / np.diag(U1)[i : i + m][None, :] ** 2
                low = np.argsort(tmp, axis=1, kind="stable")[:, : m - n]
                np.put_along_axis(mask1[:, i : i + m], low, True, axis=1)
            q = np.where(mask1[:, i], 0.0, w)
            err = (w - q) / d
            W1[:, i:] -= np.outer(err, U1[i, i:])
            Q[:, i1 + i] = q
            Err1[:, i] = err
        keep[:, i1:i2] = ~mask1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q.T, keep.T


@pytest.mark.parametrize(
    "fan_in,fan_out,blocksize,sparsity",
    [(24, 6, 8, 0.5), (20, 5, 8, 0.3), (16, 4, 8, (2, 4)), (24, 3, 12, (1, 3))],
)
def test_sparsegpt_matches_numpy_reference(fan_in, fan_out, blocksize, sparsity):
    x = correlated_inputs(0, 200, fan_in)
    w = layer(1, fan_in, fan_out)
    xtx = x.T.astype(np.float64) @ x
    got_w, got_m = sparsegpt_prune(w, xtx.astype(np.float32), sparsity, blocksize=blocksize)
    ref_w, ref_m = sparsegpt_numpy(w, xtx, sparsity, blocksize)
    np.testing.assert_array_equal(np.asarray(got_m), ref_m)
    np.testing.assert_allclose(np.asarray(got_w), ref_w, rtol=2e-3, atol=2e-3 * np.abs(ref_w).max())


def test_sparsegpt_dead_inputs_are_zeroed_and_loss_identity():
    x = correlated_inputs(2, 300, 16)
    x[:, 3] = 0.0  # a dead input feature
    w = layer(3, 16, 8)
    h = x.T @ x
    q, mask, loss = sparsegpt_prune(w, h, 0.5, blocksize=8, damp=0.0 + 1e-2, return_loss=True)
    assert np.all(np.asarray(q)[3] == 0)
    # OBS identity: the accumulated loss equals 1/2 sum_out dW^T H_damped dW (dead feature handled as H_ii = 1)
    hd = h.astype(np.float64)
    hd[3, 3] = 1.0
    hd += 1e-2 * np.mean(np.diag(hd)) * np.eye(16)
    w0 = w.astype(np.float64).copy()
    w0[3] = 0
    delta = w0 - np.asarray(q, np.float64)
    np.testing.assert_allclose(float(loss), 0.5 * np.trace(delta.T @ hd @ delta), rtol=1e-3)


def test_sparsegpt_zero_sparsity_is_identity():
    x = correlated_inputs(4, 100, 16)
    w = layer(5, 16, 4)
    q, mask = sparsegpt_prune(w, x.T @ x, 0.0, blocksize=8)
    assert bool(np.all(np.asarray(mask)))
    np.testing.assert_allclose(np.asarray(q), w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- exactness
@given(
    fan_in=st.sampled_from([8, 20]),
    fan_out=st.sampled_from([3, 5]),
    sparsity=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.95]),
    seed=st.integers(0, 3),
)
def test_unstructured_sparsity_is_exact(fan_in, fan_out, sparsity, seed):
    w = layer(seed, fan_in, fan_out)
    x = correlated_inputs(seed, 64, fan_in + (-fan_in) % 4)[:, :fan_in]
    per_column = fan_in - math.floor(sparsity * fan_in + 1e-9)
    total = w.size - math.floor(sparsity * w.size + 1e-9)

    for q, mask in [
        magnitude_prune_layer(w, sparsity, scope="output"),
        wanda_prune(w, (x**2).sum(0), sparsity),
    ]:
        assert np.all(np.asarray(mask).sum(0) == per_column)
        assert np.all(np.asarray(q)[~np.asarray(mask)] == 0)
    q, mask = magnitude_prune_layer(w, sparsity)
    assert int(mask.sum()) == total
    q, mask = sparsegpt_prune(w, x.T @ x, sparsity, blocksize=8)
    assert int(mask.sum()) == total and np.all(np.asarray(q)[~np.asarray(mask)] == 0)


@given(nm=st.sampled_from([(1, 2), (2, 4), (3, 4), (2, 8)]), seed=st.integers(0, 3))
def test_nm_outputs_are_valid(nm, seed):
    n, m = nm
    fan_in, fan_out = 16, 3
    w = layer(seed, fan_in, fan_out)
    x = correlated_inputs(seed, 64, fan_in + (-fan_in) % 4)[:, :fan_in]
    outs = [
        magnitude_prune_layer(w, nm),
        wanda_prune(w, (x**2).sum(0), nm),
        sparsegpt_prune(w, x.T @ x, nm, blocksize=8),
    ]
    for q, mask in outs:
        assert is_nm(np.asarray(mask), n, m)
        assert np.all(np.asarray(q)[~np.asarray(mask)] == 0)


# ---------------------------------------------------------------------------------------------- quality ordering
@pytest.mark.parametrize("sparsity", [0.5, (2, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_reconstruction_error_ordering(sparsity, seed):
    x = correlated_inputs(seed, 2048, 64)
    w = layer(seed + 10, 64, 32)
    stats = update_activation_stats(init_activation_stats(64), x)
    e_mag = recon_error(w, magnitude_prune_layer(w, sparsity)[0], x)
    e_wanda = recon_error(w, wanda_prune(w, stats.sq_sum, sparsity)[0], x)
    e_sgpt = recon_error(w, sparsegpt_prune(w, hessian_from_stats(stats), sparsity)[0], x)
    assert e_sgpt <= e_wanda <= e_mag, (e_sgpt, e_wanda, e_mag)


# ---------------------------------------------------------------------------------------------- Wanda properties
def test_wanda_equal_norms_is_per_output_magnitude_and_scale_invariance():
    w = layer(7, 16, 5)
    _, m_wanda = wanda_prune(w, np.full(16, 3.0, np.float32), 0.5)
    _, m_mag = magnitude_prune_layer(w, 0.5, scope="output")
    np.testing.assert_array_equal(np.asarray(m_wanda), np.asarray(m_mag))
    norms = np.random.default_rng(0).uniform(0.5, 2.0, 16).astype(np.float32)
    c = np.ones(16, np.float32)
    c[4] = 3.0  # scaling input 4 by c scales row 4's scores by c
    np.testing.assert_allclose(
        np.asarray(wanda_scores(w, norms * c**2))[4],
        3.0 * np.asarray(wanda_scores(w, norms))[4],
        rtol=1e-6,
    )


# ---------------------------------------------------------------------------------------------- DSnoT
def _dsnot_case(seed, fan_in=32, fan_out=6, sparsity=0.5):
    x = correlated_inputs(seed, 512, fan_in) + 1.0  # nonzero means so eps is large
    w = layer(seed + 20, fan_in, fan_out)
    stats = update_activation_stats(init_activation_stats(fan_in, hessian=False), x)
    mean, var = x.mean(0), x.var(0)
    _, mask = wanda_prune(w, stats.sq_sum, sparsity)
    return x, w, mask, mean, var, stats.sq_sum


def _eps(w, mask, mean):
    return (np.where(np.asarray(mask), 0.0, w) * mean[:, None]).sum(0)


@pytest.mark.parametrize("seed", [0, 1])
def test_dsnot_preserves_counts_and_moves_eps_towards_zero(seed):
    x, w, mask, mean, var, sq = _dsnot_case(seed)
    q, new = dsnot_prune(w, mask, mean, var, sq, update_threshold=0.0)
    new = np.asarray(new)
    np.testing.assert_array_equal(new.sum(0), np.asarray(mask).sum(0))
    assert np.all(np.asarray(q)[~new] == 0) and np.allclose(np.asarray(q)[new], w[new])
    assert not np.array_equal(new, np.asarray(mask))
    # one cycle: every changed column moved eps towards zero
    _, one = dsnot_prune(w, mask, mean, var, sq, update_threshold=0.0, max_cycles=1)
    e0, e1 = _eps(w, mask, mean), _eps(w, one, mean)
    changed = np.any(np.asarray(one) != np.asarray(mask), axis=0)
    assert changed.any() and np.all(np.sign(e0[changed]) * (e1[changed] - e0[changed]) < 0)
    # sum of |eps| over columns goes down over the full run (statistically; overshoot is allowed per swap)
    assert np.abs(_eps(w, new, mean)).sum() < np.abs(e0).sum()


def test_dsnot_nm_and_identities():
    x, w, _, mean, var, sq = _dsnot_case(3)
    _, mask = wanda_prune(w, sq, (2, 4))
    _, new = dsnot_prune(w, mask, mean, var, sq, nm_group_size=4, update_threshold=0.0)
    assert is_nm(np.asarray(new), 2, 4)
    for kw in [dict(update_threshold=float("inf")), dict(max_cycles=0)]:
        _, same = dsnot_prune(w, mask, mean, var, sq, **kw)
        np.testing.assert_array_equal(np.asarray(same), np.asarray(mask))


def test_functions_are_jittable():
    x, w, mask, mean, var, sq = _dsnot_case(4, fan_in=16)
    h = x.T @ x
    calls = [
        (lambda w, s: wanda_prune(w, s, 0.5), (w, sq)),
        (lambda w, h: sparsegpt_prune(w, h, (2, 4), blocksize=8), (w, h)),
        (lambda w, m: dsnot_prune(w, m, mean, var, sq), (w, mask)),
        (lambda w: magnitude_prune_layer(w, 0.5), (w,)),
    ]
    for fn, args in calls:  # jitted == eager: weights to float32 rounding, masks exactly
        (w_jit, m_jit), (w_eager, m_eager) = jax.jit(fn)(*args), fn(*args)
        np.testing.assert_array_equal(np.asarray(m_jit), np.asarray(m_eager))
        np.testing.assert_allclose(np.asarray(w_jit), np.asarray(w_eager), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    w = layer(0, 12, 4)
    with pytest.raises(ValueError, match=r"act_sq_norm.*\(12,\).*\(10,\)"):
        wanda_prune(w, np.ones(10, np.float32), 0.5)
    with pytest.raises(ValueError, match=r"hessian.*\(12, 12\).*\(10, 10\)"):
        sparsegpt_prune(w, np.eye(10, dtype=np.float32), 0.5)
    with pytest.raises(ValueError, match=r"sparsity.*2:8.*in_features=12"):
        wanda_prune(w, np.ones(12, np.float32), (2, 8))
    with pytest.raises(ValueError, match=r"sparsity.*\[0, 1\).*1.5"):
        magnitude_prune_layer(w, 1.5)
    with pytest.raises(ValueError, match=r"`n` must be <= `m`"):
        magnitude_prune_layer(w, (4, 2))
    with pytest.raises(TypeError, match=r"weight.*floating"):
        magnitude_prune_layer(np.ones((4, 4), np.int32), 0.5)
    with pytest.raises(ValueError, match=r"`x` must have 12 features.*\(5, 7\)"):
        update_activation_stats(init_activation_stats(12), np.ones((5, 7), np.float32))
    with pytest.raises(ValueError, match=r"blocksize.*multiple of m=4"):
        sparsegpt_prune(w, np.eye(12, dtype=np.float32), (2, 4), blocksize=6)


def test_too_few_tokens_warns_with_dampening():
    x = correlated_inputs(0, 8, 12)
    with pytest.warns(
        UserWarning, match=r"8 calibration tokens for 12 input features.*dampening.*0\.01 \*"
    ):
        q, _ = sparsegpt_prune(layer(0, 12, 4), x.T @ x, 0.5, num_tokens=8)
    assert np.all(np.isfinite(np.asarray(q)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsegpt_prune(layer(0, 12, 4), x.T @ x, 0.5, num_tokens=64)


# ---------------------------------------------------------------------------------------------- sharding
def test_statistics_under_sharding_equal_single_device():
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py sets 8 host devices"
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    x = correlated_inputs(5, 8 * 64, 16).reshape(8, 64, 16)
    sharded = jax.device_put(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    )
    update = jax.jit(update_activation_stats)
    s0 = init_activation_stats(16)
    single = update(s0, jax.device_put(x, devices[0]))
    multi = update(update(s0, sharded[:4]), sharded[4:])
    assert len(sharded.sharding.device_set) == 8
    for a, b in zip(single, multi):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-3)
