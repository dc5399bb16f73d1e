"""Mosaic GPU (Hopper, sm90) N:M kernels: ``plgpu.kernel`` + TMA ``emit_pipeline`` + ``wgmma``.

Hopper's sparse tensor cores (``wgmma.sp``) are not reachable from Pallas in jax 0.10–0.11, so these kernels
save *bytes* (the compressed weight is what crosses HBM), not FLOPs: they can only win at few rows.

Forward, one CTA per ``(tile_m, bn)`` output tile, pipelined over K tiles of ``bg`` groups:

* TMA brings the ``m`` de-interleaved activation planes ``x_p`` (``(tile_m, bg)``, swizzled), the ``n``
  value slots ``(bg, bn)`` and the ``n`` packed-position tiles ``(bg // F, bn)`` int32;
* slot by slot, the positions are unpacked into an int32 SMEM scratch (static chunk slices) and merged into
  the dense planes ``D_p = sum_s where(idx_s == p, v_s, 0)`` (registers in WGMMA layout, stored to swizzled
  SMEM buffers);
* ``m`` wgmmas ``acc += x_p @ D_p``.

Input gradient: one CTA per ``(tile_m, bg)`` tile of ``dx_p``, pipelined over ``N`` tiles, the same unpacking,
then ``acc_p += dy @ D_p.T`` (wgmma with a transposed SMEM view of ``D_p``), at most 4 planes per CTA
(accumulator registers).

Constraints (:func:`unsupported_reason`): bfloat16/float16, 64-row/64-group/64-column tiles, the weight's
``pack_tile`` must divide 64 (the default), and the shared-memory estimate must fit.
Verified only in Mosaic-GPU interpret mode and by lowering for CUDA from CPU; never compiled by ptxas or run
on a GPU. In interpret mode the explicit register-layout loads are replaced by plain loads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from pallas_kernels import compat
from pallas_kernels.nm import _tiles
from pallas_kernels.nm.format import NMWeight, index_bits

__all__ = ["nm_matmul_mosaic_gpu", "nm_dx_mosaic_gpu", "unsupported_reason"]

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
TILE = 64  # tile_m = bg = bn: one warpgroup, 128-byte swizzle of 2-byte elements
SWIZZLE_BYTES = 128
SMEM_BUDGET = 200 * 1024  # of H100's 227 KB per block, leaving room for barriers / pipeline state
MAX_DX_PLANES = 4  # f32 accumulators (64 x 64 each) held in registers per CTA


def _smem_bytes(n: int, m: int, item: int, steps: int) -> tuple[int, int]:
    t2 = TILE * TILE
    fwd = (
        steps
        * (m * t2 * item + n * t2 * item + n * t2 // 8)  # x planes, values, meta (<= 4 bits each)
        + m * t2 * item
        + t2 * 4
        + t2 * item
    )  # D_p planes, positions, output tile
    dx = steps * (t2 * item + n * t2 * item + n * t2 // 8) + m * t2 * item + t2 * 4 + 2 * t2 * item
    return fwd, dx


def _pipeline_steps(n: int, m: int, item: int) -> int | None:
    for steps in (2, 1):
        if max(_smem_bytes(n, m, item, steps)) <= SMEM_BUDGET:
            return steps
    return None


def unsupported_reason(
    *, rows: int, k: int, n_out: int, n: int, m: int, dtype, pack_tile: int | None = None
) -> str | None:
    """Why the Mosaic-GPU N:M kernels cannot run this problem, or ``None`` if they can."""
    del rows, k
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} is not supported by the Mosaic-GPU N:M kernel (bfloat16, float16)"
    if n_out % TILE:
        return f"N={n_out} is not a multiple of the {TILE}-column tile"
    if pack_tile is not None and TILE % pack_tile:
        return f"pack_tile={pack_tile} does not divide the {TILE}-group K tile; re-pack with the default"
    if _pipeline_steps(n, m, jnp.dtype(dtype).itemsize) is None:
        return f"{n}:{m} tiles do not fit in shared memory ({SMEM_BUDGET} B budget)"
    return None


def _check(w: NMWeight, dtype):
    reason = unsupported_reason(
        rows=1, k=w.shape[0], n_out=w.shape[1], n=w.n, m=w.m, dtype=dtype, pack_tile=w.pack_tile
    )
    if reason:
        raise ValueError(f"Mosaic-GPU N:M kernel cannot run: {reason}")


def _prepare(w: NMWeight):
    """values (n*Gt, N) and meta (n*Gt/F, N) with the group axis padded to the K tile."""
    f = 32 // index_bits(w.m)
    gp = w.meta.shape[1] * f
    gt = -(-gp // TILE) * TILE
    values = jnp.pad(w.values, ((0, 0), (0, gt - w.groups), (0, 0))).reshape(w.n * gt, w.shape[1])
    meta = jnp.pad(w.meta, ((0, 0), (0, (gt - gp) // f), (0, 0))).reshape(w.n * gt // f, w.shape[1])
    return values, meta, gt, f


def _build_planes(meta_refs, val_refs, idx_smem, w_smem, *, n, m, pack_tile, interpret):
    """Unpacks positions and writes the m dense planes D_p of this tile to the swizzled w_smem[p].

    Slot by slot through one int32 position buffer (shared memory is the limit, not ALU):
    ``D_p = where(idx_0 == p, v_0, 0)``, then ``D_p = where(idx_s == p, v_s, D_p)``.
    """
    for s in range(n):
        _tiles.decode_positions(
            lambda s_, lo, hi: meta_refs[s_][lo:hi, :],
            s,
            m=m,
            pack_tile=pack_tile,
            tile_groups=TILE,
            store=lambda s_, lo, hi, code: idx_smem.__setitem__(slice(lo, hi), code),
        )
        idx = compat.mosaic_gpu_load(idx_smem, layout="WGMMA", interpret=interpret)
        val = compat.mosaic_gpu_load(val_refs[s], layout="WGMMA", interpret=interpret)
        for p in range(m):
            if s == 0:
                w_smem[p] = jnp.where(idx == p, val, jnp.zeros((), val.dtype))
            else:
                w_smem[p] = jnp.where(idx == p, val, w_smem[p])


def _transforms(dtype):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    elems = SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE_BYTES))


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def nm_matmul_mosaic_gpu(
    x2: Float[Array, "B K"], w: NMWeight, *, out_dtype=None, interpret=None
) -> Float[Array, "B N"]:
    """``x2 @ unpack_nm(w)`` on Hopper (``interpret``: ``compat.mosaic_gpu_interpret_params()`` or None)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = w.values.dtype
    _check(w, dtype)
    rows, k = x2.shape
    n, m, cols = w.n, w.m, w.shape[1]
    out_dtype = out_dtype or dtype
    values, meta, gt, f = _prepare(w)
    bp = -(-rows // TILE) * TILE
    mb, kt = bp // TILE, gt // TILE
    xd = x2.astype(dtype).reshape(rows, w.groups, m).transpose(2, 0, 1)
    xd = jnp.pad(xd, ((0, 0), (0, bp - rows), (0, gt - w.groups))).reshape(m * bp, gt)
    tr = _transforms(dtype)
    steps = _pipeline_steps(n, m, jnp.dtype(dtype).itemsize)
    interp = interpret is not None

    def body(x_gmem, v_gmem, meta_gmem, o_gmem, o_smem, idx_smem, w_smem):
        mi = lax.axis_index("m")
        nj = lax.axis_index("n")

        def acc_scope(acc):
            def step(_, *refs):
                x_refs, v_refs, meta_refs = refs[:m], refs[m : m + n], refs[m + n :]
                _build_planes(
                    meta_refs,
                    v_refs,
                    idx_smem,
                    w_smem,
                    n=n,
                    m=m,
                    pack_tile=w.pack_tile,
                    interpret=interp,
                )
                plgpu.commit_smem()
                for p in range(m):
                    plgpu.wgmma(acc, x_refs[p], w_smem.at[p])
                plgpu.wgmma_wait(0)  # w_smem / idx_smem are rewritten by the next step

            specs = (
                [
                    plgpu.BlockSpec((TILE, TILE), lambda t, p=p: (p * mb + mi, t), transforms=tr)
                    for p in range(m)
                ]
                + [plgpu.BlockSpec((TILE, TILE), lambda t, s=s: (s * kt + t, nj)) for s in range(n)]
                + [
                    plgpu.BlockSpec((TILE // f, TILE), lambda t, s=s: (s * kt + t, nj))
                    for s in range(n)
                ]
            )
            plgpu.emit_pipeline(step, grid=(kt,), in_specs=specs, max_concurrent_steps=steps)(
                *([x_gmem] * m + [v_gmem] * n + [meta_gmem] * n)
            )
            return acc[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((TILE, TILE), jnp.float32))  # zero-initialised
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * TILE, TILE), pl.ds(nj * TILE, TILE)])
        plgpu.wait_smem_to_gmem(0)

    out = compat.mosaic_gpu_kernel(
        body,
        out_type=jax.ShapeDtypeStruct((bp, cols), out_dtype),
        scratch_types=dict(
            o_smem=plgpu.SMEM((TILE, TILE), out_dtype, transforms=_transforms(out_dtype)),
            idx_smem=plgpu.SMEM((TILE, TILE), jnp.int32),
            w_smem=plgpu.SMEM((m, TILE, TILE), dtype, transforms=tr),
        ),
        grid=(mb, cols // TILE),
        grid_names=("m", "n"),
        compiler_params=compat.mosaic_gpu_lane_params(),
        interpret=interpret,
    )(xd, values, meta)
    return out[:rows]


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def nm_dx_mosaic_gpu(
    dy: Float[Array, "B N"], w: NMWeight, *, out_dtype=None, interpret=None
) -> Float[Array, "B K"]:
    """``dy @ unpack_nm(w).T`` (input gradient) on Hopper, from the same compressed weight."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    dtype = w.values.dtype
    _check(w, dtype)
    rows, cols = dy.shape
    n, m = w.n, w.m
    out_dtype = out_dtype or dtype
    values, meta, gt, f = _prepare(w)
    bp = -(-rows // TILE) * TILE
    kt, nt = gt // TILE, cols // TILE
    planes = max(d for d in range(1, MAX_DX_PLANES + 1) if m % d == 0)  # planes per CTA
    dyp = jnp.pad(dy.astype(dtype), ((0, bp - rows), (0, 0)))
    tr = _transforms(dtype)
    steps = _pipeline_steps(n, m, jnp.dtype(dtype).itemsize)
    interp = interpret is not None

    def body(dy_gmem, v_gmem, meta_gmem, o_gmem, o_smem, idx_smem, w_smem, wt_smem=None):
        mi = lax.axis_index("m")
        gi = lax.axis_index("g")
        pc = lax.axis_index("p")

        def acc_scope(*accs):
            def step(_, dy_ref, *refs):
                v_refs, meta_refs = refs[:n], refs[n:]
                _build_planes(
                    meta_refs,
                    v_refs,
                    idx_smem,
                    w_smem,
                    n=n,
                    m=m,
                    pack_tile=w.pack_tile,
                    interpret=interp,
                )
                plgpu.commit_smem()
                for j, acc in enumerate(accs):
                    plane = w_smem.at[pc * planes + j]
                    if interp:  # the Mosaic-GPU interpreter has no transposed wgmma operand: store D_p.T instead
                        wt_smem[...] = plane[...].T
                        plgpu.wgmma(acc, dy_ref, wt_smem)
                    else:
                        plgpu.wgmma(acc, dy_ref, plane.transpose((1, 0)))
                    plgpu.wgmma_wait(0)

            specs = (
                [plgpu.BlockSpec((TILE, TILE), lambda t: (mi, t), transforms=tr)]
                + [plgpu.BlockSpec((TILE, TILE), lambda t, s=s: (s * kt + gi, t)) for s in range(n)]
                + [
                    plgpu.BlockSpec((TILE // f, TILE), lambda t, s=s: (s * kt + gi, t))
                    for s in range(n)
                ]
            )
            plgpu.emit_pipeline(step, grid=(nt,), in_specs=specs, max_concurrent_steps=steps)(
                *([dy_gmem] + [v_gmem] * n + [meta_gmem] * n)
            )
            return [acc[...] for acc in accs]

        results = pl.run_scoped(
            acc_scope, *[plgpu.ACC((TILE, TILE), jnp.float32) for _ in range(planes)]
        )
        for j, res in enumerate(results):
            o_smem[...] = res.astype(o_smem.dtype)
            plgpu.commit_smem()
            row0 = (pc * planes + j) * bp + mi * TILE
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(row0, TILE), pl.ds(gi * TILE, TILE)])
            plgpu.wait_smem_to_gmem(0)

    out = compat.mosaic_gpu_kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m * bp, gt), out_dtype),
        scratch_types=dict(
            o_smem=plgpu.SMEM((TILE, TILE), out_dtype, transforms=_transforms(out_dtype)),
            idx_smem=plgpu.SMEM((TILE, TILE), jnp.int32),
            w_smem=plgpu.SMEM((m, TILE, TILE), dtype, transforms=tr),
            **({"wt_smem": plgpu.SMEM((TILE, TILE), dtype, transforms=tr)} if interp else {}),
        ),
        grid=(bp // TILE, kt, m // planes),
        grid_names=("m", "g", "p"),
        compiler_params=compat.mosaic_gpu_lane_params(),
        interpret=interpret,
    )(dyp, values, meta)
    dx = out.reshape(m, bp, gt)[:, :rows, : w.groups]
    return dx.transpose(1, 2, 0).reshape(rows, w.shape[0])
