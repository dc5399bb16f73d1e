"""Pallas-Triton kernels on CPU: interpret mode against dense math (forward, dX, dW for block-sparse and N:M),
and lowering for CUDA/ROCm through the Triton backend (no GPU here: nothing is compiled to PTX or run on one).

Tolerances: float32 1e-5, bfloat16/float16 2e-2, relative to the largest |reference| entry; references are
float32 products of the same (already rounded) inputs with ``Precision.HIGHEST``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

from pallas_kernels import compat
from pallas_kernels.block_sparse import bsr_matmul, with_data
from pallas_kernels.block_sparse import plan as bsr_plan
from pallas_kernels.block_sparse import triton as bsr_triton
from pallas_kernels.block_sparse.format import block_sparse_from_dense, block_sparse_to_dense
from pallas_kernels.nm import nm_matmul
from pallas_kernels.nm import plan as nm_plan
from pallas_kernels.nm import triton as nm_triton
from pallas_kernels.nm.format import pack_nm, unpack_nm

# jax >= 0.11 warns on every Triton lowering that the backend is deprecated; the kernels are meant for it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"
)

TRITON_CALL = "__gpu$xla.gpu.triton"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}
HI = lax.Precision.HIGHEST


def _close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _f32(a):
    return jnp.asarray(a).astype(jnp.float32)


# Test set-up under jit: one compile instead of one per eager op.
_pack_bsr = jax.jit(block_sparse_from_dense, static_argnames=("block", "capacity"))
_pack_nm = jax.jit(pack_nm, static_argnames=("n", "m", "pack_tile"))


@jax.jit
def _dense_grads(x, w_dense, dy):
    """Forward and the two VJPs of ``x @ W`` in float32 (the oracle)."""
    y, vjp = jax.vjp(lambda a, b: jnp.matmul(a, b, precision=HI), _f32(x), _f32(w_dense))
    dx, dw = vjp(_f32(dy))
    return y, dx, dw


# ------------------------------------------------------------------------------------ block-sparse
def _bsr_problem(k, n, block, density, dtype, batch, seed=0, spare=1):
    rng = np.random.default_rng(seed)
    bk, bn = block
    mask = rng.random((k // bk, n // bn)) < density
    if density < 1:
        mask[:, -1] = False  # an empty column block (forward stores zeros) ...
        mask[0, :] = False  # ... and an empty row block (dX stores zeros)
    cap = min(mask.size, int(mask.sum()) + spare)
    w = _pack_bsr(
        jnp.asarray(rng.standard_normal((k, n)), dtype), mask, block=block, capacity=max(cap, 1)
    )
    x = jnp.asarray(rng.standard_normal((*batch, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((*batch, n)), dtype)
    return w, x, dy


@jax.jit
def _stored_blocks(dw_dense, w):
    """Dense ``[K, N]`` gradient sampled at ``w``'s stored blocks (padding slots zero)."""
    kb, nb = w.grid_shape
    bk, bn = w.block
    blocks = dw_dense.reshape(kb, bk, nb, bn).transpose(0, 2, 1, 3)[w.row_idx, w.col_idx]
    return jnp.where((jnp.arange(w.capacity) < w.nnz)[:, None, None], blocks, 0)


def _check_bsr(w, x, dy, dtype, block_m=None):
    y_ref, dx_ref, dw_ref = _dense_grads(x, block_sparse_to_dense(w), dy)
    kw = dict(block_m=block_m, interpret=True)
    y = bsr_triton.bsr_matmul_triton(x, w, **kw)
    dx = bsr_triton.bsr_matmul_t_triton(dy, w, **kw)
    dw = bsr_triton.bsr_sddmm_triton(x, dy, w, **kw)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    _close(y, y_ref, dtype)
    _close(dx, dx_ref, dtype)
    _close(dw, _stored_blocks(dw_ref, w), dtype)


