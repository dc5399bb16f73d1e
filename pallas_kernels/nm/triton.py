"""Pallas-Triton N:M kernels (Ampere/Ada CUDA GPUs and ROCm): forward, dX and d(values).

All three walk the compressed :class:`~pallas_kernels.nm.format.NMWeight` directly (values ``(n, G, N)`` and
bit-packed positions ``meta``), a tile of ``bg`` groups by ``bn`` columns at a time:

* decode: the word holding group ``g``'s position is row ``(g // T) * R + (g % T) % R`` of ``meta``
  (``T = pack_tile``, ``R = T // F``, ``F`` fields per int32), at bit field ``(g % T) // R``; the kernel loads
  those words with an index-array (gather) load and shifts each row by its own field offset, so any tile of
  groups decodes without scratch memory (Triton has none) and without in-register reshapes.
* planes: for each position ``p < m`` the dense rows ``D_p = sum_s where(idx_s == p, v_s, 0)`` (``(bg, bn)``),
  the shared helper :func:`pallas_kernels.nm._tiles.plane`.
* ``x`` is read strided in-kernel, ``x_p = x[:, g * m + p]`` (``(bm, bg)``), so no de-interleaved copy.

Products (float32 accumulation, ``tt.dot`` on ``(bm, bg) x (bg, bn)`` tiles):

* forward ``y = x @ W``: grid ``(cdiv(B, bm), cdiv(N, bn))``, loop over group tiles, ``acc += x_p @ D_p``.
* dX ``dx = dy @ W.T``: grid ``(cdiv(B, bm), cdiv(G, bg))``, loop over column tiles, ``m`` accumulators
  ``dx_p += dy @ D_p.T``, stored strided to ``dx[:, g * m + p]``.
* d(values): grid ``(cdiv(G, bg), cdiv(N, bn))``, loop over row tiles, ``m`` accumulators
  ``dW_p += x_p.T @ dy`` (the dense gradient of the tile, never written to memory), then gathered at the kept
  positions: ``dv_s = sum_p where(idx_s == p, dW_p, 0)``. Same FLOPs as a dense ``x.T @ dy`` (no sparse tensor
  cores are reachable from Pallas), but no dense ``(K, N)`` gradient round trip through memory.

No shape constraints beyond power-of-two tiles >= 16: rows, groups and columns past the array ends are masked
(loads give zero, stores are dropped). Verified in interpret mode and by cross-lowering; never run on a GPU.

Example:
  >>> import jax.numpy as jnp
  >>> from pallas_kernels.nm.format import pack_nm
  >>> w_nm = pack_nm(jnp.ones((64, 8)), n=2, m=4)
  >>> nm_matmul_triton(jnp.ones((2, 64)), w_nm, interpret=True)[0, 0].item()
  32.0
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from pallas_kernels import _triton, compat
from pallas_kernels.nm import _tiles
from pallas_kernels.nm.format import NMWeight, index_bits

__all__ = [
    "SUPPORTED_DTYPES",
    "choose_blocks",
    "estimated_efficiency",
    "nm_dvalues_triton",
    "nm_dx_triton",
    "nm_matmul_triton",
    "unsupported_reason",
]

SUPPORTED_DTYPES = _triton.SUPPORTED_DTYPES


def unsupported_reason(dtype, **problem) -> str | None:
    """Why the Triton N:M kernels cannot run ``dtype``, or ``None``. Every shape and N:M pattern is tiled
    (edges are masked), so the other problem fields (``rows=``, ``k=``, ``n_out=``, ...) are ignored."""
    del problem
    return _triton.dtype_reason(dtype, "the Triton N:M kernels")


def estimated_efficiency(rows: int) -> float:
    """Throughput per FLOP relative to the dense GEMM [estimate, never measured]: the in-kernel decode (gather
    load, shifts, ``n`` selects per weight element, redone per row tile) costs CUDA-core time, and a row tile
    has >= 16 rows."""
    return 0.5 * min(max(rows, 1), _triton.MIN_DIM) / _triton.MIN_DIM


_ACC_BUDGET = 16384  # float32 accumulator elements per program (64 KiB of registers) [estimate]


def choose_blocks(
    rows: int,
    groups: int,
    cols: int,
    blocks: tuple[int, int, int] | None = None,
    *,
    acc_dims: tuple[int, int] = (0, 2),
    acc_count: int = 1,
) -> tuple[int, int, int]:
    """``(bm, bg, bn)``: rows, groups and columns per tile, powers of two >= 16 (``blocks`` if given).

    The default covers the problem up to ``(64, 32, 64)``, then halves the accumulator dims (``acc_dims``
    of ``(bm, bg, bn)``, ``acc_count`` accumulators: 1 for the forward, ``m`` for dX and d(values)) until
    they fit a register budget [estimate; not tuned on a GPU].
    """
    if blocks is None:
        tiles = [
            _triton.tile_covering(rows, cap=64),
            _triton.tile_covering(groups, cap=32),
            _triton.tile_covering(cols, cap=64),
        ]
        a, b = acc_dims
        while (
            tiles[a] * tiles[b] * acc_count > _ACC_BUDGET
            and max(tiles[a], tiles[b]) > _triton.MIN_DIM
        ):
            big = a if tiles[a] >= tiles[b] else b
            tiles[big] //= 2
        return tuple(tiles)  # type: ignore[return-value]
    if len(blocks) != 3 or not all(_triton.is_tile(b) for b in blocks):
        raise ValueError(
            f"blocks must be (bm, bg, bn), each a power of two >= {_triton.MIN_DIM} for the Triton "
            f"kernels; got {blocks!r}."
        )
    return tuple(blocks)  # type: ignore[return-value]


def _positions(meta_ref, s, g, c, valid, *, m, pack_tile):
    """Positions ``(bg, bn)`` int32 of slot ``s`` for groups ``g`` (``(bg, 1)``) and columns ``c`` (``(1, bn)``).

    Group ``g``'s word is row ``(g // T) * R + (g % T) % R`` of ``meta`` at bit field ``(g % T) // R``: one
    gather load, then a per-row shift. Masked-off entries decode to position 0.
    """
    bits = index_bits(m)
    rows_per_field = pack_tile // (32 // bits)
    off = g % pack_tile
    word_row = (g // pack_tile) * rows_per_field + off % rows_per_field
    words = compat.triton_load(meta_ref.at[s, word_row, c], mask=valid, other=0)
    shift = jnp.broadcast_to((off // rows_per_field) * bits, words.shape)
    return lax.shift_right_logical(words, shift) & ((1 << bits) - 1)


def _decode_tile(meta_ref, values_ref, g, c, *, n, m, pack_tile, groups, cols):
    """Positions and values ``[(bg, bn)] * n`` of groups ``g`` (``(bg, 1)``) and columns ``c`` (``(1, bn)``).

    Out-of-range groups / columns get position 0 and value 0, so their planes are zero.
    """
    valid = (g < groups) & (c < cols)
    idx = [_positions(meta_ref, s, g, c, valid, m=m, pack_tile=pack_tile) for s in range(n)]
    vals = [compat.triton_load(values_ref.at[s, g, c], mask=valid, other=0) for s in range(n)]
    return idx, vals


def _strided_cols(ref, r, g, p, m, valid):
    """``ref[r, g * m + p]`` (``(bm, bg)``), masked by ``valid``."""
    return compat.triton_load(ref.at[r, g * m + p], mask=valid, other=0)


def _fwd_kernel(x_ref, values_ref, meta_ref, o_ref, *, n, m, pack_tile, shape, rows, blocks, prec):
    k, cols = shape
    groups = k // m
    bm, bg, bn = blocks
    i, j = pl.program_id(0), pl.program_id(1)
    r = i * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    c = j * bn + lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    g_row = lax.broadcasted_iota(jnp.int32, (1, bg), 1)
    g_col = lax.broadcasted_iota(jnp.int32, (bg, 1), 0)

    def body(t, acc):
        g0 = t * bg
        idx, vals = _decode_tile(
            meta_ref,
            values_ref,
            g0 + g_col,
            c,
            n=n,
            m=m,
            pack_tile=pack_tile,
            groups=groups,
            cols=cols,
        )
        gx = g0 + g_row
        valid = (r < rows) & (gx < groups)
        for p in range(m):
            xp = _strided_cols(x_ref, r, gx, p, m, valid)
            d = _tiles.plane(idx, vals, p).astype(xp.dtype)
            acc = acc + jnp.dot(xp, d, precision=prec, preferred_element_type=jnp.float32)
        return acc

    acc = lax.fori_loop(0, pl.cdiv(groups, bg), body, jnp.zeros((bm, bn), jnp.float32))
    ok = (r < rows) & (c < cols)
    compat.triton_store(o_ref.at[r, c], acc.astype(o_ref.dtype), mask=ok)


def _dx_kernel(dy_ref, values_ref, meta_ref, o_ref, *, n, m, pack_tile, shape, rows, blocks, prec):
    k, cols = shape
    groups = k // m
    bm, bg, bn = blocks
    i, gt = pl.program_id(0), pl.program_id(1)
    r = i * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    g_col = gt * bg + lax.broadcasted_iota(jnp.int32, (bg, 1), 0)
    c_row = lax.broadcasted_iota(jnp.int32, (1, bn), 1)

    def body(t, accs):
        c = t * bn + c_row
        idx, vals = _decode_tile(
            meta_ref, values_ref, g_col, c, n=n, m=m, pack_tile=pack_tile, groups=groups, cols=cols
        )
        ok = (r < rows) & (c < cols)
        dy = compat.triton_load(dy_ref.at[r, c], mask=ok, other=0)
        return tuple(
            acc
            + lax.dot_general(
                dy,
                _tiles.plane(idx, vals, p).astype(dy.dtype),
                (((1,), (1,)), ((), ())),
                precision=prec,
                preferred_element_type=jnp.float32,
            )
            for p, acc in enumerate(accs)
        )

    zeros = tuple(jnp.zeros((bm, bg), jnp.float32) for _ in range(m))
    accs = lax.fori_loop(0, pl.cdiv(cols, bn), body, zeros)
    g_row = gt * bg + lax.broadcasted_iota(jnp.int32, (1, bg), 1)
    ok = (r < rows) & (g_row < groups)
    for p, acc in enumerate(accs):
        compat.triton_store(o_ref.at[r, g_row * m + p], acc.astype(o_ref.dtype), mask=ok)


def _dv_kernel(x_ref, dy_ref, meta_ref, o_ref, *, n, m, pack_tile, shape, rows, blocks, prec):
    k, cols = shape
    groups = k // m
    bm, bg, bn = blocks
    gt, j = pl.program_id(0), pl.program_id(1)
    g_row = gt * bg + lax.broadcasted_iota(jnp.int32, (1, bg), 1)
    c = j * bn + lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    r_col = lax.broadcasted_iota(jnp.int32, (bm, 1), 0)

    def body(t, accs):
        r = t * bm + r_col
        ok_x = (r < rows) & (g_row < groups)
        ok_dy = (r < rows) & (c < cols)
        dy = compat.triton_load(dy_ref.at[r, c], mask=ok_dy, other=0)
        return tuple(
            acc
            + lax.dot_general(
                _strided_cols(x_ref, r, g_row, p, m, ok_x),
                dy,
                (((0,), (0,)), ((), ())),
                precision=prec,
                preferred_element_type=jnp.float32,
            )
            for p, acc in enumerate(accs)
        )

    zeros = tuple(jnp.zeros((bg, bn), jnp.float32) for _ in range(m))
    dense = lax.fori_loop(0, pl.cdiv(rows, bm), body, zeros)  # dW_p for this tile, (bg, bn) each
    g_col = gt * bg + lax.broadcasted_iota(jnp.int32, (bg, 1), 0)
    ok = (g_col < groups) & (c < cols)
    for s in range(n):
        idx = _positions(meta_ref, s, g_col, c, ok, m=m, pack_tile=pack_tile)
        dv = jnp.zeros((bg, bn), jnp.float32)
        for p in range(m):  # one position per entry: exactly one p hits
            dv = jnp.where(idx == p, dense[p], dv)
        compat.triton_store(o_ref.at[s, g_col, c], dv.astype(o_ref.dtype), mask=ok)


# ------------------------------------------------------------------------------------ entry functions
def _check(a, w: NMWeight, width: int, name: str):
    if not isinstance(w, NMWeight):
        raise TypeError(f"w must be an NMWeight (see pack_nm); got {type(w).__name__}.")
    if a.ndim < 1 or a.shape[-1] != width:
        raise ValueError(f"{name} must have shape (..., {width}); got {name}.shape={a.shape}.")
    dtype = jnp.result_type(a.dtype, w.values.dtype)
    reason = unsupported_reason(dtype)
    if reason is not None:
        raise ValueError(f"the Triton N:M kernels cannot run this problem: {reason}.")
    return dtype


def _call(kernel, grid, out_shape, w: NMWeight, rows, blocks, prec, interpret, name, flops, *args):
    bm, bg, bn = blocks
    return pl.pallas_call(
        functools.partial(
            kernel,
            n=w.n,
            m=w.m,
            pack_tile=w.pack_tile,
            shape=w.shape,
            rows=rows,
            blocks=blocks,
            prec=prec,
        ),
        grid=grid,
        out_shape=out_shape,
        compiler_params=compat.triton_compiler_params(num_warps=8 if bm * bn >= 128 * 128 else 4),
        cost_estimate=compat.cost_estimate(
            flops=flops,
            bytes_accessed=sum(a.size * a.dtype.itemsize for a in args)
            + math.prod(out_shape.shape) * jnp.dtype(out_shape.dtype).itemsize,
        ),
        interpret=_triton.interpret_flag(interpret),
        name=name,
    )(*args)


def nm_matmul_triton(
    x: Float[Array, "... K"],
    w: NMWeight,
    out_dtype=None,
    blocks: tuple[int, int, int] | None = None,
    interpret: Any = False,
    precision: Any = None,
) -> Float[Array, "... N"]:
    """Forward ``x @ unpack_nm(w)`` with the Triton kernel (``interpret=True`` runs it on any host).

    Args:
      x: activations ``(..., K)``; ``x`` and ``w.values`` are cast to their promoted dtype.
      w: the :class:`NMWeight`.
      out_dtype: output dtype (default: the promoted dtype); accumulation is float32.
      blocks: ``(bm, bg, bn)`` rows / groups / columns per tile, powers of two >= 16.
      interpret: ``True`` runs the Pallas HLO interpreter; ``False``/``None`` compile for the GPU.
      precision: ``lax.dot_general`` precision of the in-kernel dots (float32: ``None`` = TF32 on GPU).

    Returns:
      ``(..., N)``.
    """
    dtype = _check(x, w, w.shape[0], "x")
    rows = math.prod(x.shape[:-1])
    k, cols = w.shape
    out_dtype = jnp.dtype(out_dtype or dtype)
    if rows == 0:
        return jnp.zeros((*x.shape[:-1], cols), out_dtype)
    bm, bg, bn = blocks = choose_blocks(rows, w.groups, cols, blocks)
    y = _call(
        _fwd_kernel,
        (pl.cdiv(rows, bm), pl.cdiv(cols, bn)),
        jax.ShapeDtypeStruct((rows, cols), out_dtype),
        w,
        rows,
        blocks,
        precision,
        interpret,
        f"nm{w.n}_{w.m}_matmul_triton",
        2 * rows * k * cols,
        x.reshape(rows, k).astype(dtype),
        w.values.astype(dtype),
        w.meta,
    )
    return y.reshape(*x.shape[:-1], cols)


def nm_dx_triton(
    dy: Float[Array, "... N"],
    w: NMWeight,
    out_dtype=None,
    blocks: tuple[int, int, int] | None = None,
    interpret: Any = False,
    precision: Any = None,
) -> Float[Array, "... K"]:
    """dX of ``x @ unpack_nm(w)``: ``dy @ unpack_nm(w).T`` from the same compressed weight (arguments as in
    :func:`nm_matmul_triton`)."""
    dtype = _check(dy, w, w.shape[1], "dy")
    rows = math.prod(dy.shape[:-1])
    k, cols = w.shape
    out_dtype = jnp.dtype(out_dtype or dtype)
    if rows == 0:
        return jnp.zeros((*dy.shape[:-1], k), out_dtype)
    bm, bg, bn = blocks = choose_blocks(
        rows, w.groups, cols, blocks, acc_dims=(0, 1), acc_count=w.m
    )
    dx = _call(
        _dx_kernel,
        (pl.cdiv(rows, bm), pl.cdiv(w.groups, bg)),
        jax.ShapeDtypeStruct((rows, k), out_dtype),
        w,
        rows,
        blocks,
        precision,
        interpret,
        f"nm{w.n}_{w.m}_matmul_dx_triton",
        2 * rows * k * cols,
        dy.reshape(rows, cols).astype(dtype),
        w.values.astype(dtype),
        w.meta,
    )
    return dx.reshape(*dy.shape[:-1], k)


def nm_dvalues_triton(
    x: Float[Array, "... K"],
    dy: Float[Array, "... N"],
    w: NMWeight,
    blocks: tuple[int, int, int] | None = None,
    interpret: Any = False,
    precision: Any = None,
) -> Float[Array, "n G N"]:
    """Gradient w.r.t. ``w.values`` (``(n, G, N)``, ``w.values.dtype``): ``x.T @ dy`` at the kept positions,
    computed tile by tile without a dense ``(K, N)`` gradient in memory (arguments as in
    :func:`nm_matmul_triton`)."""
    dtype = _check(x, w, w.shape[0], "x")
    _check(dy, w, w.shape[1], "dy")
    if x.shape[:-1] != dy.shape[:-1]:
        raise ValueError(
            f"x and dy must share their batch dims; got x.shape={x.shape}, dy.shape={dy.shape}."
        )
    rows = math.prod(x.shape[:-1])
    k, cols = w.shape
    if rows == 0:
        return jnp.zeros(w.values.shape, w.values.dtype)
    bm, bg, bn = blocks = choose_blocks(
        rows, w.groups, cols, blocks, acc_dims=(1, 2), acc_count=w.m
    )
    return _call(
        _dv_kernel,
        (pl.cdiv(w.groups, bg), pl.cdiv(cols, bn)),
        jax.ShapeDtypeStruct(w.values.shape, w.values.dtype),
        w,
        rows,
        blocks,
        precision,
        interpret,
        f"nm{w.n}_{w.m}_dvalues_triton",
        2 * rows * k * cols,
        x.reshape(rows, k).astype(dtype),
        dy.reshape(rows, cols).astype(dtype),
        w.meta,
    )
