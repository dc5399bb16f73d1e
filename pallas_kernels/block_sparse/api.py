"""Public block-sparse product ``bsr_matmul(x, w)`` with a ``custom_vjp`` and per-platform backends.

Forward ``y = x @ W``; backward ``dX = dY @ W.T`` on the transposed pattern and ``dW`` only at the stored
blocks (SDDMM). Each of the three products is picked per platform inside one jitted function:

=========  ==============================  ==================================  =====================
platform   forward                         dX                                  dW
=========  ==============================  ==================================  =====================
tpu        Mosaic TPU (scalar prefetch)    Mosaic TPU, transposed pattern      Mosaic TPU SDDMM
cuda       Mosaic GPU (TMA + wgmma, sm90)  Mosaic GPU on transposed blocks     XLA SDDMM
cuda/rocm  Triton (sm80-89, ROCm)          Triton, transposed view             Triton SDDMM
other      XLA reference                   XLA reference                       XLA reference
=========  ==============================  ==================================  =====================

``impl`` follows :mod:`pallas_kernels.dispatch` (the same rules as ``nm_matmul``): ``"auto"`` asks
:func:`~pallas_kernels.dispatch.choose` per platform whether the sparse path beats densify + ``jnp.dot`` for
this shape, dtype, block size and capacity; ``"dense"``, ``"xla"`` and ``"pallas"`` force a choice. Kernel
families live in ``_KERNELS`` (one entry per family: TPU, Mosaic GPU, ...).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from pallas_kernels import compat, dispatch
from pallas_kernels.block_sparse import mosaic_gpu as mgpu_kernels
from pallas_kernels.block_sparse import reference
from pallas_kernels.block_sparse import tpu as tpu_kernels
from pallas_kernels.block_sparse import triton as triton_kernels
from pallas_kernels.block_sparse.format import BlockSparseWeight, with_data

__all__ = ["bsr_matmul", "plan", "sparse_problem"]


class _Kernel(NamedTuple):
    """One Pallas kernel family of ``bsr_matmul``: what it cannot run, its three products, its efficiency.

    ``forward(x, w, block_m, interpret)``, ``grad_x(dy, w, block_m, interpret)`` and
    ``grad_w(x, dy, w, block_m, interpret)`` take 2-D activations; ``interpret`` is ``None`` (compile) or a
    :func:`pallas_kernels.compat.interpret_params` value. ``efficiency(m, w)`` is the throughput per executed
    FLOP relative to the dense GEMM [estimate]. A new backend (e.g. ``"triton"``) is one more entry in
    :data:`_KERNELS`.
    """

    unsupported_reason: Callable[[tuple[int, int], tuple[int, int], Any], str | None]
    forward: Callable[..., Array]
    grad_x: Callable[..., Array]
    grad_w: Callable[..., Array]
    efficiency: Callable[[int, BlockSparseWeight], float]


def _tpu_forward(x, w, block_m, interpret):
    return tpu_kernels.matmul(
        x,
        w.data,
        w.nnz,
        w.row_idx,
        w.col_idx,
        w.col_ptr,
        block_m=block_m,
        interpret=_compile_if_none(interpret),
    )


def _tpu_grad_x(dy, w, block_m, interpret):
    return tpu_kernels.matmul_t(
        dy,
        w.data,
        w.nnz,
        w.t_row_idx,
        w.t_col_idx,
        w.t_perm,
        w.row_ptr,
        block_m=block_m,
        interpret=_compile_if_none(interpret),
    )


def _tpu_grad_w(x, dy, w, block_m, interpret):
    return tpu_kernels.sddmm(
        x,
        dy,
        w.nnz,
        w.row_idx,
        w.col_idx,
        block=w.block,
        dtype=w.dtype,
        block_m=block_m,
        interpret=_compile_if_none(interpret),
    )


def _compile_if_none(interpret):
    return False if interpret is None else interpret


def _tpu_efficiency(m: int, w: BlockSparseWeight) -> float:
    b = min(w.block)
    return {128: 0.7, 256: 0.8}.get(b, 0.85 if b > 256 else 0.3)


def _mgpu_forward(x, w, block_m, interpret):
    return mgpu_kernels.matmul(
        x, w.data, w.col_ptr, w.row_idx, tile_m=block_m or 128, interpret=interpret
    )


def _mgpu_grad_x(dy, w, block_m, interpret):
    data_t = mgpu_kernels.transposed_blocks(w.data, w.t_perm)
    return mgpu_kernels.matmul(
        dy, data_t, w.row_ptr, w.t_col_idx, tile_m=block_m or 128, interpret=interpret
    )


def _mgpu_grad_w(x, dy, w, block_m, interpret):
    del block_m, interpret
    return reference.sddmm(x, dy, w)  # no Mosaic GPU SDDMM yet


def _mgpu_efficiency(m: int, w: BlockSparseWeight) -> float:
    tile_waste = min(1.0, m / 64) if m < 64 else 1.0  # wgmma tile_m >= 64 rows
    return max(0.05, (0.7 if min(w.block) >= 128 else 0.5) * max(tile_waste, 1 / 64))


_KERNELS: dict[str, _Kernel] = {
    "tpu": _Kernel(
        tpu_kernels.unsupported_reason, _tpu_forward, _tpu_grad_x, _tpu_grad_w, _tpu_efficiency
    ),
    "mosaic_gpu": _Kernel(
        mgpu_kernels.unsupported_reason,
        _mgpu_forward,
        _mgpu_grad_x,
        _mgpu_grad_w,
        _mgpu_efficiency,
    ),
    "triton": _Kernel(
        triton_kernels.unsupported_reason,
        triton_kernels.bsr_matmul_triton,
        triton_kernels.bsr_matmul_t_triton,
        triton_kernels.bsr_sddmm_triton,
        triton_kernels.estimated_efficiency,
    ),
}


def _xla_efficiency(m: int, w: BlockSparseWeight) -> tuple[float, float]:
    """(flop_fraction, efficiency) of the XLA reference [estimate; the measured table overrides it]."""
    if reference.pick_strategy(m, w) == "densify":
        return 1.0, 0.9
    return w.capacity_density, 0.3 if min(w.block) >= 64 else 0.15


def sparse_problem(m: int, w: BlockSparseWeight, backend: str) -> dispatch.MatmulProblem:
    """The cost-model description of ``[m, K] @ w`` on ``backend`` (``"xla"`` or a kernel family).

    Args:
      m: rows of the activations (batch dims flattened).
      w: the stored weight.
      backend: ``"xla"`` or a key of the kernel registry (``"tpu"``, ``"mosaic_gpu"``, ...).

    Returns:
      A :class:`~pallas_kernels.dispatch.MatmulProblem`; its ``densify_bytes`` charge the ``"dense"`` option
      for rebuilding the dense weight from the stored blocks on every call.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.block_sparse import block_sparse_from_dense
      >>> w = block_sparse_from_dense(
      ...     jnp.ones((256, 256)), jnp.eye(2, dtype=bool), block=(128, 128), capacity=2
      ... )
      >>> sparse_problem(8, w, "tpu").flop_fraction
      0.5
    """
    k, n = w.shape
    bk, bn = w.block
    itemsize = jnp.dtype(w.dtype).itemsize
    if backend == "xla":
        flop_fraction, efficiency = _xla_efficiency(m, w)
    else:
        flop_fraction, efficiency = w.capacity_density, _KERNELS[backend].efficiency(m, w)
    steps = -(-m // tpu_kernels.pick_block_m(m, w.dtype)) * w.capacity if backend == "tpu" else 0
    weight_bytes = w.capacity * (bk * bn * itemsize + 12)
    return dispatch.MatmulProblem(
        op="block_sparse",
        m=m,
        k=k,
        n=n,
        dtype=w.dtype,
        weight_bytes=weight_bytes,
        flop_fraction=flop_fraction,
        efficiency=efficiency,
        grid_steps=steps,
        config=(bk, bn),
        densify_bytes=weight_bytes + 2 * k * n * itemsize,
    )


def plan(
    m: int,
    w: BlockSparseWeight,
    *,
    impl: dispatch.Impl = "auto",
    interpret: dispatch.Interpret | None = None,
    platforms: Sequence[str] | None = None,
    gpu_backend: str | None = None,
) -> dispatch.Plan:
    """Which backend each platform branch runs for ``[m, K] @ w`` (what :func:`bsr_matmul` will do).

    Args:
      m: rows of the activations (batch dims flattened).
      w: the stored weight.
      impl, interpret, platforms, gpu_backend: as for :func:`bsr_matmul`.

    Returns:
      A :class:`~pallas_kernels.dispatch.Plan`.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.block_sparse import block_sparse_from_dense
      >>> w = block_sparse_from_dense(
      ...     jnp.ones((256, 256)), jnp.eye(2, dtype=bool), block=(128, 128), capacity=2
      ... )
      >>> plan(8, w, impl="xla", platforms=("cpu", "tpu")).branches
      (('default', 'xla'), ('tpu', 'xla'))
    """
    return dispatch.make_plan(
        impl=impl,
        interpret=interpret,
        platforms=platforms,
        gpu_backend=gpu_backend,
        kernels={
            name: functools.partial(kernel.unsupported_reason, w.shape, w.block, w.dtype)
            for name, kernel in _KERNELS.items()
        },
        problem=functools.partial(sparse_problem, m, w),
    )


# ------------------------------------------------------------------------------ per-backend products
def _kernel(backend: str) -> tuple[_Kernel, Any]:
    """The kernel family of a backend name and its ``interpret`` argument (``None``: compile)."""
    if backend.startswith("interpret_"):
        mode = backend.removeprefix("interpret_")
        return _KERNELS["tpu" if mode == "hlo" else mode], compat.interpret_params(mode)
    return _KERNELS[backend], None


def _forward(backend: str, block_m, x: Array, w: BlockSparseWeight) -> Array:
    if backend in ("dense", "xla"):
        return reference.matmul(x, w, "densify" if backend == "dense" else None)
    kernel, interpret = _kernel(backend)
    return kernel.forward(x, w, block_m, interpret)


def _grad_x(backend: str, block_m, dy: Array, w: BlockSparseWeight) -> Array:
    if backend in ("dense", "xla"):
        return reference.matmul_transposed(dy, w, "densify" if backend == "dense" else None)
    kernel, interpret = _kernel(backend)
    return kernel.grad_x(dy, w, block_m, interpret)


def _grad_w(backend: str, block_m, x: Array, dy: Array, w: BlockSparseWeight) -> Array:
    if backend in ("dense", "xla"):
        return reference.sddmm(x, dy, w, "densify" if backend == "dense" else None)
    kernel, interpret = _kernel(backend)
    return kernel.grad_w(x, dy, w, block_m, interpret)


class _Static(NamedTuple):
    plan: dispatch.Plan
    block_m: int | None
    strict: str | None  # the platform where impl="pallas" must not fall back


def _run(s: _Static, product, *args):
    return dispatch.run_plan(s.plan, product, s.block_m, *args, strict=s.strict)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul_2d(s: _Static, x: Array, data: Array, pattern: BlockSparseWeight) -> Array:
    return _run(s, _forward, x, with_data(pattern, data))


def _matmul_2d_fwd(p, x, data, pattern):
    return _matmul_2d(p, x, data, pattern), (x, data, pattern)


def _matmul_2d_bwd(p, residuals, dy):
    x, data, pattern = residuals
    w = with_data(pattern, data)
    dy = dy.astype(x.dtype)
    dx = _run(p, _grad_x, dy, w)
    dw = _run(p, _grad_w, x, dy, w)
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
    interpret: dispatch.Interpret | None = None,
    block_m: int | None = None,
    platforms: Sequence[str] | None = None,
    gpu_backend: str | None = None,
) -> Float[Array, "... N"]:
    """``x @ W`` for a block-sparse ``W``, differentiable in ``x`` and ``w.data``.

    Args:
      x: activations ``(..., K)``, same dtype as ``w`` (float32, bfloat16 or float16).
      w: the :class:`BlockSparseWeight`.
      impl: ``"auto"`` (per platform, the measured table or cost model picks densify + ``jnp.dot`` or the
        sparse path), ``"dense"`` (densify + ``jnp.dot``), ``"xla"`` (sparse XLA reference), ``"pallas"`` (the
        Pallas kernel; raises if the current platform's kernel cannot run this block size / dtype).
      interpret: run the Pallas kernels in interpret mode on any host (needs ``impl="pallas"``): ``"hlo"``
        (``interpret=True``), ``"tpu"`` (TPU interpret mode: checks block bounds and output revisits),
        ``"mosaic_gpu"`` (Mosaic-GPU interpret mode, 16-bit dtypes, blocks multiple of 64), ``"triton"`` (the
        Triton kernels in the HLO interpreter, blocks powers of two >= 16).
      block_m: rows per kernel step (TPU default up to 256; Mosaic GPU ``tile_m``, default 128; Triton a
        power of two >= 16, default up to 64).
      platforms: platforms to build kernel branches for (default: those of this process's devices, see
        :func:`~pallas_kernels.dispatch.target_platforms`); e.g. ``("cpu", "tpu")`` to export for TPU from a
        CPU host.
      gpu_backend: force the GPU kernel family (``"mosaic_gpu"`` or ``"triton"``; default: by device).

    Returns:
      ``x @ W`` with shape ``(..., N)`` and ``x``'s dtype.

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
    p = plan(
        max(m, 1), w, impl=impl, interpret=interpret, platforms=platforms, gpu_backend=gpu_backend
    )
    if m == 0:
        return jnp.zeros((*batch, w.shape[1]), x.dtype)
    strict = dispatch.default_platform() if impl == "pallas" and interpret is None else None
    static = _Static(plan=p, block_m=block_m, strict=strict)
    y = _matmul_2d(static, x.reshape(m, w.shape[0]), w.data, w)
    # A traced pack that overflowed its capacity: make the whole product NaN, never silently partial.
    y = y + jnp.where(w.num_dropped > 0, jnp.nan, 0).astype(y.dtype)
    return y.reshape(*batch, w.shape[1])
