"""Mosaic-GPU (Hopper, sm90) block-sparse ``x @ W``: ``plgpu.kernel`` + TMA ``emit_pipeline`` + ``wgmma``.

One CTA per ``(tile_m, bn)`` output tile. Its inner pipeline has a *dynamic* trip count (the column block's
stored-block count, read from ``col_ptr`` in GMEM) and its BlockSpec index maps read the K-block indices from
GMEM (Mosaic GPU has no scalar prefetch), so TMA fetches exactly the needed ``x`` and ``W`` blocks.
Empty column blocks run a zero-step pipeline and store zeros.

dX reuses this kernel on a transposed copy of the stored blocks (one weight-sized XLA transpose per backward);
dW (SDDMM) uses the XLA reference on CUDA for now.

Constraints (see :func:`unsupported_reason`): float16/bfloat16 only (wgmma operands from SMEM with 128-byte
swizzle), ``bk`` and ``bn`` multiples of 64 (the swizzle width in 2-byte elements), ``bn <= 256`` (wgmma N).
Verified only in Mosaic-GPU interpret mode and by lowering for CUDA from CPU; never run on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from pallas_kernels import compat

__all__ = ["matmul", "transposed_blocks", "unsupported_reason"]

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SWIZZLE_BYTES = 128


def unsupported_reason(shape: tuple[int, int], block: tuple[int, int], dtype) -> str | None:
    """Why the Mosaic-GPU kernel cannot run this configuration, or ``None`` if it can."""
    del shape
    bk, bn = block
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype)} is not supported by the Mosaic-GPU kernel (bfloat16, float16)"
    elems = SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
    for name, b in (("bk", bk), ("bn", bn)):
        if b % elems:
            return (
                f"{name}={b} cannot be tiled by the Mosaic-GPU kernel: TMA/wgmma tiles use a {SWIZZLE_BYTES}-byte "
                f"swizzle, so it must be a multiple of {elems}"
            )
    if bn > 256:
        return f"bn={bn} exceeds the wgmma N limit of 256"
    return None


def matmul(
    x: Float[Array, "M K"],
    data: Float[Array, "cap bk bn"],
    col_ptr: Int[Array, " nbp1"],
    row_idx: Int[Array, " cap"],
    *,
    tile_m: int = 128,
    interpret=None,
) -> Float[Array, "M N"]:
    """``x @ W`` for column-grouped stored blocks; ``col_ptr[j]:col_ptr[j+1]`` are column block ``j``'s."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, _ = x.shape
    cap, bk, bn = data.shape
    nb = col_ptr.shape[0] - 1
    dtype = x.dtype
    elems = SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE_BYTES))
    pad = -m % tile_m
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
    mp = x.shape[0]
    data2d = data.reshape(cap * bk, bn)

    def body(col_ptr_gmem, row_idx_gmem, x_gmem, d_gmem, o_gmem, o_smem):
        mi = lax.axis_index("m")
        nj = lax.axis_index("n")
        start = col_ptr_gmem[nj]
        count = col_ptr_gmem[nj + 1] - start

        def acc_scope(acc):
            def step(_, x_smem, w_smem):
                plgpu.wgmma(acc, x_smem, w_smem)
                plgpu.wgmma_wait(1)

            plgpu.emit_pipeline(
                step,
                grid=(count,),
                in_specs=[
                    plgpu.BlockSpec(
                        (tile_m, bk),
                        lambda t: (mi, row_idx_gmem[start + t]),
                        transforms=transforms,
                        delay_release=1,
                    ),
                    plgpu.BlockSpec(
                        (bk, bn), lambda t: (start + t, 0), transforms=transforms, delay_release=1
                    ),
                ],
                max_concurrent_steps=2,
            )(x_gmem, d_gmem)
            plgpu.wgmma_wait(0)
            return acc[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((tile_m, bn), jnp.float32))  # zero-initialised
        o_smem[...] = acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * tile_m, tile_m), pl.ds(nj * bn, bn)])
        plgpu.wait_smem_to_gmem(0)

    out = compat.mosaic_gpu_kernel(
        body,
        out_type=jax.ShapeDtypeStruct((mp, nb * bn), dtype),
        scratch_types=dict(o_smem=plgpu.SMEM((tile_m, bn), dtype)),
        grid=(mp // tile_m, nb),
        grid_names=("m", "n"),
        interpret=interpret,
    )(col_ptr, row_idx, x, data2d)
    return out[:m]


def transposed_blocks(
    data: Float[Array, "cap bk bn"], t_perm: Int[Array, " cap"]
) -> Float[Array, "cap bn bk"]:
    """Stored blocks in transposed order, each block transposed: the ``W.T`` operand for dX."""
    return jnp.swapaxes(data[t_perm], 1, 2)
