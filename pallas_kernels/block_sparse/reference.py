"""Pure-XLA block-sparse products: the path on platforms without a Pallas kernel, and the test oracle.

Two strategies, both exact up to floating-point summation order:

* ``densify``: scatter the stored blocks into a dense ``[K, N]`` matrix and call ``jnp.dot``. Reuses the
  vendor GEMM; costs dense FLOPs plus a weight-sized scatter.
* ``gather``: gather the activation blocks each stored block needs, one batched ``einsum`` over the stored
  blocks, then a segment sum into output blocks. FLOPs proportional to the stored blocks; intermediates of
  ``M * capacity * block`` elements, so it suits small ``M`` at high sparsity.

Every function takes 2-D activations; accumulation is float32 and results are cast to the input dtype. The
gather strategy upcasts its operands to float32 (XLA:CPU has no bf16 x bf16 -> f32 batched dot).
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from jaxtyping import Array, Float

from pallas_kernels.block_sparse.format import BlockSparseWeight, block_sparse_to_dense, live_mask

__all__ = [
    "dense_masked_reference",
    "matmul",
    "matmul_transposed",
    "pick_strategy",
    "sddmm",
]

Strategy = Literal["densify", "gather"]


def _acc(x: Array) -> Array:
    return x.astype(jnp.float32)


def pick_strategy(m: int, w: BlockSparseWeight) -> Strategy:
    """``gather`` when its intermediates are no larger than the dense weight, else ``densify``."""
    bk, bn = w.block
    k, n = w.shape
    return "gather" if m * w.capacity * (bk + bn) <= k * n else "densify"


def matmul(
    x: Float[Array, "M K"], w: BlockSparseWeight, strategy: Strategy | None = None
) -> Float[Array, "M N"]:
    """``x @ W`` in XLA.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.block_sparse.format import block_sparse_from_dense
      >>> w = block_sparse_from_dense(jnp.ones((4, 4)), jnp.eye(2, dtype=bool), block=(2, 2), capacity=2)
      >>> matmul(jnp.ones((1, 4)), w).tolist()
      [[2.0, 2.0, 2.0, 2.0]]
    """
    m = x.shape[0]
    strategy = strategy or pick_strategy(m, w)
    if strategy == "densify":
        return jnp.dot(x, block_sparse_to_dense(w), preferred_element_type=jnp.float32).astype(
            x.dtype
        )
    kb, nb = w.grid_shape
    bk, bn = w.block
    xb = _acc(x).reshape(m, kb, bk)[:, w.row_idx]  # [M, cap, bk]
    data = jnp.where(live_mask(w)[:, None, None], _acc(w.data), 0)
    yb = jnp.einsum("mcb,cbn->mcn", xb, data)
    y = jnp.zeros((m, nb, bn), jnp.float32).at[:, w.col_idx].add(yb)
    return y.reshape(m, nb * bn).astype(x.dtype)


def matmul_transposed(
    dy: Float[Array, "M N"], w: BlockSparseWeight, strategy: Strategy | None = None
) -> Float[Array, "M K"]:
    """``dy @ W.T`` in XLA (the dX product of the backward pass)."""
    m = dy.shape[0]
    strategy = strategy or pick_strategy(m, w)
    if strategy == "densify":
        return jnp.dot(dy, block_sparse_to_dense(w).T, preferred_element_type=jnp.float32).astype(
            dy.dtype
        )
    kb, nb = w.grid_shape
    bk, bn = w.block
    dyb = _acc(dy).reshape(m, nb, bn)[:, w.col_idx]  # [M, cap, bn]
    data = jnp.where(live_mask(w)[:, None, None], _acc(w.data), 0)
    xb = jnp.einsum("mcn,cbn->mcb", dyb, data)
    dx = jnp.zeros((m, kb, bk), jnp.float32).at[:, w.row_idx].add(xb)
    return dx.reshape(m, kb * bk).astype(dy.dtype)


def sddmm(
    x: Float[Array, "M K"],
    dy: Float[Array, "M N"],
    w: BlockSparseWeight,
    strategy: Strategy | None = None,
) -> Float[Array, "cap bk bn"]:
    """``(x.T @ dy)`` sampled at the stored blocks of ``w`` (the dW product); padding slots get zero."""
    m = x.shape[0]
    strategy = strategy or pick_strategy(m, w)
    kb, nb = w.grid_shape
    bk, bn = w.block
    if strategy == "densify":
        full = jnp.dot(_acc(x).T, _acc(dy)).reshape(kb, bk, nb, bn).transpose(0, 2, 1, 3)
        blocks = full[w.row_idx, w.col_idx]
    else:
        xb = _acc(x).reshape(m, kb, bk)[:, w.row_idx]
        dyb = _acc(dy).reshape(m, nb, bn)[:, w.col_idx]
        blocks = jnp.einsum("mcb,mcn->cbn", xb, dyb)
    return jnp.where(live_mask(w)[:, None, None], blocks, 0).astype(w.dtype)


def dense_masked_reference(x: Float[Array, "... K"], w: BlockSparseWeight) -> Float[Array, "... N"]:
    """``x @ to_dense(W)`` with plain autodiff (float32 accumulation): the oracle for values and gradients."""
    return jnp.matmul(x, block_sparse_to_dense(w), preferred_element_type=jnp.float32).astype(
        x.dtype
    )
