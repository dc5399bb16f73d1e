"""Pure-XLA N:M matmul pieces: the fallback on every platform and the test oracle.

All functions work on 2-D activations ``x: (B, K)``; :func:`pallas_kernels.nm.nm_matmul` flattens batch dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels.nm.format import NMWeight, unpack_indices, unpack_nm

__all__ = ["nm_matmul_xla", "nm_dx_xla", "nm_dvalues_xla", "nm_matmul_dense_masked"]


def nm_matmul_xla(x: Float[Array, "B K"], w: NMWeight, out_dtype=None) -> Float[Array, "B N"]:
    """``x @ unpack_nm(w)``: decompress to dense, then one XLA dot (f32 accumulation).

    Example::

      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import pack_nm
      >>> w_nm = pack_nm(jnp.eye(4, 2), n=2, m=4)
      >>> nm_matmul_xla(jnp.ones((1, 4)), w_nm).tolist()
      [[1.0, 1.0]]
    """
    out_dtype = out_dtype or jnp.result_type(x.dtype, w.values.dtype)
    y = jnp.dot(x, unpack_nm(w).astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def nm_dx_xla(dy: Float[Array, "B N"], w: NMWeight, out_dtype) -> Float[Array, "B K"]:
    """``dy @ unpack_nm(w).T`` (the input gradient)."""
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
