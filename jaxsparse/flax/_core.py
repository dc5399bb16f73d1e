"""Framework-neutral pieces shared by the NNX and Linen layers: storage layout, init, forward, re-pack.

Storage layout (identical in NNX and Linen, so every tree function below serves both):

* block-sparse layer: trainable ``kernel_blocks [capacity, bk, bn]`` (the :class:`BlockSparseWeight`'s ``data``)
  and the non-trainable pattern leaves :data:`BLOCK_PATTERN_FIELDS` (``row_idx``, ``col_idx``, ``t_row_idx``,
  ``t_col_idx``, ``t_perm``, ``col_ptr``, ``row_ptr``, ``nnz``, ``num_dropped``). ``(K, N)`` and ``(bk, bn)``
  follow from the shapes (``K = (len(row_ptr) - 1) * bk``, ``N = (len(col_ptr) - 1) * bn``).
* N:M layer: trainable ``kernel_values [n, K // m, N]`` and the non-trainable ``meta`` (bit-packed positions)
  plus ``nm_config = int32[n, m, pack_tile]`` (static facts the shapes do not determine).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as _dtypes
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxsparse.masks import block_scores, topk_mask
from pallas_kernels.block_sparse import (
    BlockSparseWeight,
    block_sparse_from_dense,
    bsr_matmul,
)
from pallas_kernels.block_sparse.format import live_mask
from pallas_kernels.nm import NMWeight, check_nm, nm_matmul, pack_nm

BLOCK_PATTERN_FIELDS: tuple[str, ...] = (
    "row_idx",
    "col_idx",
    "t_row_idx",
    "t_col_idx",
    "t_perm",
    "col_ptr",
    "row_ptr",
    "nnz",
    "num_dropped",
)
NM_PATTERN_FIELDS: tuple[str, ...] = ("meta", "nm_config")
BLOCK_PARAM = "kernel_blocks"
NM_PARAM = "kernel_values"
PATTERN_COLLECTION = "sparse_pattern"  # Linen collection name of the pattern leaves


# ------------------------------------------------------------------------------------------- validation
def check_block(block: Any, in_features: int, out_features: int, where: str) -> tuple[int, int]:
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(
            isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0 for b in block
        )
    ):
        raise ValueError(f"{where}: block must be a pair of positive ints (bk, bn); got {block!r}.")
    bk, bn = int(block[0]), int(block[1])
    if in_features % bk or out_features % bn:
        raise ValueError(
            f"{where}: block={tuple(block)} must divide the kernel shape (in_features, out_features) = "
            f"({in_features}, {out_features})."
        )
    return bk, bn


def resolve_capacity(
    capacity: Any, density: Any, block_mask: Any, grid: tuple[int, int], where: str
) -> int:
    """Static capacity from ``capacity``, ``density`` (fraction of blocks) or the initial ``block_mask``."""
    total = grid[0] * grid[1]
    if capacity is not None and density is not None:
        raise ValueError(f"{where}: pass capacity or density, not both.")
    if capacity is None and density is not None:
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"{where}: density must be in (0, 1]; got {density!r}.")
        capacity = max(1, math.ceil(float(density) * total))
    if capacity is None and block_mask is not None:
        capacity = max(1, int(np.asarray(block_mask).sum()))
    if capacity is None:
        raise ValueError(
            f"{where}: pass capacity= (stored blocks), density= (fraction of blocks) or block_mask=."
        )
    if (
        isinstance(capacity, bool)
        or not isinstance(capacity, (int, np.integer))
        or not 1 <= capacity <= total
    ):
        raise ValueError(
            f"{where}: capacity must be an int in [1, Kb * Nb = {total}]; got {capacity!r}."
        )
    return int(capacity)


def check_block_mask(block_mask: Any, grid: tuple[int, int], capacity: int, where: str) -> Array:
    mask = jnp.asarray(block_mask)
    if mask.shape != grid or mask.dtype != jnp.bool_:
        raise ValueError(
            f"{where}: block_mask must be a bool array of shape (Kb, Nb) = {grid}; got "
            f"{mask.dtype} {mask.shape}."
        )
    if not isinstance(mask, jax.core.Tracer):
        count = int(np.asarray(mask).sum())
        if count > capacity:
            raise ValueError(
                f"{where}: capacity={capacity} is below the block count of its block_mask ({count}); "
                f"pass capacity >= {count}."
            )
    return mask


# ------------------------------------------------------------------------------------------- init
def init_block_sparse(
    kernel: Float[Array, "K N"],
    block: tuple[int, int],
    capacity: int,
    block_mask: Bool[ArrayLike, "Kb Nb"] | None,
) -> BlockSparseWeight:
    """Packs an initial dense kernel: ``block_mask`` if given, else its ``capacity`` largest-L2 blocks."""
    if block_mask is None:
        block_mask = topk_mask(block_scores(kernel, block, "l2"), capacity)
    return block_sparse_from_dense(kernel, block_mask, block=block, capacity=capacity)


def init_nm(
    kernel: Float[Array, "K N"], n: int, m: int, mask: Any, pack_tile: int | None
) -> NMWeight:
    return pack_nm(
        kernel, None if mask is None else jnp.asarray(mask), n=n, m=m, pack_tile=pack_tile
    )


def block_pattern(w: BlockSparseWeight) -> dict[str, Array]:
    return {f: getattr(w, f) for f in BLOCK_PATTERN_FIELDS}


def nm_pattern(w: NMWeight) -> dict[str, Array]:
    return {"meta": w.meta, "nm_config": jnp.array([w.n, w.m, w.pack_tile], jnp.int32)}


def block_weight(data: Float[Array, "cap bk bn"], pattern: dict[str, Array]) -> BlockSparseWeight:
    """Rebuilds the :class:`BlockSparseWeight` from stored leaves (shape and block follow from the shapes)."""
    _, bk, bn = data.shape
    k = (pattern["row_ptr"].shape[0] - 1) * bk
    n = (pattern["col_ptr"].shape[0] - 1) * bn
    return BlockSparseWeight(
        data=data, **{f: pattern[f] for f in BLOCK_PATTERN_FIELDS}, shape=(k, n), block=(bk, bn)
    )


def nm_weight(
    values: Float[Array, "n G N"], meta: Int[Array, "n W N"], *, n: int, m: int, pack_tile: int
) -> NMWeight:
    _, g, cols = values.shape
    return NMWeight(values=values, meta=meta, n=n, m=m, shape=(g * m, cols), pack_tile=pack_tile)


def static_nm_config(nm_config: Any, where: str) -> tuple[int, int, int]:
    if isinstance(nm_config, jax.core.Tracer):
        raise ValueError(
            f"{where}: the N:M config (n, m, pack_tile) is traced; convert outside jit."
        )
    n, m, tile = (int(v) for v in np.asarray(nm_config))
    check_nm(n, m)
    return n, m, tile


# ------------------------------------------------------------------------------------------- forward
def _precision_name(precision: Any) -> str | None:
    if precision is None:
        return None
    if isinstance(precision, (tuple, list)):
        precision = precision[0]
    if isinstance(precision, str):
        return precision
    return lax.Precision(precision).name.lower()


def block_sparse_apply(
    x: Array,
    data: Array,
    pattern: dict[str, Array],
    bias: Array | None,
    *,
    dtype: Any,
    precision: Any,
    impl: str,
    interpret: str | None,
) -> Array:
    """``x @ W + b`` on :func:`pallas_kernels.block_sparse.bsr_matmul` with Flax's dtype promotion.

    ``precision`` sets ``jax.default_matmul_precision`` while the product is traced, which the XLA paths
    (dense fallback, XLA reference) honour; the Pallas kernels accumulate in float32 regardless.
    """
    x, data, bias = _dtypes.promote_dtype(x, data, bias, dtype=dtype)
    w = block_weight(data, pattern)
    name = _precision_name(precision)
    if name is None:
        y = bsr_matmul(x, w, impl=impl, interpret=interpret)
    else:
        with jax.default_matmul_precision(name):
            y = bsr_matmul(x, w, impl=impl, interpret=interpret)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


def nm_apply(
    x: Array,
    values: Array,
    meta: Array,
    bias: Array | None,
    *,
    n: int,
    m: int,
    pack_tile: int,
    dtype: Any,
    precision: Any,
    impl: str,
    interpret: str | None,
) -> Array:
    """``x @ W + b`` on :func:`pallas_kernels.nm.nm_matmul` with Flax's dtype promotion."""
    x, values, bias = _dtypes.promote_dtype(x, values, bias, dtype=dtype)
    w = nm_weight(values, meta, n=n, m=m, pack_tile=pack_tile)
    name = _precision_name(precision)
    if name is None:
        y = nm_matmul(x, w, impl=impl, interpret=interpret)
    else:
        with jax.default_matmul_precision(name):
            y = nm_matmul(x, w, impl=impl, interpret=interpret)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


