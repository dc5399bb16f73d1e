"""Mosaic-TPU block-sparse kernels: scalar-prefetched block indices drive the BlockSpec index maps.

Three ``pallas_call``s share one design, a flattened grid over the fixed-capacity list of stored blocks:

* ``matmul``      ``y  = x @ W``     grid ``(Mb, capacity)``, entries in column-grouped order.
* ``matmul_t``    ``dx = dy @ W.T``  grid ``(Mb, capacity)``, entries in the transposed (row-grouped) order,
  each block contracted on its column dim in VMEM (no transposed copy of ``data``).
* ``sddmm``       ``dW_b = x[:, k_b].T @ dy[:, j_b]``  grid ``(capacity, Mb)``, reduction over M innermost.

Steps past ``nnz`` (padding) point at the last live block, so the pipeline issues no new DMA, and skip compute.
Output blocks are revisited only on consecutive steps (entries are sorted by output block). Output blocks
that own no stored block are never written by the kernel; an XLA select on the block counts (``*_ptr``)
zeroes them afterwards. (Aliasing a zero-filled input instead would also work, but TPU interpret mode skips
its revisit check for aliased outputs, so that bug class would go untested.) The grid depends only on the
capacity, so changing the pattern does not recompile.

TPU tiling rule: the last two dims of every block must be multiples of (8, 128) or equal the array dims. The
activation blocks are ``(bm, bk)``/``(bm, bn)``, so ``bk`` and ``bn`` must be multiples of 128 (or equal K / N);
see :func:`unsupported_reason`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels import compat

__all__ = ["matmul", "matmul_t", "pick_block_m", "sddmm", "sublane", "unsupported_reason"]

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def unsupported_reason(shape: tuple[int, int], block: tuple[int, int], dtype) -> str | None:
    """Why the compiled TPU kernel cannot run this configuration, or ``None`` if it can."""
    k, n = shape
    bk, bn = block
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype)} is not supported by the TPU kernel (float32, bfloat16)"
    for name, b, full in (("bk", bk, k), ("bn", bn, n)):
        if b % 128 and b != full:
            return (
                f"{name}={b} cannot be tiled on TPU: activation blocks put it on the 128-wide lane dim, so it "
                f"must be a multiple of 128 (or equal the full dim {full})"
            )
    return None


def sublane(dtype) -> int:
    return 16 if jnp.dtype(dtype).itemsize == 2 else 8


def pick_block_m(m: int, dtype, block_m: int | None = None) -> int:
    """Rows per grid step: ``block_m`` or up to 256, a multiple of the sublane packing."""
    if block_m is not None:
        return block_m
    s = sublane(dtype)
    return min(256, -(-m // s) * s)


def _pad_rows(a: Array, bm: int) -> Array:
    pad = -a.shape[0] % bm
    return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


def _clamp(t, nnz):
    return jnp.minimum(t, jnp.maximum(nnz - 1, 0))


def _reduce_kernel(
    nnz_ref, out_idx_ref, in_idx_ref, perm_ref, lhs_ref, w_ref, o_ref, acc_ref, *, transpose_w: bool
):
    del in_idx_ref, perm_ref
    t = pl.program_id(1)
    nnz = nnz_ref[0]
    cap = pl.num_programs(1)
    live = t < nnz
    r = out_idx_ref[t]
    first = live & ((t == 0) | (out_idx_ref[jnp.maximum(t - 1, 0)] != r))
    last = live & ((t == nnz - 1) | (out_idx_ref[jnp.minimum(t + 1, cap - 1)] != r))

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live)
    def _():
        contract = 1 if transpose_w else 0
        acc_ref[...] += lax.dot_general(
            lhs_ref[...],
            w_ref[0],
            (((1,), (contract,)), ((), ())),
            preferred_element_type=jnp.float32,
        )

    @pl.when(last)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def matmul(
    x: Float[Array, "M K"],
    data: Float[Array, "cap bk bn"],
    nnz: Int[Array, ""],
    row_idx: Int[Array, " cap"],
    col_idx: Int[Array, " cap"],
    col_ptr: Int[Array, " nbp1"],
    *,
    block_m: int | None = None,
    interpret=False,
) -> Float[Array, "M N"]:
    """``x @ W`` with ``W`` given by column-grouped entries (``col_idx`` non-decreasing over live entries)."""
    cap = data.shape[0]
    return _call(
        x,
        data,
        nnz,
        out_idx=col_idx,
        in_idx=row_idx,
        perm=jnp.arange(cap, dtype=jnp.int32),
        out_ptr=col_ptr,
        transpose_w=False,
        block_m=block_m,
        interpret=interpret,
    )


def matmul_t(
    dy: Float[Array, "M N"],
    data: Float[Array, "cap bk bn"],
    nnz: Int[Array, ""],
    t_row_idx: Int[Array, " cap"],
    t_col_idx: Int[Array, " cap"],
    t_perm: Int[Array, " cap"],
    row_ptr: Int[Array, " kbp1"],
    *,
    block_m: int | None = None,
    interpret=False,
) -> Float[Array, "M K"]:
    """``dy @ W.T`` with ``W`` given by its transposed (row-grouped) entries."""
    return _call(
        dy,
        data,
        nnz,
        out_idx=t_row_idx,
        in_idx=t_col_idx,
        perm=t_perm,
        out_ptr=row_ptr,
        transpose_w=True,
        block_m=block_m,
        interpret=interpret,
    )


def _call(lhs, data, nnz, *, out_idx, in_idx, perm, out_ptr, transpose_w, block_m, interpret):
    m = lhs.shape[0]
    cap, bk, bn = data.shape
    lhs_b, out_b = (bn, bk) if transpose_w else (bk, bn)
    out_width = (out_ptr.shape[0] - 1) * out_b
    bm = pick_block_m(m, lhs.dtype, block_m)
    lhs = _pad_rows(lhs, bm)
    mp = lhs.shape[0]
    nnz_arr = jnp.reshape(nnz, (1,)).astype(jnp.int32)

    def lhs_map(i, t, nnz_ref, out_idx, in_idx, perm):
        return (i, in_idx[t])

    def w_map(i, t, nnz_ref, out_idx, in_idx, perm):
        return (perm[_clamp(t, nnz_ref[0])], 0, 0)

    def out_map(i, t, nnz_ref, out_idx, in_idx, perm):
        return (i, out_idx[t])

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(mp // bm, cap),
        in_specs=[
            pl.BlockSpec((bm, lhs_b), lhs_map),
            pl.BlockSpec((1, bk, bn), w_map),
        ],
        out_specs=pl.BlockSpec((bm, out_b), out_map),
        scratch_shapes=[pltpu.VMEM((bm, out_b), jnp.float32)],
    )
    itemsize = jnp.dtype(lhs.dtype).itemsize
    out = pl.pallas_call(
        functools.partial(_reduce_kernel, transpose_w=transpose_w),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((mp, out_width), lhs.dtype),
        compiler_params=compat.tpu_compiler_params(("parallel", "arbitrary")),
        cost_estimate=compat.cost_estimate(
            flops=2 * mp * cap * bk * bn,
            bytes_accessed=itemsize
            * (mp * cap * lhs_b + (mp // bm) * cap * bk * bn + mp * out_width),
        ),
        interpret=interpret,
    )(nnz_arr, out_idx, in_idx, perm, lhs, data)
    visited = jnp.repeat(jnp.diff(out_ptr) > 0, out_b)  # output columns the kernel wrote
    return jnp.where(visited[None, :], out[:m], 0).astype(lhs.dtype)


def _sddmm_kernel(nnz_ref, row_ref, col_ref, x_ref, dy_ref, o_ref, acc_ref):
    del row_ref, col_ref
    b, i = pl.program_id(0), pl.program_id(1)
    live = b < nnz_ref[0]

    @pl.when(i == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live)
    def _():
        acc_ref[...] += lax.dot_general(
            x_ref[...], dy_ref[...], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    @pl.when(i == pl.num_programs(1) - 1)
    def _():
        o_ref[0] = jnp.where(live, acc_ref[...], 0.0).astype(o_ref.dtype)


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
    interpret=False,
) -> Float[Array, "cap bk bn"]:
    """``dW_b = x[:, k_b].T @ dy[:, j_b]`` for every stored block ``b``; padding slots get zero."""
    bk, bn = block
    cap = row_idx.shape[0]
    bm = pick_block_m(x.shape[0], x.dtype, block_m)
    x, dy = _pad_rows(x, bm), _pad_rows(dy, bm)
    mp = x.shape[0]
    nnz_arr = jnp.reshape(nnz, (1,)).astype(jnp.int32)

    # Padding entries pin every index to the last live block and row-block 0: no DMA after the first step.
    def x_map(b, i, nnz_ref, row, col):
        live = b < nnz_ref[0]
        return (jnp.where(live, i, 0), row[_clamp(b, nnz_ref[0])])

    def dy_map(b, i, nnz_ref, row, col):
        live = b < nnz_ref[0]
        return (jnp.where(live, i, 0), col[_clamp(b, nnz_ref[0])])

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(cap, mp // bm),
        in_specs=[pl.BlockSpec((bm, bk), x_map), pl.BlockSpec((bm, bn), dy_map)],
        out_specs=pl.BlockSpec((1, bk, bn), lambda b, i, *_: (b, 0, 0)),
        scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)],
    )
    itemsize = jnp.dtype(x.dtype).itemsize
    return pl.pallas_call(
        _sddmm_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((cap, bk, bn), dtype),
        compiler_params=compat.tpu_compiler_params(("parallel", "arbitrary")),
        cost_estimate=compat.cost_estimate(
            flops=2 * mp * cap * bk * bn,
            bytes_accessed=itemsize * (mp * cap * (bk + bn) + cap * bk * bn),
        ),
        interpret=interpret,
    )(nnz_arr, row_idx, col_idx, x, dy)
