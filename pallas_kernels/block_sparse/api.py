"""Public block-sparse product ``bsr_matmul(x, w)`` with a ``custom_vjp`` and per-platform backends.

Forward ``y = x @ W``; backward ``dX = dY @ W.T`` on the transposed pattern and ``dW`` only at the stored
blocks (SDDMM). Each of the three products is picked per platform inside one jitted function:

=========  ==============================  ==================================  =====================
platform   forward                         dX                                  dW
=========  ==============================  ==================================  =====================
tpu        Mosaic TPU (scalar prefetch)    Mosaic TPU, transposed pattern      Mosaic TPU SDDMM
cuda       Mosaic GPU (TMA + wgmma, sm90)  Mosaic GPU on transposed blocks     XLA SDDMM
other      XLA reference                   XLA reference                       XLA reference
=========  ==============================  ==================================  =====================

``impl="auto"`` asks :func:`pallas_kernels.dispatch.choose` per platform whether the sparse kernel beats dense
``jnp.dot`` for this shape, dtype, block size and capacity, and falls back to XLA where the Pallas kernel
cannot tile the block size. ``impl="dense"|"xla"|"pallas"`` force a choice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from pallas_kernels import compat, dispatch
from pallas_kernels.block_sparse import mosaic_gpu as mgpu_kernels
from pallas_kernels.block_sparse import reference
from pallas_kernels.block_sparse import tpu as tpu_kernels
from pallas_kernels.block_sparse.format import BlockSparseWeight, with_data

Interpret = Literal["hlo", "tpu", "mosaic_gpu"]
# Backend kinds a platform branch can run.
Kind = Literal[
    "dense", "xla", "tpu", "mosaic_gpu", "interpret_hlo", "interpret_tpu", "interpret_mosaic_gpu"
]

_UNSUPPORTED = {"tpu": tpu_kernels.unsupported_reason, "cuda": mgpu_kernels.unsupported_reason}
_PALLAS_KIND = dispatch.PALLAS_KIND


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static (hashable) description of which backend every platform branch runs."""

    branches: tuple[tuple[str, str], ...]  # (platform, kind); platform "default" included
    block_m: int | None


def _kernel_efficiency(
    kind: str, block: tuple[int, int], m: int, w: BlockSparseWeight
) -> tuple[float, float]:
    """(flop_fraction, efficiency) of a backend kind [estimate; see specs/kernels.md §2.5]."""
    density = w.capacity_density
    b = min(block)
    if kind == "tpu":
        return density, {128: 0.7, 256: 0.8}.get(b, 0.85 if b > 256 else 0.3)
    if kind == "mosaic_gpu":
        tile_waste = min(1.0, m / 64) if m < 64 else 1.0  # wgmma tile_m >= 64 rows
        return density, max(0.05, (0.7 if b >= 128 else 0.5) * max(tile_waste, 1 / 64))
    if reference.pick_strategy(m, w) == "densify":
        return 1.0, 0.9
    return density, 0.3 if b >= 64 else 0.15


