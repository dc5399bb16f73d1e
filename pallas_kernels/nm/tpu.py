"""Mosaic TPU kernels for N:M matmul: forward ``x @ W`` and input gradient ``dy @ W.T``.

Layout ("planes"): the activations are de-interleaved outside the kernel into ``x_p = x[:, p::m]``
(``(m, B, G)``, one XLA transpose of the activations). Per K tile the kernel unpacks the position codes of
``bg`` groups into an int32 VMEM scratch (static chunk slices, see :mod:`pallas_kernels.nm.format`), builds
for each position ``p`` the dense plane ``D_p = sum_s where(idx_s == p, v_s, 0)`` (``(bg, bn)``) and
accumulates ``x_p @ D_p`` in f32. Only 2-D element-wise ops and dots: no in-kernel reshapes.

The input gradient walks the same compressed weight with the reduction over ``N`` innermost:
``dx_p += dy @ D_p.T`` (``dot_general`` contracting the lane dims), then re-interleaves outside.

Tile rules (Mosaic TPU): the last two block dims are multiples of (8, 128) or the full dims, so
``bg`` is the full (padded) group count or a multiple of ``lcm(pack_tile, 128)``; ``bn`` is ``N`` or a
multiple of 128; ``bm`` is ``B`` or 256. Shapes that do not tile are zero-padded (a copy; aligned model
shapes such as 4096 x 4096 need none).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from pallas_kernels import compat
from pallas_kernels.nm import _tiles
from pallas_kernels.nm.format import NMWeight, index_bits

__all__ = ["nm_matmul_tpu", "nm_dx_tpu", "choose_blocks", "resolve_interpret"]

_MAX_BG = 512
_MAX_BN = 512
_MAX_BM = 256


def resolve_interpret(interpret: Any) -> Any:
    """``False``/``None`` (compile), ``True``/``"hlo"`` (HLO interpreter) or ``"tpu"`` (TPU interpret mode)."""
    if interpret is None or interpret is False:
        return False
    if interpret is True:
        return True
    if interpret in ("hlo", "tpu"):
        return compat.interpret_params(interpret)
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    raise ValueError(f"interpret={interpret!r} is not allowed: use False, True/'hlo' or 'tpu'")


def _round_up(a, b):
    return -(-a // b) * b


def choose_blocks(rows: int, gp: int, cols: int, pack_tile: int) -> tuple[int, int, int]:
    """Default ``(bm, bg, bn)`` for ``rows`` x ``gp`` groups x ``cols``, following the TPU block rules."""
    bm = rows if rows <= _MAX_BM else _MAX_BM
    if gp <= _MAX_BG:
        bg = gp
    else:
        step = math.lcm(pack_tile, 128)
        cands = [c for c in range(step, _MAX_BG + 1, step) if gp % c == 0]
        bg = max(cands) if cands else step
    if cols <= _MAX_BN:
        bn = cols
    else:
        cands = [c for c in (512, 384, 256, 128) if cols % c == 0]
        bn = cands[0] if cands else 128
    return bm, bg, bn


def _check_blocks(blocks, pack_tile):
    bm, bg, bn = blocks
    if bg % pack_tile:
        raise ValueError(
            f"blocks={blocks}: the group tile bg={bg} must be a multiple of pack_tile={pack_tile}"
        )
    if min(blocks) <= 0:
        raise ValueError(f"blocks={blocks} must be positive")


def _prepare(w: NMWeight, rows: int, blocks):
    """Pads values / meta to the tile grid. Returns (values, meta, (bm, bg, bn), (Bp, Gt, Np))."""
    f = 32 // index_bits(w.m)
    gp = w.meta.shape[1] * f
    k, cols = w.shape
    blocks = blocks or choose_blocks(rows, gp, cols, w.pack_tile)
    _check_blocks(blocks, w.pack_tile)
    bm, bg, bn = blocks
    bp, gt, np_ = _round_up(rows, bm), _round_up(gp, bg), _round_up(cols, bn)
    values = jnp.pad(w.values, ((0, 0), (0, gt - w.groups), (0, np_ - cols)))
    meta = jnp.pad(w.meta, ((0, 0), (0, (gt - gp) // f), (0, np_ - cols)))
    return values, meta, blocks, (bp, gt, np_)


def _decode_into(meta_ref, idx_ref, *, n, m, pack_tile, bg):
    def words(s, lo, hi):
        return meta_ref[s, lo:hi, :]

    def store(s, lo, hi, code):
        idx_ref[s, lo:hi, :] = code

    for s in range(n):
        _tiles.decode_positions(words, s, m=m, pack_tile=pack_tile, tile_groups=bg, store=store)


def _fwd_kernel(x_ref, v_ref, meta_ref, o_ref, acc_ref, idx_ref, *, n, m, pack_tile, bg):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    _decode_into(meta_ref, idx_ref, n=n, m=m, pack_tile=pack_tile, bg=bg)
    idx = [idx_ref[s] for s in range(n)]
    vals = [v_ref[s] for s in range(n)]
    acc = acc_ref[...]
    for p in range(m):
        d = _tiles.plane(idx, vals, p).astype(x_ref.dtype)
        acc += jnp.dot(x_ref[p], d, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _dx_kernel(dy_ref, v_ref, meta_ref, o_ref, acc_ref, idx_ref, *, n, m, pack_tile, bg):
    jj = pl.program_id(2)

    @pl.when(jj == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    _decode_into(meta_ref, idx_ref, n=n, m=m, pack_tile=pack_tile, bg=bg)
    idx = [idx_ref[s] for s in range(n)]
    vals = [v_ref[s] for s in range(n)]
    dy = dy_ref[...]
    for p in range(m):
        d = _tiles.plane(idx, vals, p).astype(dy.dtype)
        acc_ref[p] += jax.lax.dot_general(
            dy, d, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )

    @pl.when(jj == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def deinterleave(x2: Float[Array, "B K"], m: int) -> Float[Array, "m B G"]:
    """``x[:, p::m]`` stacked over ``p``."""
    rows, k = x2.shape
    return x2.reshape(rows, k // m, m).transpose(2, 0, 1)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "blocks"))
def nm_matmul_tpu(
    x2: Float[Array, "B K"],
    w: NMWeight,
    *,
    out_dtype=None,
    interpret: Any = False,
    blocks: tuple[int, int, int] | None = None,
) -> Float[Array, "B N"]:
    """``x2 @ unpack_nm(w)`` with the Mosaic TPU kernel (``interpret`` runs it anywhere, see
    :func:`resolve_interpret`).

    Example::

      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import pack_nm
      >>> w_nm = pack_nm(jnp.ones((64, 8)), n=2, m=4)
      >>> nm_matmul_tpu(jnp.ones((2, 64)), w_nm, interpret=True)[0, 0].item()
      32.0
    """
    rows, k = x2.shape
    n, m = w.n, w.m
    cols = w.shape[1]
    dtype = jnp.result_type(x2.dtype, w.values.dtype)
    out_dtype = out_dtype or dtype
    values, meta, (bm, bg, bn), (bp, gt, np_) = _prepare(w, rows, blocks)
    xd = deinterleave(x2.astype(dtype), m)
    xd = jnp.pad(xd, ((0, 0), (0, bp - rows), (0, gt - w.groups)))
    f = 32 // index_bits(m)
    kernel = functools.partial(_fwd_kernel, n=n, m=m, pack_tile=w.pack_tile, bg=bg)
    out = pl.pallas_call(
        kernel,
        grid=(bp // bm, np_ // bn, gt // bg),
        in_specs=[
            pl.BlockSpec((m, bm, bg), lambda i, j, g: (0, i, g)),
            pl.BlockSpec((n, bg, bn), lambda i, j, g: (0, g, j)),
            pl.BlockSpec((n, bg // f, bn), lambda i, j, g: (0, g, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, g: (i, j)),
        out_shape=jax.ShapeDtypeStruct((bp, np_), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32), pltpu.VMEM((n, bg, bn), jnp.int32)],
        compiler_params=compat.tpu_compiler_params(("parallel", "parallel", "arbitrary")),
        interpret=resolve_interpret(interpret),
        cost_estimate=compat.cost_estimate(
            flops=2 * bp * k * np_,
            bytes_accessed=xd.size * xd.dtype.itemsize
            + values.size * values.dtype.itemsize
            + meta.size * 4
            + bp * np_ * jnp.dtype(out_dtype).itemsize,
        ),
        name=f"nm{n}_{m}_matmul",
    )(xd, values.astype(dtype), meta)
    return out[:rows, :cols]


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "blocks"))
def nm_dx_tpu(
    dy: Float[Array, "B N"],
    w: NMWeight,
    *,
    out_dtype=None,
    interpret: Any = False,
    blocks: tuple[int, int, int] | None = None,
) -> Float[Array, "B K"]:
    """``dy @ unpack_nm(w).T`` (input gradient) with the Mosaic TPU kernel, from the same compressed weight."""
    rows, cols = dy.shape
    n, m = w.n, w.m
    dtype = jnp.result_type(dy.dtype, w.values.dtype)
    out_dtype = out_dtype or dtype
    values, meta, (bm, bg, bn), (bp, gt, np_) = _prepare(w, rows, blocks)
    dyp = jnp.pad(dy.astype(dtype), ((0, bp - rows), (0, np_ - cols)))
    f = 32 // index_bits(m)
    kernel = functools.partial(_dx_kernel, n=n, m=m, pack_tile=w.pack_tile, bg=bg)
    out = pl.pallas_call(
        kernel,
        grid=(bp // bm, gt // bg, np_ // bn),
        in_specs=[
            pl.BlockSpec((bm, bn), lambda i, g, j: (i, j)),
            pl.BlockSpec((n, bg, bn), lambda i, g, j: (0, g, j)),
            pl.BlockSpec((n, bg // f, bn), lambda i, g, j: (0, g, j)),
        ],
        out_specs=pl.BlockSpec((m, bm, bg), lambda i, g, j: (0, i, g)),
        out_shape=jax.ShapeDtypeStruct((m, bp, gt), out_dtype),
        scratch_shapes=[pltpu.VMEM((m, bm, bg), jnp.float32), pltpu.VMEM((n, bg, bn), jnp.int32)],
        compiler_params=compat.tpu_compiler_params(("parallel", "parallel", "arbitrary")),
        interpret=resolve_interpret(interpret),
        name=f"nm{n}_{m}_matmul_dx",
    )(dyp, values.astype(dtype), meta)
    dx = out[:, :rows, : w.groups]  # (m, B, G)
    return dx.transpose(1, 2, 0).reshape(rows, w.shape[0])