BSR_CASES = [
    # (K, N, block, density, dtype, batch, block_m)
    (64, 96, (16, 32), 0.5, jnp.float32, (3, 7), None),  # 21 rows: a masked partial row tile
    (128, 128, (32, 32), 0.3, jnp.bfloat16, (5,), None),
    (128, 64, (64, 16), 1.0, jnp.float32, (2, 2, 4), None),  # every block stored
    (64, 64, (32, 32), 0.75, jnp.float16, (40,), 16),  # 3 row tiles of 16
]


@pytest.mark.parametrize(
    "case", BSR_CASES, ids=["f32-21rows", "bf16-sparse", "f32-full", "f16-3tiles"]
)
def test_bsr_forward_dx_dw_interpret(case):
    k, n, block, density, dtype, batch, block_m = case
    w, x, dy = _bsr_problem(k, n, block, density, dtype, batch)
    _check_bsr(w, x, dy, dtype, block_m)


def test_bsr_empty_weight_and_zero_rows_give_zeros():
    w, x, dy = _bsr_problem(64, 64, (16, 16), 0.0, jnp.float32, (4,))
    assert int(w.nnz) == 0
    assert not np.any(np.asarray(bsr_triton.bsr_matmul_triton(x, w, interpret=True)))
    assert not np.any(np.asarray(bsr_triton.bsr_matmul_t_triton(dy, w, interpret=True)))
    assert not np.any(np.asarray(bsr_triton.bsr_sddmm_triton(x, dy, w, interpret=True)))
    w, _, _ = _bsr_problem(64, 64, (16, 16), 0.5, jnp.float32, (4,))
    x0, dy0 = jnp.zeros((0, 64)), jnp.zeros((2, 0, 64))
    assert bsr_triton.bsr_matmul_triton(x0, w, interpret=True).shape == (0, 64)
    assert bsr_triton.bsr_matmul_t_triton(dy0, w, interpret=True).shape == (2, 0, 64)
    assert not np.any(np.asarray(bsr_triton.bsr_sddmm_triton(x0, x0, w, interpret=True)))


@given(seed=st.integers(0, 2**31 - 1), density=st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]))
def test_bsr_any_pattern_one_compile(seed, density):
    """Any mask packed at one capacity reuses one compiled program (fixed capacity) and stays exact."""
    rng = np.random.default_rng(seed)
    mask = rng.random((4, 3)) < density
    w = _pack_bsr(
        jnp.asarray(rng.standard_normal((64, 48)), jnp.float32), mask, block=(16, 16), capacity=12
    )
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((5, 48)), jnp.float32)
    _check_bsr_jit(w, x, dy)
    assert _bsr_jit._cache_size() == 1


@jax.jit
def _bsr_jit(w, x, dy):
    return (
        bsr_triton.bsr_matmul_triton(x, w, interpret=True),
        bsr_triton.bsr_matmul_t_triton(dy, w, interpret=True),
        bsr_triton.bsr_sddmm_triton(x, dy, w, interpret=True),
    )


def _check_bsr_jit(w, x, dy):
    y, dx, dw = _bsr_jit(w, x, dy)
    y_ref, dx_ref, dw_ref = _dense_grads(x, block_sparse_to_dense(w), dy)
    _close(y, y_ref, jnp.float32)
    _close(dx, dx_ref, jnp.float32)
    _close(dw, _stored_blocks(dw_ref, w), jnp.float32)


def test_bsr_rejects_what_triton_cannot_tile():
    w, x, dy = _bsr_problem(96, 64, (24, 32), 0.5, jnp.float32, (2,))
    with pytest.raises(ValueError, match="bk=24 cannot be tiled by the Triton kernels"):
        bsr_triton.bsr_matmul_triton(x, w, interpret=True)
    w, x, dy = _bsr_problem(64, 64, (8, 16), 0.5, jnp.float32, (2,))
    with pytest.raises(ValueError, match="bk=8 .* power of two >= 16"):
        bsr_triton.bsr_sddmm_triton(x, dy, w, interpret=True)
    w, x, dy = _bsr_problem(64, 64, (16, 16), 0.5, jnp.float32, (2,))
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16.*got 24"):
        bsr_triton.bsr_matmul_triton(x, w, block_m=24, interpret=True)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\)"):
        bsr_triton.bsr_matmul_triton(x[:, :32], w, interpret=True)
    with pytest.raises(ValueError, match="interpret must be None/False .* or True.*got 'tpu'"):
        bsr_triton.bsr_matmul_triton(x, w, interpret="tpu")
    assert "float64" in bsr_triton.unsupported_reason((64, 64), (16, 16), np.float64)