def sparse_problem(m: int, w: BlockSparseWeight, kind: str) -> dispatch.MatmulProblem:
    """The cost-model description of ``[m, K] @ w`` on backend ``kind``."""
    k, n = w.shape
    bk, bn = w.block
    itemsize = jnp.dtype(w.dtype).itemsize
    flop_fraction, efficiency = _kernel_efficiency(kind, w.block, m, w)
    steps = -(-m // tpu_kernels.pick_block_m(m, w.dtype)) * w.capacity if kind == "tpu" else 0
    return dispatch.MatmulProblem(
        op="block_sparse",
        m=m,
        k=k,
        n=n,
        dtype=w.dtype,
        weight_bytes=w.capacity * (bk * bn * itemsize + 12),
        flop_fraction=flop_fraction,
        efficiency=efficiency,
        grid_steps=steps,
        config=(bk, bn),
    )


def _branch_kind(platform: str, impl: str, m: int, w: BlockSparseWeight, *, strict: bool) -> str:
    if impl in ("dense", "xla"):
        return impl
    check = _UNSUPPORTED.get(platform)
    reason = check(w.shape, w.block, w.dtype) if check else "no Pallas backend for this platform"
    if impl == "pallas":
        if reason is not None and strict:
            raise ValueError(
                f"impl='pallas' cannot run on {platform}: {reason}. Use impl='auto' or 'xla'."
            )
        return "xla" if reason is not None else _PALLAS_KIND[platform]
    sparse_kind = "xla" if reason is not None else _PALLAS_KIND[platform]
    hw_platform = platform if platform in dispatch.HARDWARE else "cpu"
    choice = dispatch.choose(sparse_problem(m, w, sparse_kind), hw_platform)
    return sparse_kind if choice == "sparse" else "dense"


def plan(
    m: int,
    w: BlockSparseWeight,
    *,
    impl: str = "auto",
    interpret: str | None = None,
    block_m: int | None = None,
) -> _Plan:
    """Which backend each platform branch will run for ``[m, K] @ w`` (for inspection and tests)."""
    dispatch.check_impl(impl)
    dispatch.check_interpret(
        impl, interpret, lambda: mgpu_kernels.unsupported_reason(w.shape, w.block, w.dtype)
    )
    if interpret is not None:
        return _Plan(branches=(("default", f"interpret_{interpret}"),), block_m=block_m)
    current = dispatch.check_pallas_available(impl)
    branches = [("default", _branch_kind("cpu", impl, m, w, strict=False))]
    for platform in ("tpu", "cuda"):
        branches.append((platform, _branch_kind(platform, impl, m, w, strict=platform == current)))
    return _Plan(branches=tuple(branches), block_m=block_m)


# ------------------------------------------------------------------------------ per-kind products
def _forward(kind: str, block_m, x: Array, w: BlockSparseWeight) -> Array:
    k, n = w.shape
    if kind == "dense":
        return reference.matmul(x, w, "densify")
    if kind == "xla":
        return reference.matmul(x, w)
    if kind in ("tpu", "interpret_hlo", "interpret_tpu"):
        interp = {
            "tpu": False,
            "interpret_hlo": True,
            "interpret_tpu": compat.tpu_interpret_params(),
        }[kind]
        return tpu_kernels.matmul(
            x, w.data, w.nnz, w.row_idx, w.col_idx, w.col_ptr, block_m=block_m, interpret=interp
        )
    interp = compat.mosaic_gpu_interpret_params() if kind == "interpret_mosaic_gpu" else None
    return mgpu_kernels.matmul(
        x, w.data, w.col_ptr, w.row_idx, tile_m=block_m or 128, interpret=interp
    )


def _grad_x(kind: str, block_m, dy: Array, w: BlockSparseWeight) -> Array:
    k, n = w.shape
    if kind == "dense":
        return reference.matmul_transposed(dy, w, "densify")
    if kind == "xla":
        return reference.matmul_transposed(dy, w)
    if kind in ("tpu", "interpret_hlo", "interpret_tpu"):
        interp = {
            "tpu": False,
            "interpret_hlo": True,
            "interpret_tpu": compat.tpu_interpret_params(),
        }[kind]
        return tpu_kernels.matmul_t(
            dy,
            w.data,
            w.nnz,
            w.t_row_idx,
            w.t_col_idx,
            w.t_perm,
            w.row_ptr,
            block_m=block_m,
            interpret=interp,
        )
    interp = compat.mosaic_gpu_interpret_params() if kind == "interpret_mosaic_gpu" else None
    data_t = mgpu_kernels.transposed_blocks(w.data, w.t_perm)
    return mgpu_kernels.matmul(
        dy, data_t, w.row_ptr, w.t_col_idx, tile_m=block_m or 128, interpret=interp
    )


def _grad_w(kind: str, block_m, x: Array, dy: Array, w: BlockSparseWeight) -> Array:
    if kind == "dense":
        return reference.sddmm(x, dy, w, "densify")
    if kind in ("tpu", "interpret_hlo", "interpret_tpu"):
        interp = {
            "tpu": False,
            "interpret_hlo": True,
            "interpret_tpu": compat.tpu_interpret_params(),
        }[kind]
        return tpu_kernels.sddmm(
            x,
            dy,
            w.nnz,
            w.row_idx,
            w.col_idx,
            block=w.block,
            dtype=w.dtype,
            block_m=block_m,
            interpret=interp,
        )
    return reference.sddmm(x, dy, w)  # xla, mosaic_gpu, interpret_mosaic_gpu


def _switch(p: _Plan, fn, *args):
    kinds = dict(p.branches)
    default_kind = kinds.pop("default")
    default = functools.partial(fn, default_kind, p.block_m)
    if all(kind == default_kind for kind in kinds.values()):
        return default(*args)
    per_platform = {plat: functools.partial(fn, kind, p.block_m) for plat, kind in kinds.items()}
    return dispatch.platform_switch(*args, default=default, **per_platform)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul_2d(p: _Plan, x: Array, data: Array, pattern: BlockSparseWeight) -> Array:
    return _switch(p, _forward, x, with_data(pattern, data))


def _matmul_2d_fwd(p, x, data, pattern):
    return _matmul_2d(p, x, data, pattern), (x, data, pattern)


def _matmul_2d_bwd(p, residuals, dy):
    x, data, pattern = residuals
    w = with_data(pattern, data)
    dy = dy.astype(x.dtype)
    dx = _switch(p, _grad_x, dy, w)
    dw = _switch(p, _grad_w, x, dy, w)
    return dx, dw, None


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def _validate(x, w) -> None:
    if not isinstance(w, BlockSparseWeight):
        raise TypeError(
            f"w must be a BlockSparseWeight (see block_sparse_from_dense); got {type(w).__name__}."
        )
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array; got {type(x).__name__}.")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"x must have shape (..., K) with K = w.shape[0] = {w.shape[0]}; got x.shape={x.shape}."
        )
    if x.dtype != w.dtype:
        raise TypeError(
            f"x.dtype={x.dtype} must equal the weight dtype w.dtype={w.dtype}; cast one of them."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must have a floating dtype; got {x.dtype}.")
    if not isinstance(w.num_dropped, jax.core.Tracer) and int(np.asarray(w.num_dropped)) > 0:
        raise ValueError(
            f"w overflowed its capacity: {int(w.num_dropped)} mask blocks were dropped when it was "
            f"packed (capacity={w.capacity}); its data is NaN. Re-pack with a larger capacity."
        )


def bsr_matmul(
    x: Float[Array, "... K"],
    w: BlockSparseWeight,
    *,
    impl: dispatch.Impl = "auto",
    interpret: Interpret | None = None,
    block_m: int | None = None,
) -> Float[Array, "... N"]:
    """``x @ W`` for a block-sparse ``W``, differentiable in ``x`` and ``w.data``.

    Args:
      x: activations ``(..., K)``, same dtype as ``w`` (float32, bfloat16 or float16).
      w: the :class:`BlockSparseWeight`.
      impl: ``"auto"`` (cost model picks dense ``jnp.dot`` or the sparse kernel per platform), ``"dense"``
        (densify + ``jnp.dot``), ``"xla"`` (sparse XLA reference), ``"pallas"`` (the Pallas kernel; raises if
        the current platform's kernel cannot run this block size / dtype).
      interpret: run the Pallas kernels in interpret mode on any host (needs ``impl="pallas"``): ``"hlo"``
        (``interpret=True``), ``"tpu"`` (TPU interpret mode: checks block bounds and output revisits),
        ``"mosaic_gpu"`` (Mosaic-GPU interpret mode, 16-bit dtypes, blocks multiple of 64).
      block_m: rows per kernel step (TPU default up to 256; Mosaic GPU ``tile_m``, default 128).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels.block_sparse import block_sparse_from_dense
      >>> w = block_sparse_from_dense(jnp.ones((4, 4)), jnp.eye(2, dtype=bool), block=(2, 2), capacity=2)
      >>> bsr_matmul(jnp.ones((3, 4)), w, impl="pallas", interpret="hlo")[0].tolist()
      [2.0, 2.0, 2.0, 2.0]
    """
    _validate(x, w)
    if block_m is not None and (not isinstance(block_m, int) or block_m < 1):
        raise ValueError(f"block_m must be None or a positive int; got {block_m!r}.")
    batch = x.shape[:-1]
    m = math.prod(batch)
    p = plan(max(m, 1), w, impl=impl, interpret=interpret, block_m=block_m)
    if m == 0:
        return jnp.zeros((*batch, w.shape[1]), x.dtype)
    y = _matmul_2d(p, x.reshape(m, w.shape[0]), w.data, w)
    # A traced pack that overflowed its capacity: make the whole product NaN, never silently partial.
    y = y + jnp.where(w.num_dropped > 0, jnp.nan, 0).astype(y.dtype)
    return y.reshape(*batch, w.shape[1])
