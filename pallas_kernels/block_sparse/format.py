"""Fixed-capacity block-sparse weight format (BSC grouping + transposed view), packable inside ``jit``.

``W`` is ``[K, N]`` (used as ``x @ W``) tiled into ``(bk, bn)`` blocks, ``Kb = K // bk`` by ``Nb = N // bn``.
Up to ``capacity`` blocks are stored. Entries ``0 .. nnz-1`` are the live blocks, sorted by output column
block then K block (what an output-stationary grid needs); entries ``nnz .. capacity-1`` are padding: their
data is zero and their indices repeat the last live entry, so a kernel stepping over them issues no new DMA.
A transposed view (sorted by K block, then column block; ``t_perm`` points into ``data``) drives dX.

All shapes depend only on ``(K, N, bk, bn, capacity)``, so re-packing a changed mask inside a jitted training
step does not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jaxtyping import Array, ArrayLike, Bool, Float, Int

__all__ = [
    "BlockSparseIndex",
    "BlockSparseWeight",
    "block_mask_from_dense",
    "block_mask_of",
    "block_sparse_from_dense",
    "block_sparse_to_dense",
    "live_mask",
    "with_data",
]


@dataclasses.dataclass(frozen=True)
class BlockSparseIndex:
    """Where the blocks of a :class:`BlockSparseWeight` are: every field but its ``data``.

    The one list of the format's index fields: :class:`BlockSparseWeight` adds ``data`` to it, and the Flax
    layers' ``jaxsparse.flax.BlockSparsePattern`` is this index alone (the layer keeps ``data`` as its trainable
    parameter).

    Attributes:
      row_idx: ``[capacity]`` int32 K-block of each entry (column-grouped order).
      col_idx: ``[capacity]`` int32 N-block of each entry, non-decreasing over live entries.
      t_row_idx: ``[capacity]`` int32 K-block in the transposed (row-grouped) order, non-decreasing.
      t_col_idx: ``[capacity]`` int32 N-block in the transposed order.
      t_perm: ``[capacity]`` int32 position in ``data`` of each transposed-order entry.
      col_ptr: ``[Nb + 1]`` int32 offsets: column block ``j`` owns entries ``col_ptr[j]:col_ptr[j+1]``.
      row_ptr: ``[Kb + 1]`` int32 offsets into the transposed order.
      nnz: int32 scalar, live entries (``<= capacity``).
      num_dropped: int32 scalar, mask blocks that did not fit (non-zero means ``data`` was NaN-poisoned).
      shape: static ``(K, N)``.
      block: static ``(bk, bn)``.
    """

    row_idx: Int[Array, " cap"]
    col_idx: Int[Array, " cap"]
    t_row_idx: Int[Array, " cap"]
    t_col_idx: Int[Array, " cap"]
    t_perm: Int[Array, " cap"]
    col_ptr: Int[Array, " nbp1"]
    row_ptr: Int[Array, " kbp1"]
    nnz: Int[Array, ""]
    num_dropped: Int[Array, ""]
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    block: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        """Stored block slots (static)."""
        return self.row_idx.shape[0]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(Kb, Nb)``: number of block rows and block columns."""
        return self.shape[0] // self.block[0], self.shape[1] // self.block[1]


@dataclasses.dataclass(frozen=True)
class BlockSparseWeight(BlockSparseIndex):
    """A ``[K, N]`` weight stored as at most ``capacity`` non-zero ``(bk, bn)`` blocks.

    Attributes:
      data: ``[capacity, bk, bn]`` stored blocks (the only trainable leaf, the first in pytree order); padding
        entries are zero.
      row_idx, col_idx, t_row_idx, t_col_idx, t_perm, col_ptr, row_ptr, nnz, num_dropped, shape, block: where
        the blocks are, as in :class:`BlockSparseIndex`.
    """

    data: Float[Array, "cap bk bn"]

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    @property
    def capacity_density(self) -> float:
        """Static upper bound on block density: ``capacity / (Kb * Nb)`` (what dispatch plans with)."""
        kb, nb = self.grid_shape
        return min(1.0, self.capacity / (kb * nb))


_INDEX_STATIC = {
    f.name: bool(f.metadata.get("static")) for f in dataclasses.fields(BlockSparseIndex)
}
jax.tree_util.register_dataclass(  # ``data`` first in pytree order, then the index arrays
    BlockSparseWeight,
    data_fields=["data", *(k for k, static in _INDEX_STATIC.items() if not static)],
    meta_fields=[k for k, static in _INDEX_STATIC.items() if static],
)


