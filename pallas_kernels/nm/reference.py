"""Pure-XLA N:M matmul pieces: the fallback on every platform and the test oracle.

Two strategies, both exact up to floating-point summation order (the same pair as the block-sparse
reference):

* ``densify`` (``impl="dense"``): :func:`~pallas_kernels.nm.unpack_nm`, then one ``jnp.dot``. Dense FLOPs
  plus a weight-sized decompression.
* ``gather`` (``impl="xla"`` while its intermediates are no larger than the dense weight, i.e.
  ``B * n <= m``): gather the activation entry of every kept value, multiply and reduce over groups;
  ``n / m`` of the FLOPs and no dense weight. Larger batches fall back to ``densify``.

All functions work on 2-D activations ``x: (B, K)``; :func:`pallas_kernels.nm.nm_matmul` flattens batch dims.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.nm.format import NMWeight, unpack_indices, unpack_nm

__all__ = [
    "nm_dvalues_xla",
    "nm_dx_xla",
    "nm_matmul_dense_masked",
    "nm_matmul_xla",
    "pick_strategy",
]

Strategy = Literal["densify", "gather"]


def pick_strategy(rows: int, w: NMWeight) -> Strategy:
    """``gather`` when its intermediates (``rows * n * K/m * N``) are no larger than the dense weight."""
    return "gather" if rows * w.n <= w.m else "densify"


def _flat_positions(w: NMWeight) -> Int[Array, "n G N"]:
    """Row of ``W`` (``0 <= r < K``) of every kept value."""
    return unpack_indices(w) + (jnp.arange(w.groups, dtype=jnp.int32) * w.m)[None, :, None]


def nm_matmul_xla(
    x: Float[Array, "B K"], w: NMWeight, out_dtype=None, strategy: Strategy = "densify"
) -> Float[Array, "B N"]:
    """``x @ unpack_nm(w)`` in XLA with f32 accumulation (``strategy``: see the module docstring).

    Example::

      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import pack_nm
      >>> w_nm = pack_nm(jnp.eye(4, 2), n=2, m=4)
      >>> nm_matmul_xla(jnp.ones((1, 4)), w_nm).tolist()
      [[1.0, 1.0]]
    """
    out_dtype = out_dtype or jnp.result_type(x.dtype, w.values.dtype)
    if strategy == "gather":
        rows = _flat_positions(w)  # (n, G, N)
        y = jnp.zeros((x.shape[0], w.shape[1]), jnp.float32)
        for s in range(w.n):
            xs = jnp.take(x, rows[s].reshape(-1), axis=1).reshape(x.shape[0], *rows[s].shape)
            y = y + jnp.einsum(
                "bgn,gn->bn", xs.astype(jnp.float32), w.values[s].astype(jnp.float32)
            )
        return y.astype(out_dtype)
    y = jnp.dot(x, unpack_nm(w).astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def nm_dx_xla(
    dy: Float[Array, "B N"], w: NMWeight, out_dtype, strategy: Strategy = "densify"
) -> Float[Array, "B K"]:
    """``dy @ unpack_nm(w).T`` (the input gradient); ``gather`` scatters into the kept rows."""
    if strategy == "gather":
        rows = _flat_positions(w)  # (n, G, N)
        dyf = dy.astype(jnp.float32)
        dx = jnp.zeros((dy.shape[0], w.shape[0]), jnp.float32)
        for s in range(w.n):
            contrib = dyf[:, None, :] * w.values[s].astype(jnp.float32)[None]  # (B, G, N)
            dx = dx.at[:, rows[s].reshape(-1)].add(contrib.reshape(dy.shape[0], -1))
        return dx.astype(out_dtype)
    dense = unpack_nm(w).astype(dy.dtype)
    return jnp.dot(dy, dense.T, preferred_element_type=jnp.float32).astype(out_dtype)


def nm_dvalues_xla(
    x: Float[Array, "B K"], dy: Float[Array, "B N"], w: NMWeight
) -> Float[Array, "n G N"]:
    """Gradient w.r.t. ``w.values``: dense ``x.T @ dy``, gathered at the kept positions."""
    k, cols = w.shape
    dw = jnp.dot(x.T, dy.astype(x.dtype), preferred_element_type=jnp.float32)  # (K, N)
    dw = dw.reshape(k // w.m, w.m, cols)
    idx = unpack_indices(w).transpose(1, 0, 2)  # (G, n, N)
    return jnp.take_along_axis(dw, idx, axis=1).transpose(1, 0, 2).astype(w.values.dtype)


def nm_matmul_dense_masked(x: Float[Array, "... K"], w: NMWeight) -> Float[Array, "... N"]:
    """Test oracle: plain differentiable ``x @ unpack_nm(w)`` in the promoted dtype (no custom_vjp)."""
    dt = jnp.result_type(x.dtype, w.values.dtype)
    return jnp.matmul(x.astype(dt), unpack_nm(w).astype(dt), precision=jax.lax.Precision.HIGHEST)