# ---------------------------------------------------------------------------------------------- N:M
def _nm_problem(n, m, k, cols, dtype, batch, pack_tile=None, seed=0):
    rng = np.random.default_rng(seed)
    w = _pack_nm(jnp.asarray(rng.standard_normal((k, cols)), dtype), n=n, m=m, pack_tile=pack_tile)
    x = jnp.asarray(rng.standard_normal((*batch, k)), dtype)
    dy = jnp.asarray(rng.standard_normal((*batch, cols)), dtype)
    return w, x, dy


@jax.jit
def _nm_oracle(x, w, dy):
    """The dense masked product and its autodiff gradients w.r.t. ``x`` and the kept values (float32)."""

    def dense(x, values):
        return jnp.matmul(x, unpack_nm(w.replace(values=values)), precision=HI)

    y, vjp = jax.vjp(dense, _f32(x), _f32(w.values))
    return (y, *vjp(_f32(dy)))


NM_CASES = [
    # (n, m, K, N, dtype, batch, pack_tile, blocks)
    (2, 4, 256, 64, jnp.float32, (2, 9), None, (16, 32, 16)),  # 18 rows: 2 row tiles
    (1, 4, 256, 48, jnp.bfloat16, (7,), 32, (16, 16, 16)),  # 4 group tiles over 2 pack tiles
    (4, 8, 8 * 40, 72, jnp.float32, (13,), 16, (16, 16, 32)),  # G=40, N=72: masked tile edges
]


@pytest.mark.parametrize("case", NM_CASES, ids=["2of4-f32", "1of4-bf16", "4of8-f32-ragged"])
def test_nm_forward_dx_dvalues_interpret(case):
    n, m, k, cols, dtype, batch, pack_tile, blocks = case
    w, x, dy = _nm_problem(n, m, k, cols, dtype, batch, pack_tile)
    kw = dict(blocks=blocks, interpret=True)
    y = nm_triton.nm_matmul_triton(x, w, **kw)
    dx = nm_triton.nm_dx_triton(dy, w, **kw)
    dv = nm_triton.nm_dvalues_triton(x, dy, w, **kw)
    assert y.dtype == dx.dtype == dv.dtype == dtype and dv.shape == w.values.shape

    y_ref, dx_ref, dv_ref = _nm_oracle(x, w, dy)
    _close(y, y_ref, dtype)
    _close(dx, dx_ref, dtype)
    _close(dv, dv_ref, dtype)


def test_nm_bad_input_and_zero_rows():
    w, x, dy = _nm_problem(2, 4, 64, 32, jnp.float32, (2,))
    x0 = jnp.zeros((0, 64))
    assert nm_triton.nm_matmul_triton(x0, w, interpret=True).shape == (0, 32)
    assert nm_triton.nm_dx_triton(jnp.zeros((3, 0, 32)), w, interpret=True).shape == (3, 0, 64)
    dv0 = nm_triton.nm_dvalues_triton(x0, jnp.zeros((0, 32)), w, interpret=True)
    assert dv0.shape == w.values.shape and not np.any(np.asarray(dv0))
    with pytest.raises(
        ValueError, match="blocks must be .* power of two >= 16.*got \\(16, 24, 16\\)"
    ):
        nm_triton.nm_matmul_triton(x, w, blocks=(16, 24, 16), interpret=True)
    with pytest.raises(ValueError, match=r"dy must have shape \(\.\.\., 32\)"):
        nm_triton.nm_dx_triton(x, w, interpret=True)
    with pytest.raises(ValueError, match="share their batch dims"):
        nm_triton.nm_dvalues_triton(x, dy[:1], w, interpret=True)
    assert "int32" in nm_triton.unsupported_reason(jnp.int32)