def _check_weight(w: Any, block: Any, name: str = "w") -> tuple[int, int]:
    if not hasattr(w, "shape") or len(w.shape) != 2:
        raise ValueError(
            f"{name} must be a 2-D [K, N] weight; got shape {getattr(w, 'shape', type(w).__name__)}."
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float32, bfloat16, float16); got {w.dtype}."
        )
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, (int, np.integer)) and b > 0 for b in block)
    ):
        raise ValueError(f"block must be a pair of positive ints (bk, bn); got {block!r}.")
    bk, bn = int(block[0]), int(block[1])
    k, n = w.shape
    if k % bk or n % bn:
        raise ValueError(
            f"block={block!r} must divide the weight shape {tuple(w.shape)}: K % bk = {k % bk}, "
            f"N % bn = {n % bn}."
        )
    return bk, bn


def _block_view(w: Array, bk: int, bn: int) -> Array:
    """``[K, N] -> [Kb, Nb, bk, bn]``."""
    k, n = w.shape
    return w.reshape(k // bk, bk, n // bn, bn).transpose(0, 2, 1, 3)


def _pad_with_last(idx: Array, live: Array, count: Array) -> Array:
    """Replace padding entries by the last live entry (or 0 when there is none)."""
    last = idx[jnp.maximum(count - 1, 0)]
    return jnp.where(live, idx, jnp.where(count > 0, last, 0)).astype(jnp.int32)


def block_sparse_from_dense(
    w: Float[ArrayLike, "K N"],
    block_mask: Bool[ArrayLike, "Kb Nb"],
    *,
    block: tuple[int, int],
    capacity: int,
) -> BlockSparseWeight:
    """Pack ``w`` restricted to ``block_mask`` into a :class:`BlockSparseWeight`; jittable.

    Blocks outside the mask are dropped (their values in ``w`` are ignored). ``capacity`` is static and must be
    at least ``block_mask.sum()``: with a concrete mask a smaller capacity raises ``ValueError``; with a
    traced mask (under ``jit``) it cannot raise, so instead ``num_dropped`` counts the blocks that did not fit
    and ``data`` is filled with NaN, making every product with it NaN rather than silently wrong. Wrap the
    caller with ``jax.experimental.checkify`` to turn that case into an error.

    Args:
      w: a floating-point ``[K, N]`` weight, ``K`` and ``N`` divisible by the block shape.
      block_mask: ``[K // bk, N // bn]`` bools (True = stored block); may be traced.
      block: ``(bk, bn)``, two positive ints.
      capacity: the static number of block slots, ``1 <= capacity <= Kb * Nb``.

    Returns:
      A :class:`BlockSparseWeight` with the live blocks first and zero padding after them.

    Raises:
      ValueError: a ``w`` that is not 2-D or not divisible by ``block``, a bad ``block``, a ``block_mask`` of the
        wrong shape, a ``capacity`` out of range, or (concrete mask) fewer slots than mask blocks.
      TypeError: ``w`` is not floating-point.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.arange(16.0).reshape(4, 4)
      >>> mask = jnp.array([[True, False], [False, True]])
      >>> bsw = block_sparse_from_dense(w, mask, block=(2, 2), capacity=3)
      >>> int(bsw.nnz), bsw.data.shape
      (2, (3, 2, 2))
    """
    bk, bn = _check_weight(w, block)
    w = jnp.asarray(w)
    k, n = w.shape
    kb, nb = k // bk, n // bn
    if not hasattr(block_mask, "shape") or tuple(block_mask.shape) != (kb, nb):
        raise ValueError(
            f"block_mask must have shape (K // bk, N // bn) = {(kb, nb)}; got "
            f"{getattr(block_mask, 'shape', type(block_mask).__name__)}."
        )
    if not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(
            f"capacity must be a static int >= 1 (at least one slot is kept); got {capacity!r}."
        )
    capacity = int(capacity)
    if capacity > kb * nb:
        raise ValueError(f"capacity={capacity} exceeds the number of blocks Kb * Nb = {kb * nb}.")
    mask = jnp.asarray(block_mask).astype(bool)
    count = jnp.sum(mask, dtype=jnp.int32)
    if not isinstance(count, jax.core.Tracer):  # a replicated scalar: readable on every process
        if int(count) > capacity:
            raise ValueError(
                f"capacity={capacity} is smaller than the number of blocks in block_mask ({int(count)}); "
                f"pass capacity >= {int(count)}."
            )

    nnz = jnp.minimum(count, capacity)
    slots = jnp.arange(capacity, dtype=jnp.int32)
    live = slots < nnz

    # Column-grouped order: flat index j * Kb + k over mask.T is sorted by (j, k).
    (flat,) = jnp.nonzero(mask.T.reshape(-1), size=capacity, fill_value=0)
    col = _pad_with_last((flat // kb).astype(jnp.int32), live, nnz)
    row = _pad_with_last((flat % kb).astype(jnp.int32), live, nnz)
    blocks = _block_view(w, bk, bn)
    data = jnp.where(live[:, None, None], blocks[row, col], 0).astype(w.dtype)
    num_dropped = count - nnz
    data = jnp.where(num_dropped > 0, jnp.full_like(data, jnp.nan), data)
    checkify.debug_check(
        num_dropped == 0, "block_sparse_from_dense: {} mask blocks exceed capacity", num_dropped
    )

    # Transposed order: flat index k * Nb + j over mask is sorted by (k, j).
    (flat_t,) = jnp.nonzero(mask.reshape(-1), size=capacity, fill_value=0)
    t_row = (flat_t // nb).astype(jnp.int32)
    t_col = (flat_t % nb).astype(jnp.int32)
    # Position of block (k, j) in the column-grouped order = its rank in mask.T's flat order.
    rank = (jnp.cumsum(mask.T.reshape(-1), dtype=jnp.int32) - 1).reshape(nb, kb)
    t_perm = rank[t_col, t_row]
    # On overflow some transposed entries point past capacity; data is NaN then, so clamping is harmless.
    t_perm = _pad_with_last(jnp.minimum(t_perm, capacity - 1), live, nnz)
    t_row = _pad_with_last(t_row, live, nnz)
    t_col = _pad_with_last(t_col, live, nnz)

    col_counts = jnp.sum(mask, axis=0, dtype=jnp.int32)
    row_counts = jnp.sum(mask, axis=1, dtype=jnp.int32)
    col_ptr = jnp.minimum(jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(col_counts)]), nnz)
    row_ptr = jnp.minimum(jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(row_counts)]), nnz)
    return BlockSparseWeight(
        data=data,
        row_idx=row,
        col_idx=col,
        t_row_idx=t_row,
        t_col_idx=t_col,
        t_perm=t_perm,
        col_ptr=col_ptr.astype(jnp.int32),
        row_ptr=row_ptr.astype(jnp.int32),
        nnz=nnz,
        num_dropped=num_dropped.astype(jnp.int32),
        shape=(k, n),
        block=(bk, bn),
    )


