"""bsr_matmul kernels on CPU: interpret modes against the dense masked reference (values and gradients),
TPU-interpret checks that plain interpret mode misses, cross-lowering for tpu/cuda, recompilation, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat, dispatch
from pallas_kernels.block_sparse import (
    block_sparse_from_dense,
    bsr_matmul,
    plan,
    reference,
    with_data,
)
from pallas_kernels.block_sparse import tpu as tpu_kernels


def _mask(rng, kb, nb, pattern):
    if pattern == "one_block":
        m = np.zeros((kb, nb), bool)
        m[kb - 1, nb // 2] = True
    elif pattern == "full":
        m = np.ones((kb, nb), bool)
    elif pattern == "empty":
        m = np.zeros((kb, nb), bool)
    elif pattern == "empty_rows_cols":
        m = rng.random((kb, nb)) < 0.7
        m[:, 0] = m[:, -1] = False
        m[1, :] = False
        m[0, 1] = True
    else:
        m = rng.random((kb, nb)) < 0.5
    return m


def _problem(k, n, bk, bn, pattern, dtype, batch, seed=0, spare=1):
    rng = np.random.default_rng(seed)
    mask = _mask(rng, k // bk, n // bn, pattern)
    capacity = min(mask.size, max(1, int(mask.sum()) + spare))
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    bsw = block_sparse_from_dense(w, mask, block=(bk, bn), capacity=capacity)
    x = jnp.asarray(rng.standard_normal((*batch, k)), dtype)
    ct = jnp.asarray(rng.standard_normal((*batch, n)), dtype)
    return bsw, x, ct


def _value_and_grads(matmul, bsw, x, ct):
    def loss(x, data):
        y = matmul(x, with_data(bsw, data))
        return jnp.sum(y.astype(jnp.float32) * ct.astype(jnp.float32)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, bsw.data)
    return y, grads


def _assert_close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def _check_against_reference(bsw, x, ct, **kwargs):
    y, (dx, dw) = _value_and_grads(lambda a, b: bsr_matmul(a, b, **kwargs), bsw, x, ct)
    y_ref, (dx_ref, dw_ref) = _value_and_grads(reference.dense_masked_reference, bsw, x, ct)
    _assert_close(y, y_ref, x.dtype)
    _assert_close(dx, dx_ref, x.dtype)
    _assert_close(dw, dw_ref, x.dtype)
    # dW is exactly zero in padding slots (those blocks are not part of W)
    assert not np.asarray(dw[int(bsw.nnz) :], np.float32).any()


CASES = [
    # K, N, bk, bn, pattern, dtype, batch, block_m
    (32, 48, 8, 16, "random", jnp.float32, (5,), None),
    (32, 48, 8, 16, "random", jnp.bfloat16, (2, 3), None),
    (64, 64, 16, 16, "one_block", jnp.float32, (4,), None),
    (64, 96, 16, 16, "empty_rows_cols", jnp.float32, (3,), None),
    (32, 64, 16, 32, "full", jnp.bfloat16, (7,), None),
    (64, 32, 32, 16, "random", jnp.float32, (), None),
    (64, 128, 32, 32, "random", jnp.bfloat16, (20,), 16),  # several M blocks, padded rows
    (32, 32, 8, 8, "empty", jnp.float32, (2,), None),
]


@pytest.mark.parametrize("k, n, bk, bn, pattern, dtype, batch, block_m", CASES)
def test_interpret_kernel_matches_dense_reference(k, n, bk, bn, pattern, dtype, batch, block_m):
    bsw, x, ct = _problem(k, n, bk, bn, pattern, dtype, batch)
    _check_against_reference(bsw, x, ct, impl="pallas", interpret="hlo", block_m=block_m)


@pytest.mark.parametrize("impl", ["dense", "xla", "auto"])
def test_xla_paths_match_dense_reference(impl):
    bsw, x, ct = _problem(64, 96, 16, 16, "empty_rows_cols", jnp.float32, (2, 3), seed=3)
    _check_against_reference(bsw, x, ct, impl=impl)


@pytest.mark.parametrize(
    "k, n, bk, bn, pattern, dtype, batch",
    [
        (32, 64, 16, 32, "empty_rows_cols", jnp.float32, (8,)),  # 8 steps per kernel
        (64, 64, 32, 32, "random", jnp.bfloat16, (3,)),
    ],
)
def test_tpu_interpret_mode_matches_dense_reference(k, n, bk, bn, pattern, dtype, batch):
    bsw, x, ct = _problem(k, n, bk, bn, pattern, dtype, batch, seed=5)
    with compat.tpu_interpret_guard():
        _check_against_reference(bsw, x, ct, impl="pallas", interpret="tpu")


def _column_interleaved_entries():
    """A pattern whose entries revisit output block 0 after visiting block 1 (illegal on TPU)."""
    bsw, x, _ = _problem(32, 32, 16, 16, "full", jnp.float32, (8,), spare=0)
    order = np.array(
        [0, 2, 1, 3]
    )  # entries (col 0,row 0), (col 1,row 0), (col 0,row 1), (col 1,row 1)
    return x, bsw.data[order], bsw.nnz, bsw.row_idx[order], bsw.col_idx[order], bsw


def test_tpu_interpret_catches_non_consecutive_output_revisit_that_hlo_interpret_misses():
    x, data, nnz, row, col, bsw = _column_interleaved_entries()
    wrong = tpu_kernels.matmul(x, data, nnz, row, col, bsw.col_ptr, interpret=True)
    assert not np.allclose(
        wrong, reference.matmul(x, bsw)
    )  # plain interpret silently gives a wrong answer
    with pytest.raises(Exception, match="Revisit"):
        with compat.tpu_interpret_guard():
            jax.block_until_ready(
                tpu_kernels.matmul(
                    x, data, nnz, row, col, bsw.col_ptr, interpret=compat.tpu_interpret_params()
                )
            )


def test_tpu_interpret_catches_out_of_bounds_block_index():
    bsw, x, _ = _problem(32, 32, 16, 16, "full", jnp.float32, (8,), spare=0)
    bad_row = bsw.row_idx.at[1].set(2)  # K has only 2 blocks
    tpu_kernels.matmul(
        x, bsw.data, bsw.nnz, bad_row, bsw.col_idx, bsw.col_ptr, interpret=True
    )  # no error
    with pytest.raises(Exception, match="(?i)out-of-bounds"):
        with compat.tpu_interpret_guard():
            jax.block_until_ready(
                tpu_kernels.matmul(
                    x,
                    bsw.data,
                    bsw.nnz,
                    bad_row,
                    bsw.col_idx,
                    bsw.col_ptr,
                    interpret=compat.tpu_interpret_params(),
                )
            )


def test_mosaic_gpu_interpret_matches_dense_reference():
    bsw, x, ct = _problem(256, 256, 64, 128, "empty_rows_cols", jnp.bfloat16, (70,), seed=2)
    _check_against_reference(bsw, x, ct, impl="pallas", interpret="mosaic_gpu", block_m=64)


def test_one_compilation_across_three_patterns_of_same_capacity():
    capacity = 6
    traces = []

    @jax.jit
    def train_step(w_dense, mask, x):
        traces.append(1)
        bsw = block_sparse_from_dense(w_dense, mask, block=(8, 16), capacity=capacity)
        loss = lambda d: jnp.sum(
            bsr_matmul(x, with_data(bsw, d), impl="pallas", interpret="hlo") ** 2
        )
        return jax.value_and_grad(loss)(bsw.data), bsw

    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 32)), jnp.float32)
    for pattern in (
        [(0, 0)],
        [(1, 2), (3, 3), (2, 0)],
        [(0, 1), (1, 1), (2, 1), (3, 1), (0, 3), (3, 0)],
    ):
        mask = np.zeros((4, 4), bool)
        mask[tuple(np.array(pattern).T)] = True
        (loss, grad), bsw = train_step(w, jnp.asarray(mask), x)
        ref_loss, ref_grad = jax.value_and_grad(
            lambda d: jnp.sum(reference.dense_masked_reference(x, with_data(bsw, d)) ** 2)
        )(bsw.data)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-4)
    assert len(traces) == 1
    assert train_step._cache_size() == 1


@pytest.mark.parametrize("platform, marker", [("tpu", "tpu_custom_call"), ("cuda", "mosaic_gpu")])
def test_fwd_and_bwd_lower_for_accelerators_from_cpu(monkeypatch, platform, marker):
    monkeypatch.setattr(dispatch, "default_platform", lambda: platform)
    bsw, x, _ = _problem(512, 256, 128, 128, "random", jnp.bfloat16, (256,), seed=1)

    def fwd_bwd(x, data):
        y, vjp = jax.vjp(lambda a, d: bsr_matmul(a, with_data(bsw, d), impl="pallas"), x, data)
        return y, vjp(y)

    text = jax.jit(fwd_bwd).trace(x, bsw.data).lower(lowering_platforms=(platform,)).as_text()
    n_kernels = 3 if platform == "tpu" else 2  # on cuda, dW is the XLA SDDMM
    assert text.count(marker) >= n_kernels
    assert plan(256, bsw, impl="pallas").backend(platform) == (
        "tpu" if platform == "tpu" else "mosaic_gpu"
    )


def test_one_jitted_function_runs_xla_on_cpu_and_lowers_to_kernels_elsewhere(monkeypatch):
    bsw, x, _ = _problem(512, 256, 128, 128, "random", jnp.bfloat16, (256,), seed=1)
    platforms = ("cpu", "tpu", "cuda")
    f = jax.jit(lambda x, w: bsr_matmul(x, w, impl="auto", platforms=platforms))
    p = plan(256, bsw, impl="auto", platforms=platforms)
    assert p.backend("cpu") in ("dense", "xla")
    _assert_close(f(x, bsw), reference.dense_masked_reference(x, bsw), jnp.bfloat16)
    if p.backend("tpu") == "tpu":
        assert "tpu_custom_call" in f.trace(x, bsw).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize(
    "make_args, kwargs, error, message",
    [
        (
            lambda b, x: (x.astype(jnp.bfloat16), b),
            {},
            TypeError,
            r"x.dtype=bfloat16 must equal the weight dtype",
        ),
        (
            lambda b, x: (x[..., :-1], b),
            {},
            ValueError,
            r"x must have shape \(\.\.\., K\) with K = w.shape\[0\] = 32",
        ),
        (lambda b, x: (x, b.data), {}, TypeError, "w must be a BlockSparseWeight"),
        (
            lambda b, x: (x, b),
            dict(impl="fast"),
            ValueError,
            r"impl must be one of \('auto', 'dense', 'xla', 'pallas'\)",
        ),
        (lambda b, x: (x, b), dict(interpret="hlo"), ValueError, "needs impl='pallas'"),
        (
            lambda b, x: (x, b),
            dict(impl="pallas"),
            ValueError,
            "impl='pallas' needs a TPU or GPU",
        ),
        (
            lambda b, x: (x, b),
            dict(impl="pallas", interpret="gpu"),
            ValueError,
            "interpret must be None or one of",
        ),
        (
            lambda b, x: (x, b),
            dict(impl="pallas", interpret="mosaic_gpu"),
            ValueError,
            "dtype float32 is not supported by the Mosaic-GPU kernel",
        ),
        (
            lambda b, x: (x, b),
            dict(block_m=0),
            ValueError,
            "block_m must be None or a positive int",
        ),
    ],
)
def test_bad_matmul_input_is_rejected(make_args, kwargs, error, message):
    bsw, x, _ = _problem(32, 32, 16, 16, "random", jnp.float32, (3,))
    with pytest.raises(error, match=message):
        bsr_matmul(*make_args(bsw, x), **kwargs)


@pytest.mark.parametrize(
    "platform, block, message",
    [
        ("tpu", (64, 128), r"bk=64 cannot be tiled on TPU: .* multiple of 128"),
        ("cuda", (32, 128), r"bk=32 cannot be tiled by the Mosaic-GPU kernel: .* multiple of 64"),
    ],
)
def test_untileable_block_sizes_raise_when_pallas_is_forced(monkeypatch, platform, block, message):
    monkeypatch.setattr(dispatch, "default_platform", lambda: platform)
    bsw, x, _ = _problem(256, 256, *block, "random", jnp.bfloat16, (4,))
    gpu_backend = None if platform == "tpu" else "mosaic_gpu"  # on sm90 Triton would take bk=32
    with pytest.raises(ValueError, match=message):
        bsr_matmul(x, bsw, impl="pallas", gpu_backend=gpu_backend)
    # impl="auto" falls back to XLA (or dense) for that platform instead of failing
    assert plan(4, bsw, impl="auto").backend(platform) in ("xla", "dense")