# ------------------------------------------------------------------------------------------ lowering
def _lowered(fn, *args, platform="cuda", device_kind="NVIDIA A100"):
    with compat.triton_lowering_target(device_kind):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=["bf16", "f16", "f32"]
)
def test_bsr_lowers_for_cuda(dtype):
    w = jax.eval_shape(
        lambda: block_sparse_from_dense(
            jnp.zeros((256, 512), dtype), jnp.ones((4, 8), bool), block=(64, 64), capacity=16
        )
    )
    x, dy = _sds((8, 4, 256), dtype), _sds((8, 4, 512), dtype)
    for fn, args in (
        (bsr_triton.bsr_matmul_triton, (x, w)),
        (bsr_triton.bsr_matmul_t_triton, (dy, w)),
        (bsr_triton.bsr_sddmm_triton, (x, dy, w)),
    ):
        text = _lowered(fn, *args)
        assert text.count(TRITON_CALL) == 1, fn.__name__


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
def test_nm_lowers_for_cuda(nm):
    n, m = nm
    for dtype in (jnp.bfloat16, jnp.float32):
        w = jax.eval_shape(lambda: pack_nm(jnp.zeros((512, 256), dtype), n=n, m=m))
        x, dy = _sds((24, 512), dtype), _sds((24, 256), dtype)
        for fn, args in (
            (nm_triton.nm_matmul_triton, (x, w)),
            (nm_triton.nm_dx_triton, (dy, w)),
            (nm_triton.nm_dvalues_triton, (x, dy, w)),
        ):
            assert _lowered(fn, *args).count(TRITON_CALL) == 1, (fn.__name__, dtype)


def test_lowers_for_rocm():
    w = jax.eval_shape(
        lambda: block_sparse_from_dense(
            jnp.zeros((128, 128), jnp.bfloat16), jnp.eye(2, dtype=bool), block=(64, 64), capacity=2
        )
    )
    w_nm = jax.eval_shape(lambda: pack_nm(jnp.zeros((128, 128), jnp.bfloat16)))
    x = _sds((16, 128), jnp.bfloat16)
    for fn, weight in ((bsr_triton.bsr_matmul_triton, w), (nm_triton.nm_matmul_triton, w_nm)):
        text = _lowered(fn, x, weight, platform="rocm", device_kind="gfx942")
        assert TRITON_CALL in text


def test_triton_branch_never_breaks_other_platforms():
    """In a per-platform switch the Triton kernel only exists in the GPU branch: the same jitted function runs
    the XLA branch on CPU, lowers to one Triton call for CUDA and to no GPU call for TPU."""
    w, x, _ = _bsr_problem(64, 64, (16, 16), 0.5, jnp.float32, (4,))
    w_nm, x_nm, _ = _nm_problem(2, 4, 64, 64, jnp.float32, (4,))

    def f(x, w, x_nm, w_nm):
        def xla(x, w, x_nm, w_nm):
            return x @ block_sparse_to_dense(w), x_nm @ unpack_nm(w_nm)

        def gpu(x, w, x_nm, w_nm):
            return bsr_triton.bsr_matmul_triton(x, w), nm_triton.nm_matmul_triton(x_nm, w_nm)

        return lax.platform_dependent(x, w, x_nm, w_nm, default=xla, cuda=gpu, rocm=gpu)

    y, y_nm = jax.jit(f)(x, w, x_nm, w_nm)
    _close(y, x @ block_sparse_to_dense(w), jnp.float32)
    _close(y_nm, x_nm @ unpack_nm(w_nm), jnp.float32)
    args = jax.tree.map(lambda a: _sds(a.shape, a.dtype), (x, w, x_nm, w_nm))
    assert _lowered(f, *args).count(TRITON_CALL) == 2
    tpu = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert TRITON_CALL not in tpu


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_nm_default_tiles_fit_the_accumulator_budget(m):
    """dX and d(values) keep m accumulators per program: the default tiles shrink so they fit."""
    for acc_dims in ((0, 2), (0, 1), (1, 2)):
        count = 1 if acc_dims == (0, 2) else m
        for rows, groups, cols in ((1, 8, 16), (4096, 1024, 4096), (100, 300, 70)):
            tiles = nm_triton.choose_blocks(rows, groups, cols, acc_dims=acc_dims, acc_count=count)
            assert all(t >= 16 and t & (t - 1) == 0 for t in tiles)
            a, b = (tiles[d] for d in acc_dims)
            assert a * b * count <= nm_triton._ACC_BUDGET or max(a, b) == 16