def block_mask_from_dense(
    w: Float[ArrayLike, "K N"], *, block: tuple[int, int]
) -> Bool[Array, "Kb Nb"]:
    """Block mask of the non-zero ``(bk, bn)`` blocks of ``w``; jittable.

    Args:
      w: a floating-point ``[K, N]`` weight, ``K`` and ``N`` divisible by the block shape.
      block: ``(bk, bn)``, two positive ints.

    Returns:
      ``[K // bk, N // bn]`` bools, True where the block has a nonzero entry.

    Raises:
      ValueError: a ``w`` that is not 2-D or not divisible by ``block``, or a bad ``block``.
      TypeError: ``w`` is not floating-point.

    Example:
      >>> import jax.numpy as jnp
      >>> block_mask_from_dense(jnp.eye(4), block=(2, 2)).tolist()
      [[True, False], [False, True]]
    """
    bk, bn = _check_weight(w, block)
    return jnp.any(_block_view(jnp.asarray(w), bk, bn) != 0, axis=(2, 3))


def live_mask(w: BlockSparseWeight) -> Bool[Array, " cap"]:
    """``[capacity]`` bool: which storage slots hold live blocks."""
    return jnp.arange(w.capacity, dtype=jnp.int32) < w.nnz


def block_sparse_to_dense(w: BlockSparseWeight) -> Float[Array, "K N"]:
    """The dense ``[K, N]`` matrix; exact inverse of :func:`block_sparse_from_dense` on the mask.

    Args:
      w: a :class:`BlockSparseWeight`.

    Returns:
      The ``[K, N]`` array in ``w.data``'s dtype, zero outside the stored blocks.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.arange(16.0).reshape(4, 4)
      >>> mask = jnp.array([[True, False], [False, True]])
      >>> dense = block_sparse_to_dense(block_sparse_from_dense(w, mask, block=(2, 2), capacity=2))
      >>> bool((dense == w * jnp.kron(mask, jnp.ones((2, 2)))).all())
      True
    """
    kb, nb = w.grid_shape
    bk, bn = w.block
    rows = jnp.where(live_mask(w), w.row_idx, kb)  # padding scatters out of bounds and is dropped
    blocks = jnp.zeros((kb, nb, bk, bn), w.dtype).at[rows, w.col_idx].set(w.data, mode="drop")
    return blocks.transpose(0, 2, 1, 3).reshape(w.shape)


def block_mask_of(w: BlockSparseWeight) -> Bool[Array, "Kb Nb"]:
    """The ``[Kb, Nb]`` block mask of the live blocks of ``w``."""
    kb, nb = w.grid_shape
    rows = jnp.where(live_mask(w), w.row_idx, kb)
    return jnp.zeros((kb, nb), bool).at[rows, w.col_idx].set(True, mode="drop")


def with_data(w: BlockSparseWeight, data: Float[Array, "cap bk bn"]) -> BlockSparseWeight:
    """``w`` with its block values replaced (same pattern); validates shape and dtype."""
    if data.shape != w.data.shape:
        raise ValueError(f"data must have shape {w.data.shape}; got {data.shape}.")
    return dataclasses.replace(w, data=data)
