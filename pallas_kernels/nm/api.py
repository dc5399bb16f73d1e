"""``nm_matmul``: ``x @ W`` for an N:M-sparse weight, one entry point for every platform, with ``custom_vjp``.

* forward: Pallas kernel (Mosaic TPU / Mosaic GPU) or the XLA reference (decompress + dot);
* ``dx = dy @ W.T``: the same kernels walk the same compressed weight (no transposed metadata: the groups
  run along ``K``, which is the output axis of ``dx``);
* ``d values``: dense ``x.T @ dy`` (XLA), gathered at the kept positions (without sparse tensor cores an
  N:M "SDDMM" saves no FLOPs; mask-learning schemes need the dense gradient anyway).

The implementation is picked per call from static shapes by :func:`pallas_kernels.dispatch` style rules:
``impl="auto"`` uses ``lax.platform_dependent`` (one jitted function runs XLA on CPU and lowers to the
Pallas kernel on TPU/GPU) and, per platform, the bytes-vs-FLOPs cost model in :func:`nm_cost_model`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels.nm import mosaic_gpu as _mgpu
from pallas_kernels.nm import reference as _ref
from pallas_kernels.nm import tpu as _tpu
from pallas_kernels.nm.format import NMWeight, check_nm, index_bits

__all__ = ["nm_matmul", "Impl", "IMPLS", "validate_nm_weight"]

Impl = Literal["auto", "xla", "pallas_tpu", "pallas_mosaic_gpu"]
IMPLS = ("auto", "xla", "pallas_tpu", "pallas_mosaic_gpu")


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
        f"packed with ({w.n}:{w.m}) — re-pack it with pack_nm(dense, n={n}, m={m})")
  k, cols = w.shape
  g = k // w.m
  f = 32 // index_bits(w.m)
  if w.values.shape != (w.n, g, cols):
    raise ValueError(
        f"w_nm.values.shape={w.values.shape} does not match {w.n}:{w.m} of a {w.shape} weight; "
        f"expected (n, K//m, N) = {(w.n, g, cols)}")
  if w.pack_tile % f:
    raise ValueError(f"w_nm.pack_tile={w.pack_tile} must be a multiple of {f} for m={w.m}")
  gp = -(-g // w.pack_tile) * w.pack_tile
  if w.meta.shape != (w.n, gp // f, cols) or w.meta.dtype != jnp.int32:
    raise ValueError(
        f"w_nm.meta (shape {w.meta.shape}, dtype {w.meta.dtype}) is not {w.n}:{w.m} metadata for a "
        f"{w.shape} weight with pack_tile={w.pack_tile}; expected int32 {(w.n, gp // f, cols)}")
  return w


# ----------------------------------------------------------------------------------------------------------
# dispatch glue (platform choice + cost model). Kept in this one section so it can move to
# pallas_kernels/dispatch.py.


@dataclasses.dataclass(frozen=True)
class _Config:
  n: int
  m: int
  shape: tuple[int, int]
  pack_tile: int
  impl: str
  interpret: Any
  out_dtype: Any
  blocks: tuple[int, int, int] | None


def _weight(cfg: _Config, values, meta) -> NMWeight:
  return NMWeight(values=values, meta=meta, n=cfg.n, m=cfg.m, shape=cfg.shape, pack_tile=cfg.pack_tile)


@dataclasses.dataclass(frozen=True)
class DeviceModel:
  """Roofline numbers of one accelerator [spec sheets, not measured here] plus kernel assumptions [estimate]."""
  peak_flops: float        # dense matmul FLOP/s at bf16
  hbm_bytes_per_s: float
  kernel_mxu_efficiency: float  # fraction of dense matmul throughput the decompressing kernel reaches
  decompress_ops_per_s: float   # element-wise (VPU / CUDA core) ops/s spent on decompression
  tile_rows: int                # rows of x per kernel tile: the weight is re-decompressed per row tile


DEVICE_MODELS = {
    # H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, ~67 TFLOP/s f32 CUDA cores; wgmma M tile 64.
    "cuda": DeviceModel(989e12, 3.35e12, 0.6, 67e12, 64),
    # TPU v5e: 197 TFLOP/s bf16, 819 GB/s HBM; VPU ops about 1/8 of MXU rate [estimate]; bm <= 256.
    "tpu": DeviceModel(197e12, 819e9, 0.7, 25e12, 256),
}

MIN_PREDICTED_SPEEDUP = 1.25
"""The kernel is chosen only if the model predicts at least this gain over the XLA path (the model is
uncalibrated: no GPU/TPU measurement exists yet)."""


def nm_cost_model(platform: str, *, rows: int, k: int, n_out: int, n: int, m: int, dtype) -> dict:
  """Predicted seconds of the Pallas kernel and of the XLA path (decompress + dense dot) for one product.

  kernel = max(FLOPs / (peak * eff), bytes(x, values, meta, y) / BW) + decompression ops * row tiles / ALU
  xla    = bytes(read compressed + write dense + read dense) / BW + max(FLOPs / peak, bytes(x, W, y) / BW)

  The kernel saves bytes, not FLOPs (no sparse tensor cores from Pallas on Hopper/TPU), so it can only win
  where the product is memory bound (few rows).
  """
  dev = DEVICE_MODELS[platform]
  item = jnp.dtype(dtype).itemsize
  flops = 2.0 * rows * k * n_out
  act = item * (rows * k + rows * n_out)
  dense_w = item * k * n_out
  nm_w = item * n * (k // m) * n_out + 4 * n * (k // m) * n_out * index_bits(m) / 32
  row_tiles = -(-rows // dev.tile_rows)
  decompress = row_tiles * k * n_out * (2 * n + 1) / dev.decompress_ops_per_s
  kernel = max(flops / (dev.peak_flops * dev.kernel_mxu_efficiency), (act + nm_w) / dev.hbm_bytes_per_s)
  kernel += decompress
  xla = (nm_w + 2 * dense_w) / dev.hbm_bytes_per_s + max(flops / dev.peak_flops,
                                                         (act + dense_w) / dev.hbm_bytes_per_s)
  dense = max(flops / dev.peak_flops, (act + dense_w) / dev.hbm_bytes_per_s)
  return {"kernel": kernel, "xla": xla, "dense_weight_dot": dense}


def use_nm_kernel(platform: str, *, rows: int, k: int, n_out: int, n: int, m: int, dtype) -> bool:
  """The dispatch rule: Pallas kernel iff supported on ``platform`` and predicted >= 1.25x faster."""
  if platform == "cuda" and not _mgpu.supports(rows=rows, k=k, n_out=n_out, n=n, m=m, dtype=dtype):
    return False
  if platform == "tpu" and not jnp.issubdtype(dtype, jnp.floating):
    return False
  t = nm_cost_model(platform, rows=rows, k=k, n_out=n_out, n=n, m=m, dtype=dtype)
  return t["kernel"] * MIN_PREDICTED_SPEEDUP <= t["xla"]


def _pallas_fn(platform: str, op: str):
  if platform == "tpu":
    return _tpu.nm_matmul_tpu if op == "fwd" else _tpu.nm_dx_tpu
  return _mgpu.nm_matmul_mosaic_gpu if op == "fwd" else _mgpu.nm_dx_mosaic_gpu


def _xla_fn(op: str):
  return _ref.nm_matmul_xla if op == "fwd" else _ref.nm_dx_xla


def _run(cfg: _Config, op: str, a, values, meta):
  """op "fwd": a = x (B, K) -> (B, N); op "dx": a = dy (B, N) -> (B, K)."""
  out_dtype = cfg.out_dtype
  w = _weight(cfg, values, meta)
  if cfg.impl == "xla":
    return _xla_fn(op)(a, w, out_dtype)
  if cfg.impl in ("pallas_tpu", "pallas_mosaic_gpu"):
    platform = "tpu" if cfg.impl == "pallas_tpu" else "cuda"
    kwargs = {"blocks": cfg.blocks} if platform == "tpu" else {}
    return _pallas_fn(platform, op)(a, w, out_dtype=out_dtype, interpret=cfg.interpret, **kwargs)

  rows = a.shape[0]
  branches = {}
  for platform in ("tpu", "cuda"):
    if use_nm_kernel(platform, rows=rows, k=cfg.shape[0], n_out=cfg.shape[1], n=cfg.n,
                                    m=cfg.m, dtype=values.dtype):
      fn = _pallas_fn(platform, op)
      branches[platform] = lambda a, v, mt, fn=fn: fn(a, _weight(cfg, v, mt), out_dtype=out_dtype)
  xla = lambda a, v, mt: _xla_fn(op)(a, _weight(cfg, v, mt), out_dtype)
  if not branches:
    return xla(a, values, meta)
  return jax.lax.platform_dependent(a, values, meta, default=xla, **branches)


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
    impl: Impl = "auto",
    n: int | None = None,
    m: int | None = None,
    preferred_element_type: Any = None,
    interpret: Any = None,
    blocks: tuple[int, int, int] | None = None,
) -> Float[Array, "*batch N"]:
  """``x @ unpack_nm(w_nm)`` without materialising the dense weight on TPU/GPU; differentiable.

  Args:
    x: activations ``(..., K)``.
    w_nm: :class:`NMWeight` from :func:`pack_nm` (weight ``(K, N)``, groups along ``K``).
    impl: ``"auto"`` (per platform: Pallas kernel where the cost model says it wins, else XLA),
      ``"xla"`` (decompress + dot), ``"pallas_tpu"`` or ``"pallas_mosaic_gpu"`` (force a kernel; with
      ``interpret`` it runs on CPU).
    n, m: optional expected pattern; a weight packed with another N:M raises ``ValueError``.
    preferred_element_type: output dtype (default: promoted input dtype). Accumulation is f32.
    interpret: for forced Pallas impls: ``True``/``"hlo"`` or ``"tpu"`` (TPU interpret mode) /
      ``"gpu"`` (Mosaic-GPU interpret mode).
    blocks: ``(bm, bg, bn)`` tile override for the TPU kernel (``bg`` in groups).

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
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not allowed; use one of {IMPLS}")
  w_nm = validate_nm_weight(w_nm, n=n, m=m)
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != w_nm.shape[0]:
    raise ValueError(
        f"x.shape={x.shape}: the last axis must equal the contraction length K={w_nm.shape[0]} of w_nm "
        f"(shape {w_nm.shape})")
  if interpret is not None and impl in ("auto", "xla"):
    raise ValueError(f"interpret={interpret!r} needs a Pallas impl (pallas_tpu / pallas_mosaic_gpu), got {impl=}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be floating point, got x.dtype={x.dtype}")
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x.dtype, w_nm.values.dtype))
  cfg = _Config(n=w_nm.n, m=w_nm.m, shape=w_nm.shape, pack_tile=w_nm.pack_tile, impl=impl,
                interpret=interpret, out_dtype=out_dtype, blocks=blocks)
  batch = x.shape[:-1]
  y = _nm_matmul_2d(cfg, x.reshape(-1, x.shape[-1]), w_nm.values, w_nm.meta)
  return y.reshape(*batch, w_nm.shape[1])
