"""``nm_matmul``: ``x @ W`` for an N:M-sparse weight, one entry point for every platform, with ``custom_vjp``.

* forward: Pallas kernel (Mosaic TPU / Mosaic GPU / Triton), the sparse XLA reference (gather) or
  decompress + dot;
* ``dx = dy @ W.T``: the same kernels walk the same compressed weight (no transposed metadata: the groups
  run along ``K``, which is the output axis of ``dx``);
* ``d values``: dense ``x.T @ dy`` (XLA), gathered at the kept positions (without sparse tensor cores an
  N:M "SDDMM" saves no FLOPs; mask-learning schemes need the dense gradient anyway); the Triton family
  fuses the gather into its tile loop (no dense gradient in memory).

The backend is picked per platform from static shapes by :mod:`pallas_kernels.dispatch`, with the same
``impl`` rules, :class:`~pallas_kernels.dispatch.Plan` and branch switcher as ``bsr_matmul``: one jitted
function runs XLA on CPU and lowers to the Pallas kernel on TPU/GPU, and ``impl="auto"`` picks
decompress + ``jnp.dot`` where the sparse path cannot win (the kernels save weight bytes, never FLOPs).
Kernel families live in ``_KERNELS``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels import compat, dispatch
from pallas_kernels.nm import mosaic_gpu as _mgpu
from pallas_kernels.nm import reference as _ref
from pallas_kernels.nm import tpu as _tpu
from pallas_kernels.nm import triton as _triton_nm
from pallas_kernels.nm.format import NMWeight, check_nm, index_bits

__all__ = ["nm_matmul", "nm_weight_bytes", "plan", "sparse_problem", "validate_nm_weight"]


# ----------------------------------------------------------------------------------------------------------
# validation


def validate_nm_weight(w: Any, *, n: int | None = None, m: int | None = None) -> NMWeight:
    """Checks that ``w`` is a consistent :class:`NMWeight` (and, if given, has the requested ``n:m``)."""
    if not isinstance(w, NMWeight):
        raise TypeError(f"w_nm must be an NMWeight (build it with pack_nm), got {type(w).__name__}")
    check_nm(w.n, w.m, k=w.shape[0])
    if (n is not None and n != w.n) or (m is not None and m != w.m):
        raise ValueError(
            f"w_nm holds {w.n}:{w.m} metadata but n={n}, m={m} was requested; allowed: the N:M the weight was "
            f"packed with ({w.n}:{w.m}) — re-pack it with pack_nm(dense, n={n}, m={m})"
        )
    k, cols = w.shape
    g = k // w.m
    f = 32 // index_bits(w.m)
    if w.values.shape != (w.n, g, cols):
        raise ValueError(
            f"w_nm.values.shape={w.values.shape} does not match {w.n}:{w.m} of a {w.shape} weight; "
            f"expected (n, K//m, N) = {(w.n, g, cols)}"
        )
    if w.pack_tile % f:
        raise ValueError(f"w_nm.pack_tile={w.pack_tile} must be a multiple of {f} for m={w.m}")
    gp = -(-g // w.pack_tile) * w.pack_tile
    if w.meta.shape != (w.n, gp // f, cols) or w.meta.dtype != jnp.int32:
        raise ValueError(
            f"w_nm.meta (shape {w.meta.shape}, dtype {w.meta.dtype}) is not {w.n}:{w.m} metadata for a "
            f"{w.shape} weight with pack_tile={w.pack_tile}; expected int32 {(w.n, gp // f, cols)}"
        )
    return w


# ----------------------------------------------------------------------------------------------------------
# dispatch: per-platform backends, chosen with pallas_kernels.dispatch (shared with block-sparse)


class _Kernel(NamedTuple):
    """One Pallas kernel family of ``nm_matmul``: what it cannot run, its two products, its efficiency.

    ``unsupported_reason(rows=, k=, n_out=, n=, m=, dtype=, pack_tile=)`` says why it cannot run a problem
    (``None``: it can); ``forward(x, w, out_dtype, blocks, interpret)`` and ``grad_x(dy, w, out_dtype, blocks,
    interpret)`` take 2-D activations, ``interpret`` ``None`` (compile) or a
    :func:`pallas_kernels.compat.interpret_params` value; ``efficiency(rows)`` is the throughput per FLOP
    relative to the dense GEMM [estimate]; ``grad_values(x, dy, w, blocks, interpret)`` is the family's
    gradient w.r.t. ``w.values`` (``None``: the XLA dense-then-gather). A new backend is one more entry in
    :data:`_KERNELS`.
    """

    unsupported_reason: Callable[..., str | None]
    forward: Callable[..., Array]
    grad_x: Callable[..., Array]
    efficiency: Callable[[int], float]
    grad_values: Callable[..., Array] | None = None


def _tpu_reason(*, dtype, **_) -> str | None:
    if jnp.issubdtype(dtype, jnp.floating):
        return None
    return f"dtype {jnp.dtype(dtype).name} is not floating"


def _tpu_forward(x, w, out_dtype, blocks, interpret):
    return _tpu.nm_matmul_tpu(x, w, out_dtype=out_dtype, interpret=interpret, blocks=blocks)


def _tpu_grad_x(dy, w, out_dtype, blocks, interpret):
    return _tpu.nm_dx_tpu(dy, w, out_dtype=out_dtype, interpret=interpret, blocks=blocks)


def _mgpu_forward(x, w, out_dtype, blocks, interpret):
    del blocks
    return _mgpu.nm_matmul_mosaic_gpu(x, w, out_dtype=out_dtype, interpret=interpret)


def _mgpu_grad_x(dy, w, out_dtype, blocks, interpret):
    del blocks
    return _mgpu.nm_dx_mosaic_gpu(dy, w, out_dtype=out_dtype, interpret=interpret)


def _mgpu_efficiency(rows: int) -> float:
    return 0.6 * (min(rows, 64) / 64)  # a wgmma tile has at least 64 rows


# Kernel throughput per FLOP relative to the dense GEMM [estimate, not measured]: the in-kernel decompression
# (shifts + n selects per weight element, redone per row tile) costs VPU / CUDA-core time.
_KERNELS: dict[str, _Kernel] = {
    "tpu": _Kernel(_tpu_reason, _tpu_forward, _tpu_grad_x, lambda rows: 0.7),
    "mosaic_gpu": _Kernel(_mgpu.unsupported_reason, _mgpu_forward, _mgpu_grad_x, _mgpu_efficiency),
    "triton": _Kernel(
        _triton_nm.unsupported_reason,
        _triton_nm.nm_matmul_triton,
        _triton_nm.nm_dx_triton,
        _triton_nm.estimated_efficiency,
        _triton_nm.nm_dvalues_triton,
    ),
}


def nm_weight_bytes(k: int, n_out: int, n: int, m: int, dtype) -> float:
    """Bytes an N:M kernel reads for the weight: kept values + packed positions."""
    kept = n * (k // m) * n_out
    return kept * jnp.dtype(dtype).itemsize + kept * index_bits(m) / 8


def _problem(rows, k, n_out, n, m, dtype, backend) -> dispatch.MatmulProblem:
    itemsize = jnp.dtype(dtype).itemsize
    weight_bytes = nm_weight_bytes(k, n_out, n, m, dtype)
    if backend == "xla":  # gather while rows * n <= m: n/m of the FLOPs, elementwise (no GEMM)
        gather = rows * n <= m
        # XLA's element gather is slow: 3-6x slower than decompress + dot at 1024-4096 on the CPU host
        # (benchmarks/results/nm_matmul_cpu_dispatch.json); 0.01 reproduces that ordering.
        flop_fraction, efficiency = (n / m, 0.01) if gather else (1.0, 0.9)
        if not gather:
            weight_bytes += weight_bytes + k * n_out * itemsize  # it densifies too
    else:
        flop_fraction, efficiency = 1.0, _KERNELS[backend].efficiency(rows)
    return dispatch.MatmulProblem(
        op="nm",
        m=rows,
        k=k,
        n=n_out,
        dtype=dtype,
        weight_bytes=weight_bytes,
        flop_fraction=flop_fraction,
        efficiency=efficiency,
        config=(n, m),
        densify_bytes=nm_weight_bytes(k, n_out, n, m, dtype) + k * n_out * itemsize,
    )


def sparse_problem(rows: int, w: NMWeight, backend: str, *, x_dtype=None) -> dispatch.MatmulProblem:
    """The cost-model view of ``(rows, K) @ w`` on ``backend`` (``"xla"`` or a kernel family).

    Without sparse tensor cores (none reachable from Pallas on Hopper/TPU) the kernels save bytes, not
    FLOPs (``flop_fraction=1``), so they can only beat dense ``jnp.dot`` where the product is memory bound.
    The ``"dense"`` option pays ``densify_bytes`` (decompressing the stored weight on every call).

    Args:
      rows: rows of the activations (batch dims flattened).
      w: the stored weight.
      backend: ``"xla"`` or a kernel family (``"tpu"``, ``"mosaic_gpu"``, ...).
      x_dtype: activation dtype (default: the weight's); the problem runs in the promoted dtype.

    Returns:
      A :class:`~pallas_kernels.dispatch.MatmulProblem`.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import pack_nm
      >>> sparse_problem(1, pack_nm(jnp.ones((64, 8)), n=2, m=4), "tpu").flop_fraction
      1.0
    """
    dtype = jnp.result_type(x_dtype or w.values.dtype, w.values.dtype)
    return _problem(rows, w.shape[0], w.shape[1], w.n, w.m, dtype, backend)


def plan(
    rows: int,
    w: NMWeight,
    *,
    impl: dispatch.Impl = "auto",
    interpret: dispatch.Interpret | None = None,
    platforms: Sequence[str] | None = None,
    gpu_backend: str | None = None,
    x_dtype=None,
) -> dispatch.Plan:
    """Which backend each platform branch runs for ``(rows, K) @ w`` (what :func:`nm_matmul` will do).

    Args:
      rows: rows of the activations (batch dims flattened).
      w: the stored weight.
      impl, interpret, platforms, gpu_backend: as for :func:`nm_matmul`.
      x_dtype: activation dtype (default: the weight's).

    Returns:
      A :class:`~pallas_kernels.dispatch.Plan`.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import pack_nm
      >>> plan(8, pack_nm(jnp.ones((64, 8)), n=2, m=4), impl="dense").branches
      (('default', 'dense'),)
    """
    dtype = jnp.result_type(x_dtype or w.values.dtype, w.values.dtype)
    dims = dict(
        rows=rows, k=w.shape[0], n_out=w.shape[1], n=w.n, m=w.m, dtype=dtype, pack_tile=w.pack_tile
    )
    return dispatch.make_plan(
        impl=impl,
        interpret=interpret,
        platforms=platforms,
        gpu_backend=gpu_backend,
        kernels={
            name: functools.partial(kernel.unsupported_reason, **dims)
            for name, kernel in _KERNELS.items()
        },
        problem=functools.partial(_problem, rows, w.shape[0], w.shape[1], w.n, w.m, dtype),
    )


@dataclasses.dataclass(frozen=True)
class _Config:
    n: int
    m: int
    shape: tuple[int, int]
    pack_tile: int
    out_dtype: Any
    blocks: tuple[int, int, int] | None


class _Static(NamedTuple):
    plan: dispatch.Plan
    config: _Config
    strict: str | None  # the platform where impl="pallas" must not fall back


def _weight(cfg: _Config, values, meta) -> NMWeight:
    return NMWeight(
        values=values, meta=meta, n=cfg.n, m=cfg.m, shape=cfg.shape, pack_tile=cfg.pack_tile
    )


def _kernel(backend: str) -> tuple[_Kernel, Any]:
    """The kernel family of a backend name and its ``interpret`` argument (``None``: compile)."""
    if backend.startswith("interpret_"):
        mode = backend.removeprefix("interpret_")
        return _KERNELS["tpu" if mode == "hlo" else mode], compat.interpret_params(mode)
    return _KERNELS[backend], None


def _forward(backend: str, cfg: _Config, x, values, meta):
    w = _weight(cfg, values, meta)
    if backend in ("dense", "xla"):
        strategy = "densify" if backend == "dense" else _ref.pick_strategy(x.shape[0], w)
        return _ref.nm_matmul_xla(x, w, cfg.out_dtype, strategy)
    kernel, interpret = _kernel(backend)
    return kernel.forward(x, w, cfg.out_dtype, cfg.blocks, interpret)


def _grad_x(backend: str, cfg: _Config, dy, values, meta):
    w = _weight(cfg, values, meta)
    if backend in ("dense", "xla"):
        strategy = "densify" if backend == "dense" else _ref.pick_strategy(dy.shape[0], w)
        return _ref.nm_dx_xla(dy, w, cfg.out_dtype, strategy)
    kernel, interpret = _kernel(backend)
    return kernel.grad_x(dy, w, cfg.out_dtype, cfg.blocks, interpret)


def _grad_values(backend: str, cfg: _Config, x, dy, values, meta):
    w = _weight(cfg, values, meta)
    if backend not in ("dense", "xla"):
        kernel, interpret = _kernel(backend)
        if kernel.grad_values is not None:
            return kernel.grad_values(x, dy, w, cfg.blocks, interpret)
    return _ref.nm_dvalues_xla(x, dy, w)


def _run(s: _Static, product, *args):
    return dispatch.run_plan(s.plan, product, s.config, *args, strict=s.strict)


# ----------------------------------------------------------------------------------------------------------
# custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nm_matmul_2d(s: _Static, x2, values, meta):
    return _run(s, _forward, x2, values, meta)


def _fwd(s, x2, values, meta):
    return _run(s, _forward, x2, values, meta), (x2, values, meta)


def _bwd(s, res, dy):
    x2, values, meta = res
    dx_static = s._replace(config=dataclasses.replace(s.config, out_dtype=x2.dtype))
    dx = _run(dx_static, _grad_x, dy, values, meta)
    dvalues = _run(s, _grad_values, x2, dy, values, meta)
    return dx, dvalues, None


_nm_matmul_2d.defvjp(_fwd, _bwd)


def nm_matmul(
    x: Float[Array, "*batch K"],
    w_nm: NMWeight,
    *,
    impl: dispatch.Impl = "auto",
    n: int | None = None,
    m: int | None = None,
    preferred_element_type: Any = None,
    interpret: dispatch.Interpret | None = None,
    blocks: tuple[int, int, int] | None = None,
    platforms: Sequence[str] | None = None,
    gpu_backend: str | None = None,
) -> Float[Array, "*batch N"]:
    """``x @ unpack_nm(w_nm)`` without materialising the dense weight on TPU/GPU; differentiable.

    Args:
      x: activations ``(..., K)``.
      w_nm: :class:`NMWeight` from :func:`pack_nm` (weight ``(K, N)``, groups along ``K``).
      impl: ``"auto"`` (per platform, the measured table or cost model of :mod:`pallas_kernels.dispatch`
        picks decompress + ``jnp.dot`` or the sparse path), ``"dense"`` (decompress + ``jnp.dot``),
        ``"xla"`` (the sparse XLA reference, see :mod:`pallas_kernels.nm.reference`), ``"pallas"`` (the
        current platform's kernel; raises on CPU unless ``interpret`` is given).
      n, m: optional expected pattern; a weight packed with another N:M raises ``ValueError``.
      preferred_element_type: output dtype (default: promoted input dtype). Accumulation is f32.
      interpret: with ``impl="pallas"``, run a kernel in interpret mode on any host: ``"hlo"``, ``"tpu"``
        (TPU interpret mode: also checks block bounds and output revisits), ``"mosaic_gpu"`` or ``"triton"``.
      blocks: ``(bm, bg, bn)`` tile override for the TPU kernel (``bg`` in groups, a multiple of
        ``w_nm.pack_tile``) or the Triton kernels (powers of two >= 16).
      platforms: platforms to build kernel branches for (default: those of this process's devices, see
        :func:`~pallas_kernels.dispatch.target_platforms`); e.g. ``("cpu", "tpu")`` to export for TPU from a
        CPU host.
      gpu_backend: force the GPU kernel family (``"mosaic_gpu"`` or ``"triton"``; default: by device).

    Returns:
      ``(..., N)`` in ``preferred_element_type``.

    Gradients flow to ``x`` and ``w_nm.values`` and equal those of the dense masked product.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels.nm import pack_nm, unpack_nm
      >>> w_nm = pack_nm(jax.random.normal(jax.random.key(0), (64, 32)), n=2, m=4)
      >>> x = jnp.ones((3, 64))
      >>> y = jax.jit(nm_matmul)(x, w_nm)
      >>> bool(jnp.allclose(y, x @ unpack_nm(w_nm), atol=1e-4))
      True
    """
    dispatch.check_impl(impl)
    w_nm = validate_nm_weight(w_nm, n=n, m=m)
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != w_nm.shape[0]:
        raise ValueError(
            f"x.shape={x.shape}: the last axis must equal the contraction length K={w_nm.shape[0]} of w_nm "
            f"(shape {w_nm.shape})"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be floating point, got x.dtype={x.dtype}")
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x.dtype, w_nm.values.dtype))
    batch = x.shape[:-1]
    rows = max(math.prod(batch), 1)
    p = plan(
        rows,
        w_nm,
        impl=impl,
        interpret=interpret,
        platforms=platforms,
        gpu_backend=gpu_backend,
        x_dtype=x.dtype,
    )
    cfg = _Config(
        n=w_nm.n,
        m=w_nm.m,
        shape=w_nm.shape,
        pack_tile=w_nm.pack_tile,
        out_dtype=out_dtype,
        blocks=blocks,
    )
    strict = dispatch.default_platform() if impl == "pallas" and interpret is None else None
    static = _Static(plan=p, config=cfg, strict=strict)
    y = _nm_matmul_2d(static, x.reshape(-1, x.shape[-1]), w_nm.values, w_nm.meta)
    return y.reshape(*batch, w_nm.shape[1])
