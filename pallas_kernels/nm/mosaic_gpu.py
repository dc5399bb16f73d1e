"""Mosaic GPU (Hopper) kernels for N:M matmul. Placeholder: not implemented yet."""

from __future__ import annotations

__all__ = ["nm_matmul_mosaic_gpu", "nm_dx_mosaic_gpu", "unsupported_reason"]


def unsupported_reason(*, rows, k, n_out, n, m, dtype) -> str | None:
  return "the Mosaic GPU N:M kernel is not implemented yet"


def nm_matmul_mosaic_gpu(x2, w, *, out_dtype=None, interpret=None):
  raise NotImplementedError("Mosaic GPU N:M kernel is not implemented yet")


def nm_dx_mosaic_gpu(dy, w, *, out_dtype=None, interpret=None):
  raise NotImplementedError("Mosaic GPU N:M kernel is not implemented yet")