# ------------------------------------------------------------------------------------------- re-pack
def slot_sources(old: BlockSparseWeight, new: BlockSparseWeight) -> Int[Array, " cap"]:
    """For each storage slot of ``new``: the slot of ``old`` holding the same block, or -1 (new block / padding)."""
    kb, nb = old.grid_shape
    rows = jnp.where(
        live_mask(old), old.row_idx, kb
    )  # padding scatters out of bounds and is dropped
    grid = (
        jnp.full((kb, nb), -1, jnp.int32)
        .at[rows, old.col_idx]
        .set(jnp.arange(old.capacity, dtype=jnp.int32), mode="drop")
    )
    return jnp.where(live_mask(new), grid[new.row_idx, new.col_idx], -1)


def take_slots(leaf: Array, src: Int[Array, " cap"]) -> Array:
    """``leaf[src]`` along the slot axis, zero where ``src == -1`` (moves optimizer moments with their blocks)."""
    keep = (src >= 0).reshape((-1,) + (1,) * (leaf.ndim - 1))
    return jnp.where(keep, leaf[jnp.maximum(src, 0)], jnp.zeros((), leaf.dtype))


def repack(
    w: BlockSparseWeight, block_mask: Bool[Array, "Kb Nb"]
) -> tuple[BlockSparseWeight, Array]:
    """``w`` re-packed to ``block_mask`` at the same capacity; jittable, no dense ``[K, N]`` intermediate.

    Kept blocks keep their values, new blocks start at zero. Returns the new weight and :func:`slot_sources`
    (apply :func:`take_slots` with it to any slot-shaped state, e.g. Adam moments). Equal, bit for bit, to
    ``block_sparse_from_dense(block_sparse_to_dense(w), block_mask, ...)``.
    """
    kb, nb = w.grid_shape
    mask = jnp.asarray(block_mask).astype(bool)
    # The pattern of a (Kb, Nb) matrix in (1, 1) blocks has exactly the indices of w's (bk, bn) pattern.
    grid = block_sparse_from_dense(
        mask.astype(jnp.float32), mask, block=(1, 1), capacity=w.capacity
    )
    new = BlockSparseWeight(
        data=w.data,
        **{f: getattr(grid, f) for f in BLOCK_PATTERN_FIELDS},
        shape=w.shape,
        block=w.block,
    )
    src = slot_sources(w, new)
    data = take_slots(w.data, src)
    data = jnp.where(new.num_dropped > 0, jnp.full_like(data, jnp.nan), data)
    return BlockSparseWeight(
        data=data,
        **{f: getattr(new, f) for f in BLOCK_PATTERN_FIELDS},
        shape=w.shape,
        block=w.block,
    ), src


def live_block_scores(w: BlockSparseWeight, pool: str = "l2") -> Float[Array, "Kb Nb"]:
    """Block norms of the live blocks on the ``(Kb, Nb)`` grid; ``-inf`` for blocks not stored."""
    a = jnp.abs(w.data.astype(jnp.float32))
    s = {
        "l2": lambda: jnp.sqrt(jnp.sum(a * a, axis=(1, 2))),
        "l1": lambda: jnp.sum(a, axis=(1, 2)),
        "max": lambda: jnp.max(a, axis=(1, 2)),
    }[pool]()
    kb, nb = w.grid_shape
    rows = jnp.where(live_mask(w), w.row_idx, kb)
    grid = jnp.full((kb, nb), -jnp.inf, jnp.float32).at[rows, w.col_idx].set(s, mode="drop")
    return grid