# -------------------------------------------------------------------------- through the ops' dispatch
def test_bsr_matmul_runs_triton_kernels_in_interpret_mode():
    """bsr_matmul(impl="pallas", interpret="triton"): forward, dX and dW all from the Triton kernels."""
    w, x, dy = _bsr_problem(64, 96, (16, 32), 0.5, jnp.bfloat16, (3, 7), seed=5)

    def loss(x, data):
        y = bsr_matmul(x, with_data(w, data), impl="pallas", interpret="triton")
        return jnp.sum(y.astype(jnp.float32) * _f32(dy)), y

    (_, y), (gx, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w.data)
    y_ref, dx_ref, dw_ref = _dense_grads(x, block_sparse_to_dense(w), dy)
    assert y.dtype == gx.dtype == gw.dtype == jnp.bfloat16
    _close(y, y_ref, jnp.bfloat16)
    _close(gx, dx_ref, jnp.bfloat16)
    _close(gw, _stored_blocks(dw_ref, w), jnp.bfloat16)
    w24, _, _ = _bsr_problem(96, 64, (24, 32), 0.5, jnp.float32, (2,))
    with pytest.raises(ValueError, match="interpret='triton' cannot run: bk=24"):
        bsr_matmul(jnp.zeros((2, 96)), w24, impl="pallas", interpret="triton")


def test_nm_matmul_runs_triton_kernels_in_interpret_mode():
    """nm_matmul(impl="pallas", interpret="triton"): forward, dX and d(values) from the Triton kernels."""
    w, x, dy = _nm_problem(2, 4, 128, 48, jnp.float32, (2, 5), seed=6)

    def loss(x, values):
        y = nm_matmul(x, w.replace(values=values), impl="pallas", interpret="triton")
        return jnp.sum(y * dy), y

    (_, y), (gx, gv) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w.values)
    y_ref, dx_ref, dv_ref = _nm_oracle(x, w, dy)
    _close(y, y_ref, jnp.float32)
    _close(gx, dx_ref, jnp.float32)
    _close(gv, dv_ref, jnp.float32)


def test_ops_lower_to_triton_for_cuda_with_gradients():
    """gpu_backend="triton" (what sm80-sm89 gets): one jitted fwd+bwd lowers to Triton calls for CUDA."""
    w = jax.eval_shape(
        lambda: block_sparse_from_dense(
            jnp.zeros((4096, 4096), jnp.bfloat16),
            jnp.eye(64, dtype=bool),
            block=(64, 64),
            capacity=410,  # 10% of the blocks
        )
    )
    w_nm = jax.eval_shape(lambda: pack_nm(jnp.zeros((4096, 4096), jnp.bfloat16), n=2, m=4))
    x = _sds((8, 4096), jnp.bfloat16)
    kw = dict(platforms=("cuda",), gpu_backend="triton")

    def bsr_loss(x, data, pattern):
        return jnp.sum(bsr_matmul(x, with_data(pattern, data), **kw).astype(jnp.float32))

    def nm_loss(x, values, pattern):
        return jnp.sum(nm_matmul(x, pattern.replace(values=values), **kw).astype(jnp.float32))

    assert bsr_plan(8, w, **kw).backend("cuda") == "triton"
    assert nm_plan(8, w_nm, **kw).backend("cuda") == "triton"
    grad = jax.value_and_grad(bsr_loss, argnums=(0, 1))
    assert _lowered(grad, x, w.data, w).count(TRITON_CALL) == 3  # forward, dX, dW
    grad = jax.value_and_grad(nm_loss, argnums=(0, 1))
    assert _lowered(grad, x, w_nm.values, w_nm).count(TRITON_CALL) == 3  # forward, dX, d values
