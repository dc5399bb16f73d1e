"""Pallas-Triton block-sparse kernels (Ampere/Ada CUDA GPUs and ROCm): forward, dX and dW.

The Triton backend of Pallas has no scalar prefetch, no scratch memory and no dynamic grid, so the
data-dependent part is an in-kernel loop over the fixed-capacity :class:`BlockSparseWeight` with
pointer-offset loads (``pl.ds`` at a traced offset) and explicit row masks:

* ``matmul``   ``y = x @ W``: grid ``(cdiv(M, bm), Nb)``; program ``(i, j)`` walks column block ``j``'s
  stored blocks ``col_ptr[j]:col_ptr[j+1]`` (column-grouped order), loads the ``(bm, bk)`` activation block
  at ``row_idx[t]`` and accumulates ``x_blk @ data[t]`` in float32. Empty column blocks store zeros.
* ``matmul_t`` ``dx = dy @ W.T``: the same loop on the transposed view (``row_ptr``, ``t_col_idx``,
  ``t_perm``); each block is contracted on its column dim (``tt.trans`` in registers, no transposed copy).
* ``sddmm``    ``dW_b = x[:, k_b].T @ dy[:, j_b]`` only at the stored blocks: grid ``(capacity,)``,
  each program reduces over ``M`` in ``bm``-row chunks; padding slots (``b >= nnz``) store zeros.

Rows need not be a multiple of ``bm``: loads past ``M`` are masked to zero and stores past ``M`` are masked
off, so no padded copy of the activations is made. Block sizes must be powers of two of at least 16
(Triton tensors have power-of-two sizes and ``tt.dot`` needs every dim >= 16): see
:func:`unsupported_reason`. Accumulation is float32; inputs float32 (TF32 tensor-core math under the default
matmul precision, as ``jnp.dot`` on Ampere), bfloat16 or float16.

Every kernel runs on any host with ``interpret=True`` (Pallas HLO interpreter). Lowering for CUDA from a
host without a GPU needs :func:`pallas_kernels.compat.triton_lowering_target` on jax >= 0.11. Verified in
interpret mode and by cross-lowering only; never run on a GPU.

Example:
  >>> import jax.numpy as jnp
  >>> from pallas_kernels.block_sparse.format import block_sparse_from_dense
  >>> mask = jnp.array([[True, False], [True, True]])
  >>> w = block_sparse_from_dense(jnp.ones((32, 32)), mask, block=(16, 16), capacity=3)
  >>> bsr_matmul_triton(jnp.ones((2, 32)), w, interpret=True)[0, ::8].tolist()
  [32.0, 32.0, 16.0, 16.0]
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels import _triton, compat
from pallas_kernels.block_sparse.format import BlockSparseWeight

__all__ = [
    "SUPPORTED_DTYPES",
    "bsr_matmul_triton",
    "bsr_matmul_t_triton",
    "bsr_sddmm_triton",
    "estimated_efficiency",
    "matmul",
    "matmul_t",
    "pick_block_m",
    "sddmm",
    "unsupported_reason",
]

SUPPORTED_DTYPES = _triton.SUPPORTED_DTYPES


def unsupported_reason(shape: tuple[int, int], block: tuple[int, int], dtype) -> str | None:
    """Why the Triton kernels cannot run this configuration, or ``None`` if they can."""
    del shape
    reason = _triton.dtype_reason(dtype, "the Triton kernels")
    if reason is not None:
        return reason
    for name, b in zip(("bk", "bn"), block):
        if not _triton.is_tile(int(b)):
            return (
                f"{name}={b} cannot be tiled by the Triton kernels: Triton tensors have power-of-two "
                f"sizes and tt.dot needs every dim >= {_triton.MIN_DIM}, so it must be a power of two "
                f">= {_triton.MIN_DIM}"
            )
    return None


def pick_block_m(m: int, block_m: int | None = None) -> int:
    """Rows per program: ``block_m`` (a power of two >= 16) or the power of two covering ``m``, in [16, 64]."""
    if block_m is None:
        return _triton.tile_covering(m, cap=64)
    if not _triton.is_tile(block_m):
        raise ValueError(
            f"block_m must be a power of two >= {_triton.MIN_DIM} for the Triton kernels; got {block_m!r}."
        )
    return block_m


def estimated_efficiency(m: int, w: BlockSparseWeight) -> float:
    """Throughput per executed FLOP relative to the dense GEMM on an A100 [estimate, never measured]: Triton
    block-sparse kernels lose most at small blocks (pytorch/pytorch#115030), and a row tile has >= 16 rows."""
    per_block = {16: 0.2, 32: 0.4}.get(min(w.block), 0.6)
    return per_block * min(max(m, 1), _triton.MIN_DIM) / _triton.MIN_DIM


def _num_warps(rows: int, cols: int) -> int:
    return 8 if rows * cols >= 128 * 128 else 4


def _row_mask(i, bm: int, m: int, width: int):
    rows = i * bm + lax.broadcasted_iota(jnp.int32, (bm, width), 0)
    return rows < m


def _reduce_kernel(
    ptr_ref, in_idx_ref, perm_ref, lhs_ref, data_ref, o_ref, *, m, bm, transpose_w, precision
):
    """One ``(bm, out_b)`` output tile: sum over the stored blocks of its output block."""
    i, j = pl.program_id(0), pl.program_id(1)
    bk, bn = data_ref.shape[1:]
    lhs_b, out_b = (bn, bk) if transpose_w else (bk, bn)
    lhs_mask = _row_mask(i, bm, m, lhs_b)
    contract = 1 if transpose_w else 0

    def body(t, acc):
        c = in_idx_ref[t]
        lhs = compat.triton_load(
            lhs_ref.at[pl.ds(i * bm, bm), pl.ds(pl.multiple_of(c * lhs_b, lhs_b), lhs_b)],
            mask=lhs_mask,
            other=0,
        )
        blk = data_ref[perm_ref[t]] if perm_ref is not None else data_ref[t]
        return acc + lax.dot_general(
            lhs,
            blk,
            (((1,), (contract,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    acc = lax.fori_loop(ptr_ref[j], ptr_ref[j + 1], body, jnp.zeros((bm, out_b), jnp.float32))
    compat.triton_store(
        o_ref.at[pl.ds(i * bm, bm), pl.ds(pl.multiple_of(j * out_b, out_b), out_b)],
        acc.astype(o_ref.dtype),
        mask=_row_mask(i, bm, m, out_b),
    )


def _reduce_call(lhs, data, ptr, in_idx, perm, *, transpose_w, block_m, interpret, precision):
    m = lhs.shape[0]
    cap, bk, bn = data.shape
    lhs_b, out_b = (bn, bk) if transpose_w else (bk, bn)
    n_out = ptr.shape[0] - 1
    bm = pick_block_m(m, block_m)
    args = (ptr, in_idx) + ((perm,) if perm is not None else ()) + (lhs, data)

    def kernel(*refs):
        if perm is None:
            ptr_ref, in_idx_ref, lhs_ref, data_ref, o_ref = refs
            perm_ref = None
        else:
            ptr_ref, in_idx_ref, perm_ref, lhs_ref, data_ref, o_ref = refs
        _reduce_kernel(
            ptr_ref,
            in_idx_ref,
            perm_ref,
            lhs_ref,
            data_ref,
            o_ref,
            m=m,
            bm=bm,
            transpose_w=transpose_w,
            precision=precision,
        )

    itemsize = jnp.dtype(lhs.dtype).itemsize
    mb = pl.cdiv(m, bm)
    return pl.pallas_call(
        kernel,
        grid=(mb, n_out),
        out_shape=jax.ShapeDtypeStruct((m, n_out * out_b), lhs.dtype),
        compiler_params=compat.triton_compiler_params(num_warps=_num_warps(bm, out_b)),
        cost_estimate=compat.cost_estimate(
            flops=2 * mb * bm * cap * bk * bn,
            bytes_accessed=itemsize * (m * cap * lhs_b + mb * cap * bk * bn + m * n_out * out_b),
        ),
        interpret=_triton.interpret_flag(interpret),
        name="bsr_matmul_t_triton" if transpose_w else "bsr_matmul_triton",
    )(*args)


def matmul(
    x: Float[Array, "M K"],
    data: Float[Array, "cap bk bn"],
    row_idx: Int[Array, " cap"],
    col_ptr: Int[Array, " nbp1"],
    *,
    block_m: int | None = None,
    interpret: Any = False,
    precision=None,
) -> Float[Array, "M N"]:
    """``x @ W`` for column-grouped stored blocks: column block ``j`` owns ``col_ptr[j]:col_ptr[j+1]``."""
    return _reduce_call(
        x,
        data,
        col_ptr,
        row_idx,
        None,
        transpose_w=False,
        block_m=block_m,
        interpret=interpret,
        precision=precision,
    )


def matmul_t(
    dy: Float[Array, "M N"],
    data: Float[Array, "cap bk bn"],
    t_col_idx: Int[Array, " cap"],
    t_perm: Int[Array, " cap"],
    row_ptr: Int[Array, " kbp1"],
    *,
    block_m: int | None = None,
    interpret: Any = False,
    precision=None,
) -> Float[Array, "M K"]:
    """``dy @ W.T`` from the transposed view: K block ``k`` owns transposed entries ``row_ptr[k]:row_ptr[k+1]``,
    entry ``t`` is ``data[t_perm[t]]`` at column block ``t_col_idx[t]``."""
    return _reduce_call(
        dy,
        data,
        row_ptr,
        t_col_idx,
        t_perm,
        transpose_w=True,
        block_m=block_m,
        interpret=interpret,
        precision=precision,
    )


def _sddmm_kernel(nnz_ref, row_ref, col_ref, x_ref, dy_ref, o_ref, *, m, bm, precision):
    b = pl.program_id(0)
    bk, bn = o_ref.shape[1:]
    k0 = pl.multiple_of(row_ref[b] * bk, bk)
    j0 = pl.multiple_of(col_ref[b] * bn, bn)
    steps = jnp.where(b < nnz_ref[0], pl.cdiv(m, bm), 0)  # padding slots: no work, zero block

    def body(s, acc):
        xb = compat.triton_load(
            x_ref.at[pl.ds(s * bm, bm), pl.ds(k0, bk)], mask=_row_mask(s, bm, m, bk), other=0
        )
        dyb = compat.triton_load(
            dy_ref.at[pl.ds(s * bm, bm), pl.ds(j0, bn)], mask=_row_mask(s, bm, m, bn), other=0
        )
        return acc + lax.dot_general(
            xb,
            dyb,
            (((0,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), jnp.float32))
    o_ref[b] = acc.astype(o_ref.dtype)


def sddmm(
    x: Float[Array, "M K"],
    dy: Float[Array, "M N"],
    nnz: Int[Array, ""],
    row_idx: Int[Array, " cap"],
    col_idx: Int[Array, " cap"],
    *,
    block: tuple[int, int],
    dtype,
    block_m: int | None = None,
    interpret: Any = False,
    precision=None,
) -> Float[Array, "cap bk bn"]:
    """``dW_b = x[:, k_b].T @ dy[:, j_b]`` for every stored block ``b``; padding slots get zero."""
    m = x.shape[0]
    bk, bn = block
    cap = row_idx.shape[0]
    bm = pick_block_m(m, block_m)
    nnz_arr = jnp.reshape(nnz, (1,)).astype(jnp.int32)
    itemsize = jnp.dtype(x.dtype).itemsize
    return pl.pallas_call(
        functools.partial(_sddmm_kernel, m=m, bm=bm, precision=precision),
        grid=(cap,),
        out_shape=jax.ShapeDtypeStruct((cap, bk, bn), dtype),
        compiler_params=compat.triton_compiler_params(num_warps=_num_warps(bk, bn)),
        cost_estimate=compat.cost_estimate(
            flops=2 * m * cap * bk * bn,
            bytes_accessed=itemsize * (m * cap * (bk + bn) + cap * bk * bn),
        ),
        interpret=_triton.interpret_flag(interpret),
        name="bsr_sddmm_triton",
    )(nnz_arr, row_idx, col_idx, x, dy.astype(x.dtype))


# ------------------------------------------------------------------------------------ entry functions
def _check(a, w: BlockSparseWeight, width: int, name: str) -> None:
    if not isinstance(w, BlockSparseWeight):
        raise TypeError(f"w must be a BlockSparseWeight; got {type(w).__name__}.")
    if a.ndim < 1 or a.shape[-1] != width:
        raise ValueError(f"{name} must have shape (..., {width}); got {name}.shape={a.shape}.")
    reason = unsupported_reason(w.shape, w.block, a.dtype)
    if reason is not None:
        raise ValueError(f"the Triton block-sparse kernels cannot run this weight: {reason}.")


def _flat(a: Array) -> Array:
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])


def bsr_matmul_triton(
    x: Float[Array, "... K"],
    w: BlockSparseWeight,
    block_m: int | None = None,
    interpret: Any = False,
    precision=None,
) -> Float[Array, "... N"]:
    """Forward ``x @ W`` with the Triton kernel (``interpret=True`` runs it on any host).

    Args:
      x: activations ``(..., K)`` (cast to ``w.dtype``).
      w: the block-sparse weight (blocks powers of two >= 16).
      block_m: rows per program (power of two >= 16); default from :func:`pick_block_m`.
      interpret: ``True`` runs the Pallas HLO interpreter; ``False``/``None`` compile for the GPU.
      precision: ``lax.dot_general`` precision of the in-kernel dots (float32 inputs: ``None`` = TF32 on GPU).

    Returns:
      ``(..., N)`` in ``w.dtype``, accumulated in float32.
    """
    _check(x, w, w.shape[0], "x")
    if x.size == 0:
        return jnp.zeros((*x.shape[:-1], w.shape[1]), w.dtype)
    y = matmul(
        _flat(x).astype(w.dtype),
        w.data,
        w.row_idx,
        w.col_ptr,
        block_m=block_m,
        interpret=interpret,
        precision=precision,
    )
    return y.reshape(*x.shape[:-1], w.shape[1])


def bsr_matmul_t_triton(
    dy: Float[Array, "... N"],
    w: BlockSparseWeight,
    block_m: int | None = None,
    interpret: Any = False,
    precision=None,
) -> Float[Array, "... K"]:
    """dX of ``x @ W``: ``dy @ W.T`` on the transposed view of ``w`` (same arguments as
    :func:`bsr_matmul_triton`)."""
    _check(dy, w, w.shape[1], "dy")
    if dy.size == 0:
        return jnp.zeros((*dy.shape[:-1], w.shape[0]), w.dtype)
    dx = matmul_t(
        _flat(dy).astype(w.dtype),
        w.data,
        w.t_col_idx,
        w.t_perm,
        w.row_ptr,
        block_m=block_m,
        interpret=interpret,
        precision=precision,
    )
    return dx.reshape(*dy.shape[:-1], w.shape[0])


def bsr_sddmm_triton(
    x: Float[Array, "... K"],
    dy: Float[Array, "... N"],
    w: BlockSparseWeight,
    block_m: int | None = None,
    interpret: Any = False,
    precision=None,
) -> Float[Array, "cap bk bn"]:
    """dW of ``x @ W`` at the stored blocks only: ``(x.T @ dy)`` sampled at ``w``'s blocks, in ``w.dtype``,
    padding slots zero (same layout as ``w.data``)."""
    _check(x, w, w.shape[0], "x")
    _check(dy, w, w.shape[1], "dy")
    if x.shape[:-1] != dy.shape[:-1]:
        raise ValueError(
            f"x and dy must share their batch dims; got x.shape={x.shape}, dy.shape={dy.shape}."
        )
    if x.size == 0:
        return jnp.zeros_like(w.data)
    return sddmm(
        _flat(x).astype(w.dtype),
        _flat(dy).astype(w.dtype),
        w.nnz,
        w.row_idx,
        w.col_idx,
        block=w.block,
        dtype=w.dtype,
        block_m=block_m,
        interpret=interpret,
        precision=precision,
    )
