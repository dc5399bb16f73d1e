"""``nm_matmul``: ``x @ W`` for an N:M-sparse weight, one entry point for every platform, with ``custom_vjp``.

* forward: Pallas kernel (Mosaic TPU / Mosaic GPU) or the XLA reference (decompress + dot);
* ``dx = dy @ W.T``: the same kernels walk the same compressed weight (no transposed metadata: the groups
  run along ``K``, which is the output axis of ``dx``);
* ``d values``: dense ``x.T @ dy`` (XLA), gathered at the kept positions (without sparse tensor cores an
  N:M "SDDMM" saves no FLOPs; mask-learning schemes need the dense gradient anyway).

The backend is picked per platform from static shapes with the project's shared :mod:`pallas_kernels.dispatch`:
one jitted function runs XLA on CPU and lowers to the Pallas kernel on TPU/GPU (``lax.platform_dependent``),
and ``impl="auto"`` uses the bytes-vs-FLOPs roofline (:func:`use_nm_kernel`) to pick dense ``jnp.dot`` where
the N:M kernel cannot win (it saves weight bytes, never FLOPs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels import compat, dispatch
from pallas_kernels.nm import mosaic_gpu as _mgpu
from pallas_kernels.nm import reference as _ref
from pallas_kernels.nm import tpu as _tpu
from pallas_kernels.nm.format import NMWeight, check_nm, index_bits

__all__ = [
    "nm_matmul",
    "plan",
    "nm_cost_model",
    "use_nm_kernel",
    "nm_problem",
    "validate_nm_weight",
]


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
# dispatch: per-platform backend kinds, chosen with pallas_kernels.dispatch (shared with block-sparse)

Interpret = Literal["hlo", "tpu", "mosaic_gpu"]
_PALLAS_KIND = dispatch.PALLAS_KIND

# Kernel throughput per FLOP relative to the dense GEMM [estimate, not measured]: the in-kernel decompression
# (shifts + n selects per weight element, redone per row tile) costs VPU / CUDA-core time, and a Hopper
# wgmma tile has at least 64 rows, so fewer rows waste tensor-core work.
_EFFICIENCY = {"tpu": 0.7, "mosaic_gpu": 0.6}


def nm_weight_bytes(k: int, n_out: int, n: int, m: int, dtype) -> float:
    """Bytes an N:M kernel reads for the weight: kept values + packed positions."""
    kept = n * (k // m) * n_out
    return kept * jnp.dtype(dtype).itemsize + kept * index_bits(m) / 8


def nm_problem(
    rows: int, k: int, n_out: int, n: int, m: int, dtype, kind: str
) -> dispatch.MatmulProblem:
    """The cost-model view of ``(rows, K) @ W_nm``: all dense FLOPs, fewer weight bytes.

    Without sparse tensor cores (none reachable from Pallas on Hopper/TPU) the kernel saves bytes, not FLOPs
    (``flop_fraction=1``), so it can only beat dense ``jnp.dot`` where the product is memory bound.
    """
    eff = _EFFICIENCY[kind]
    if kind == "mosaic_gpu" and rows < 64:
        eff *= max(rows, 1) / 64
    return dispatch.MatmulProblem(
        op="nm",
        m=rows,
        k=k,
        n=n_out,
        dtype=dtype,
        weight_bytes=nm_weight_bytes(k, n_out, n, m, dtype),
        flop_fraction=1.0,
        efficiency=eff,
        config=(n, m),
    )


def nm_cost_model(platform: str, *, rows: int, k: int, n_out: int, n: int, m: int, dtype) -> dict:
    """Predicted seconds ``{"dense": ..., "kernel": ...}`` on ``platform`` ("tpu"/"cuda") from the roofline
    of :func:`pallas_kernels.dispatch.estimate_seconds` (public peak figures, estimated efficiencies)."""
    prob = nm_problem(rows, k, n_out, n, m, dtype, _PALLAS_KIND[platform])
    dense, kernel = dispatch.estimate_seconds(prob, dispatch.HARDWARE[platform])
    return {"dense": dense, "kernel": kernel}


def unsupported_reason(
    platform: str,
    *,
    rows: int,
    k: int,
    n_out: int,
    n: int,
    m: int,
    dtype,
    pack_tile: int | None = None,
) -> str | None:
    """Why the ``platform`` kernel cannot run this problem (``None`` if it can)."""
    if platform == "tpu":
        return (
            None
            if jnp.issubdtype(dtype, jnp.floating)
            else f"dtype {jnp.dtype(dtype).name} is not floating"
        )
    if platform == "cuda":
        return _mgpu.unsupported_reason(
            rows=rows, k=k, n_out=n_out, n=n, m=m, dtype=dtype, pack_tile=pack_tile
        )
    return "no Pallas backend for this platform"


def use_nm_kernel(
    platform: str,
    *,
    rows: int,
    k: int,
    n_out: int,
    n: int,
    m: int,
    dtype,
    pack_tile: int | None = None,
) -> bool:
    """The ``impl="auto"`` rule: kernel iff it can run and :func:`pallas_kernels.dispatch.choose` predicts it
    beats dense ``jnp.dot`` (by the shared 1.1x margin)."""
    if (
        unsupported_reason(
            platform, rows=rows, k=k, n_out=n_out, n=n, m=m, dtype=dtype, pack_tile=pack_tile
        )
        is not None
    ):
        return False
    prob = nm_problem(rows, k, n_out, n, m, dtype, _PALLAS_KIND[platform])
    return dispatch.choose(prob, platform) == "sparse"


@dataclasses.dataclass(frozen=True)
class _Config:
    n: int
    m: int
    shape: tuple[int, int]
    pack_tile: int
    branches: tuple[tuple[str, str], ...]  # (platform, kind), "default" included
    out_dtype: Any
    blocks: tuple[int, int, int] | None


def plan(
    rows: int, w: NMWeight, *, impl: str = "auto", interpret: str | None = None, x_dtype=None
) -> tuple:
    """``((platform, kind), ...)``: the backend each platform branch runs for ``(rows, K) @ w``."""
    dispatch.check_impl(impl)
    dtype = jnp.result_type(x_dtype or w.values.dtype, w.values.dtype)
    dims = dict(
        rows=rows, k=w.shape[0], n_out=w.shape[1], n=w.n, m=w.m, dtype=dtype, pack_tile=w.pack_tile
    )
    dispatch.check_interpret(impl, interpret, lambda: unsupported_reason("cuda", **dims))
    if interpret is not None:
        return (("default", f"interpret_{interpret}"),)
    current = dispatch.check_pallas_available(impl)
    branches = [("default", "dense")]
    for platform in ("tpu", "cuda"):
        if impl in ("dense", "xla"):
            kind = "dense"
        elif impl == "pallas":
            reason = unsupported_reason(platform, **dims)
            if reason is not None and platform == current:
                raise ValueError(
                    f"impl='pallas' cannot run on {platform}: {reason}. Use impl='auto' or 'xla'."
                )
            kind = "dense" if reason is not None else _PALLAS_KIND[platform]
        else:
            kind = _PALLAS_KIND[platform] if use_nm_kernel(platform, **dims) else "dense"
        branches.append((platform, kind))
    return tuple(branches)


def _weight(cfg: _Config, values, meta) -> NMWeight:
    return NMWeight(
        values=values, meta=meta, n=cfg.n, m=cfg.m, shape=cfg.shape, pack_tile=cfg.pack_tile
    )


def _product(op: str, kind: str, cfg: _Config, a, values, meta):
    """op "fwd": a = x (B, K) -> (B, N); op "dx": a = dy (B, N) -> (B, K)."""
    w = _weight(cfg, values, meta)
    if kind == "dense":
        fn = _ref.nm_matmul_xla if op == "fwd" else _ref.nm_dx_xla
        return fn(a, w, cfg.out_dtype)
    if kind in ("tpu", "interpret_hlo", "interpret_tpu"):
        interp = {"tpu": False, "interpret_hlo": True, "interpret_tpu": "tpu"}[kind]
        fn = _tpu.nm_matmul_tpu if op == "fwd" else _tpu.nm_dx_tpu
        return fn(a, w, out_dtype=cfg.out_dtype, interpret=interp, blocks=cfg.blocks)
    interp = compat.mosaic_gpu_interpret_params() if kind == "interpret_mosaic_gpu" else None
    fn = _mgpu.nm_matmul_mosaic_gpu if op == "fwd" else _mgpu.nm_dx_mosaic_gpu
    return fn(a, w, out_dtype=cfg.out_dtype, interpret=interp)


def _run(cfg: _Config, op: str, a, values, meta):
    kinds = dict(cfg.branches)
    default_kind = kinds.pop("default")
    default = functools.partial(_product, op, default_kind, cfg)
    if all(kind == default_kind for kind in kinds.values()):
        return default(a, values, meta)
    per_platform = {
        plat: functools.partial(_product, op, kind, cfg) for plat, kind in kinds.items()
    }
    return dispatch.platform_switch(a, values, meta, default=default, **per_platform)


# ----------------------------------------------------------------------------------------------------------
# custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _nm_matmul_2d(cfg: _Config, x2, values, meta):
    return _run(cfg, "fwd", x2, values, meta)


def _fwd(cfg, x2, values, meta):
    return _run(cfg, "fwd", x2, values, meta), (x2, values, meta)


def _bwd(cfg, res, dy):
    x2, values, meta = res
    dx_cfg = dataclasses.replace(cfg, out_dtype=x2.dtype)
    dx = _run(dx_cfg, "dx", dy, values, meta)
    dvalues = _ref.nm_dvalues_xla(x2, dy, _weight(cfg, values, meta))
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
    interpret: Interpret | None = None,
    blocks: tuple[int, int, int] | None = None,
) -> Float[Array, "*batch N"]:
    """``x @ unpack_nm(w_nm)`` without materialising the dense weight on TPU/GPU; differentiable.

    Args:
      x: activations ``(..., K)``.
      w_nm: :class:`NMWeight` from :func:`pack_nm` (weight ``(K, N)``, groups along ``K``).
      impl: ``"auto"`` (per platform, :func:`use_nm_kernel`: the Pallas kernel where the shared cost model
        predicts it beats dense ``jnp.dot``, else decompress + ``jnp.dot``), ``"dense"``/``"xla"``
        (decompress + ``jnp.dot`` everywhere), ``"pallas"`` (the current platform's kernel; raises on CPU
        unless ``interpret`` is given).
      n, m: optional expected pattern; a weight packed with another N:M raises ``ValueError``.
      preferred_element_type: output dtype (default: promoted input dtype). Accumulation is f32.
      interpret: with ``impl="pallas"``, run a kernel in interpret mode on any host: ``"hlo"``, ``"tpu"``
        (TPU interpret mode: also checks block bounds and output revisits) or ``"mosaic_gpu"``.
      blocks: ``(bm, bg, bn)`` tile override for the TPU kernel (``bg`` in groups, a multiple of
        ``w_nm.pack_tile``).

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
    cfg = _Config(
        n=w_nm.n,
        m=w_nm.m,
        shape=w_nm.shape,
        pack_tile=w_nm.pack_tile,
        branches=plan(rows, w_nm, impl=impl, interpret=interpret, x_dtype=x.dtype),
        out_dtype=out_dtype,
        blocks=blocks,
    )
    y = _nm_matmul_2d(cfg, x.reshape(-1, x.shape[-1]), w_nm.values, w_nm.meta)
    return y.reshape(*batch, w_nm.shape[1])
