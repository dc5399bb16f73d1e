"""Framework-neutral pieces shared by the NNX and Linen layers: pattern objects, init, forward, re-pack.

Storage layout (identical in NNX and Linen, so every tree function in :mod:`jaxsparse.flax.train` and
:mod:`jaxsparse.flax.convert` serves both). A layer at path ``L`` holds

* one trainable array: ``L/kernel_blocks [capacity, bk, bn]`` (block-sparse, the
  :class:`~pallas_kernels.block_sparse.BlockSparseWeight`'s ``data``) or ``L/kernel_values [n, K // m, N]``
  (N:M, the :class:`~pallas_kernels.nm.NMWeight`'s ``values``), plus ``L/bias``;
* one non-trainable pattern object ``L/pattern``: a :class:`BlockSparsePattern` (the weight's index arrays;
  ``shape`` and ``block`` static) or an :class:`NMPattern` (the packed positions ``meta``; ``n``, ``m``,
  ``pack_tile`` and ``shape`` static). Static fields are pytree metadata: they never become arrays, so every
  layer method and tree function runs under ``jax.jit`` and a changed config is a different trace.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as _dtypes
from flax.typing import Dtype, PrecisionLike
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from jaxsparse._tree import path_names  # the one path-naming rule
from jaxsparse.masks import block_scores, topk_mask
from pallas_kernels.block_sparse import (
    BlockSparseWeight,
    block_sparse_from_dense,
    bsr_matmul,
)
from pallas_kernels.block_sparse.format import BlockSparseIndex, live_mask
from pallas_kernels.nm import NMWeight, index_bits, nm_matmul, pack_nm

__all__ = ["BlockSparsePattern", "NMPattern"]

BLOCK_PARAM = "kernel_blocks"  # the trainable leaf of a block-sparse layer
NM_PARAM = "kernel_values"  # the trainable leaf of an N:M layer
PATTERN = "pattern"  # the name of a layer's pattern object (NNX attribute, Linen variable)
PATTERN_COLLECTION = "sparse_pattern"  # Linen collection of the pattern objects


# ------------------------------------------------------------------------------------------- patterns
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparsePattern(BlockSparseIndex):
    """Where the blocks of a :class:`~pallas_kernels.block_sparse.BlockSparseWeight` are: all but its ``data``.

    Exactly the weight's :class:`~pallas_kernels.block_sparse.format.BlockSparseIndex` (its fields, in its
    order): the index arrays are pytree leaves (re-packed on device when the mask changes); ``shape`` and
    ``block`` are static metadata. ``pattern.weight(data)`` and ``BlockSparsePattern.of(w)`` convert.

    Attributes:
      row_idx, col_idx, t_row_idx, t_col_idx, t_perm, col_ptr, row_ptr, nnz, num_dropped: as in
        :class:`~pallas_kernels.block_sparse.BlockSparseWeight`.
      shape: static ``(K, N)``.
      block: static ``(bk, bn)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels.block_sparse import block_sparse_from_dense, block_sparse_to_dense
      >>> w = block_sparse_from_dense(jnp.ones((4, 4)), jnp.eye(2, dtype=bool), block=(2, 2), capacity=3)
      >>> p = BlockSparsePattern.of(w)
      >>> p.capacity, p.block, int(p.nnz), len(jax.tree.leaves(p))
      (3, (2, 2), 2, 9)
      >>> bool((block_sparse_to_dense(p.weight(w.data)) == block_sparse_to_dense(w)).all())
      True
    """

    @classmethod
    def of(cls, w: BlockSparseWeight) -> BlockSparsePattern:
        """The pattern of ``w`` (its index arrays, shape and block)."""
        return cls(**{f.name: getattr(w, f.name) for f in dataclasses.fields(cls)})

    def weight(self, data: Float[Array, "cap bk bn"]) -> BlockSparseWeight:
        """The :class:`~pallas_kernels.block_sparse.BlockSparseWeight` storing ``data`` at this pattern."""
        want = (self.capacity, *self.block)
        if tuple(data.shape) != want:
            raise ValueError(
                f"'{BLOCK_PARAM}' must have shape (capacity, bk, bn) = {want} to match its pattern; "
                f"got {tuple(data.shape)}."
            )
        return BlockSparseWeight(
            data=data, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMPattern:
    """Where the kept values of an :class:`~pallas_kernels.nm.NMWeight` are: all but its ``values``.

    Attributes:
      meta: ``[n, W, N]`` int32 bit-packed positions (the only array leaf).
      n, m, pack_tile: static N:M config (see :func:`pallas_kernels.nm.pack_nm`).
      shape: static ``(K, N)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels.nm import pack_nm
      >>> w = pack_nm(jnp.arange(32.0).reshape(8, 4), n=2, m=4)
      >>> p = NMPattern.of(w)
      >>> (p.n, p.m, p.shape), len(jax.tree.leaves(p)), p.weight(w.values).meta is w.meta
      ((2, 4, (8, 4)), 1, True)
    """

    meta: Int[Array, "n W N"]
    n: int = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))
    pack_tile: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def of(cls, w: NMWeight) -> NMPattern:
        """The pattern of ``w`` (its packed positions and static config)."""
        return cls(meta=w.meta, n=w.n, m=w.m, pack_tile=w.pack_tile, shape=w.shape)

    def weight(self, values: Float[Array, "n G N"]) -> NMWeight:
        """The :class:`~pallas_kernels.nm.NMWeight` holding ``values`` at this pattern."""
        want = (self.n, self.shape[0] // self.m, self.shape[1])
        if tuple(values.shape) != want:
            raise ValueError(
                f"'{NM_PARAM}' must have shape (n, K // m, N) = {want} to match its pattern; got "
                f"{tuple(values.shape)}."
            )
        return NMWeight(
            values=values,
            meta=self.meta,
            n=self.n,
            m=self.m,
            shape=self.shape,
            pack_tile=self.pack_tile,
        )


Pattern = BlockSparsePattern | NMPattern


def is_pattern(x: object) -> bool:
    """Whether ``x`` is a layer's pattern object (stop flattening there)."""
    return isinstance(x, (BlockSparsePattern, NMPattern))


def patterns_of(tree: PyTree) -> dict[str, Pattern]:
    """``{layer path: pattern object}`` of every layer in ``tree`` (the path of its pattern minus ``pattern``)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_pattern)[0]
    return {"/".join(path_names(p)[:-1]): leaf for p, leaf in flat if is_pattern(leaf)}


def leaves_named(tree: PyTree, name: str) -> dict[str, Array]:
    """``{layer path: leaf}`` of the leaves of ``tree`` whose last path name is ``name``."""
    out = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_pattern)[0]:
        names = path_names(p)
        if names and names[-1] == name and not is_pattern(leaf):
            out["/".join(names[:-1])] = leaf
    return out


def replace_patterns(tree: PyTree, new: Mapping[str, Pattern]) -> PyTree:
    """``tree`` with the pattern objects of the layers named in ``new`` replaced (same structure)."""

    def put(p, leaf):
        layer = "/".join(path_names(p)[:-1])
        return new[layer] if is_pattern(leaf) and layer in new else leaf

    return jax.tree_util.tree_map_with_path(put, tree, is_leaf=is_pattern)


def upgrade_patterns(params: Mapping, pattern: Mapping) -> dict:
    """A pattern tree in the per-field layout of jaxsparse 0.1, as pattern objects (reads old checkpoints).

    jaxsparse 0.1 stored a layer's indices as separate leaves (``row_idx``, ..., ``num_dropped``; N:M:
    ``meta`` and an int32 ``nm_config = [n, m, pack_tile]``). This replaces each such group by one
    ``pattern`` object at the same layer path; other entries are kept. Eager (reads ``nm_config``).

    Args:
      params: nested dicts holding each layer's ``kernel_blocks`` / ``kernel_values`` (their shapes give
        the block shape and K); may be the same tree as ``pattern`` (a whole NNX model state as pure dicts).
      pattern: the old pattern tree as nested dicts (e.g. an orbax checkpoint restored without a target,
        or ``nnx.to_pure_dict`` of an old state).

    Returns:
      ``pattern`` with the per-field leaves of every layer replaced by one ``pattern`` entry holding a
      :class:`BlockSparsePattern` or :class:`NMPattern`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsparse.flax.linen import NMDense
      >>> v = NMDense(4).init(jax.random.key(0), jnp.ones((1, 16)))
      >>> p = v["sparse_pattern"]["pattern"]
      >>> old = {"meta": p.meta, "nm_config": jnp.array([p.n, p.m, p.pack_tile], jnp.int32)}
      >>> q = upgrade_patterns(v["params"], old)["pattern"]
      >>> (q.n, q.m, q.pack_tile, q.shape) == (p.n, p.m, p.pack_tile, p.shape), bool((q.meta == p.meta).all())
      (True, True)
    """
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_pattern)[0]
    # An old NNX state restored without a target keeps each Variable's value as a {"value": array} level.
    values = {"/".join(path_names(p)).removesuffix("/value"): leaf for p, leaf in flat}

    def bare(v):
        return v["value"] if isinstance(v, Mapping) and set(v) == {"value"} else v

    block_fields = [
        f.name for f in dataclasses.fields(BlockSparsePattern) if not f.metadata.get("static")
    ]

    def upgrade(node: Mapping, layer: tuple[str, ...]) -> dict:
        out = {
            k: upgrade(v, (*layer, str(k))) if isinstance(bare(v), Mapping) else bare(v)
            for k, v in node.items()
        }
        prefix = "/".join(layer) + "/" if layer else ""
        if all(f in out for f in block_fields):
            data = values.get(prefix + BLOCK_PARAM)
            if data is None:
                raise ValueError(f"upgrade_patterns: params has no '{prefix}{BLOCK_PARAM}'.")
            _, bk, bn = np.shape(data)
            shape = (
                (np.shape(out["row_ptr"])[0] - 1) * bk,
                (np.shape(out["col_ptr"])[0] - 1) * bn,
            )
            fields = {f: jnp.asarray(out.pop(f)) for f in block_fields}
            out[PATTERN] = BlockSparsePattern(**fields, shape=shape, block=(bk, bn))
        elif "meta" in out and "nm_config" in out:
            vals = values.get(prefix + NM_PARAM)
            if vals is None:
                raise ValueError(f"upgrade_patterns: params has no '{prefix}{NM_PARAM}'.")
            n, m, tile = (int(v) for v in np.asarray(out.pop("nm_config")))
            _, groups, cols = np.shape(vals)
            meta = jnp.asarray(out.pop("meta"))
            out[PATTERN] = NMPattern(meta=meta, n=n, m=m, pack_tile=tile, shape=(groups * m, cols))
        return out

    return upgrade(pattern, ())


# ------------------------------------------------------------------------------------------- validation
def check_block(
    block: tuple[int, int], in_features: int, out_features: int, where: str
) -> tuple[int, int]:
    """``block`` as a pair of Python ints dividing ``(in_features, out_features)``; raises otherwise."""
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
    capacity: int | None,
    density: float | None,
    block_mask: Bool[ArrayLike, "Kb Nb"] | None,
    grid: tuple[int, int],
    where: str,
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


def check_block_mask(
    block_mask: Bool[ArrayLike, "Kb Nb"], grid: tuple[int, int], capacity: int, where: str
) -> Bool[Array, "Kb Nb"]:
    """``block_mask`` as a ``(Kb, Nb)`` bool array with at most ``capacity`` blocks (when concrete)."""
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


def check_pattern(
    pattern: object, kind: type, want: Mapping[str, object], where: str
) -> BlockSparsePattern | NMPattern:
    """``pattern`` if it is a ``kind`` whose static fields equal ``want``; a ``ValueError`` naming them else."""
    if not isinstance(pattern, kind):
        raise ValueError(
            f"{where}: the layer's '{PATTERN}' must be a {kind.__name__}; got {type(pattern).__name__}. "
            f"Pass the variables the layer was initialized with (or convert.compress output)."
        )
    for key, value in want.items():
        if getattr(pattern, key) != value:
            raise ValueError(
                f"{where}: its {kind.__name__} has {key}={getattr(pattern, key)!r}, the layer has "
                f"{key}={value!r}."
            )
    return pattern


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
    kernel: Float[Array, "K N"],
    n: int,
    m: int,
    mask: Bool[ArrayLike, "K N"] | None,
    pack_tile: int | None,
) -> NMWeight:
    """Packs an initial dense kernel N:M: ``mask`` if given, else the N:M magnitude mask of ``kernel``."""
    return pack_nm(
        kernel, None if mask is None else jnp.asarray(mask), n=n, m=m, pack_tile=pack_tile
    )


# ------------------------------------------------------------------------------------------- forward
def _precision_name(precision: PrecisionLike) -> str | None:
    if precision is None:
        return None
    if isinstance(precision, (tuple, list)):
        precision = precision[0]
    if isinstance(precision, str):
        return precision
    return lax.Precision(precision).name.lower()


def sparse_apply(
    x: Float[Array, "... K"],
    values: Array,
    pattern: BlockSparsePattern | NMPattern,
    bias: Float[Array, " N"] | None,
    *,
    dtype: Dtype | None,
    precision: PrecisionLike,
    impl: str,
    interpret: str | None,
) -> Float[Array, "... N"]:
    """``x @ W + b`` on ``bsr_matmul`` / ``nm_matmul`` (by the pattern's format) with Flax's dtype promotion.

    ``precision`` sets ``jax.default_matmul_precision`` while the product is traced, which the XLA paths
    (dense fallback, XLA reference) honour; the Pallas kernels accumulate in float32 regardless.
    """
    x, values, bias = _dtypes.promote_dtype(x, values, bias, dtype=dtype)
    w = pattern.weight(values)
    op = bsr_matmul if isinstance(pattern, BlockSparsePattern) else nm_matmul
    name = _precision_name(precision)
    if name is None:
        y = op(x, w, impl=impl, interpret=interpret)
    else:
        with jax.default_matmul_precision(name):
            y = op(x, w, impl=impl, interpret=interpret)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y


# ------------------------------------------------------------------------------------------- re-pack
def slot_sources(old: BlockSparseWeight, new: BlockSparseWeight) -> Int[Array, " cap"]:
    """For each storage slot of ``new``: the slot of ``old`` holding the same block, or -1.

    Args:
      old, new: two weights of the same shape, block and capacity.

    Returns:
      ``[capacity]`` int32: ``-1`` for a new block or a padding slot.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.block_sparse import block_sparse_from_dense
      >>> pack = lambda m: block_sparse_from_dense(jnp.ones((4, 4)), jnp.array(m), block=(2, 2), capacity=2)
      >>> slot_sources(pack([[1, 0], [0, 1]]), pack([[0, 1], [0, 1]])).tolist()
      [-1, 1]
    """
    kb, nb = old.grid_shape
    rows = jnp.where(live_mask(old), old.row_idx, kb)  # padding scatters out of bounds, dropped
    grid = (
        jnp.full((kb, nb), -1, jnp.int32)
        .at[rows, old.col_idx]
        .set(jnp.arange(old.capacity, dtype=jnp.int32), mode="drop")
    )
    return jnp.where(live_mask(new), grid[new.row_idx, new.col_idx], -1)


def take_slots(leaf: Array, src: Int[Array, " cap"]) -> Array:
    """``leaf[src]`` along the slot axis, zero where ``src == -1`` (moves optimizer moments with their blocks).

    Args:
      leaf: any array whose leading axis is the slot axis (``kernel_blocks`` or a moment of it).
      src: ``[capacity]`` slot sources from :func:`slot_sources` / :func:`repack`.

    Returns:
      ``leaf`` permuted along axis 0, zeros at ``src == -1``.

    Example:
      >>> import jax.numpy as jnp
      >>> take_slots(jnp.array([1.0, 2.0, 3.0]), jnp.array([2, -1, 0])).tolist()
      [3.0, 0.0, 1.0]
    """
    keep = (src >= 0).reshape((-1,) + (1,) * (leaf.ndim - 1))
    return jnp.where(keep, leaf[jnp.maximum(src, 0)], jnp.zeros((), leaf.dtype))


def repack(
    w: BlockSparseWeight, block_mask: Bool[Array, "Kb Nb"]
) -> tuple[BlockSparseWeight, Int[Array, " cap"]]:
    """``w`` re-packed to ``block_mask`` at the same capacity; jittable, no dense ``[K, N]`` intermediate.

    Kept blocks keep their values, new blocks start at zero. Equal, bit for bit, to
    ``block_sparse_from_dense(block_sparse_to_dense(w), block_mask, ...)``.

    Args:
      w: the weight to re-pack.
      block_mask: ``(Kb, Nb)`` bool, at most ``w.capacity`` blocks (traced: excess blocks NaN-poison the
        data, see :func:`~pallas_kernels.block_sparse.block_sparse_from_dense`).

    Returns:
      ``(new weight, slot sources)``: apply :func:`take_slots` with the sources to any slot-shaped state
      (e.g. Adam moments).

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.block_sparse import block_sparse_from_dense, block_mask_of
      >>> w = block_sparse_from_dense(jnp.ones((4, 4)), jnp.eye(2, dtype=bool), block=(2, 2), capacity=2)
      >>> new, src = repack(w, jnp.array([[True, True], [False, False]]))
      >>> block_mask_of(new).tolist(), src.tolist()
      ([[True, True], [False, False]], [0, -1])
    """
    mask = jnp.asarray(block_mask).astype(bool)
    # The pattern of a (Kb, Nb) matrix in (1, 1) blocks has exactly the indices of w's (bk, bn) pattern.
    grid = block_sparse_from_dense(
        mask.astype(jnp.float32), mask, block=(1, 1), capacity=w.capacity
    )
    pattern = dataclasses.replace(BlockSparsePattern.of(grid), shape=w.shape, block=w.block)
    new = pattern.weight(w.data)
    src = slot_sources(w, new)
    data = take_slots(w.data, src)
    data = jnp.where(new.num_dropped > 0, jnp.full_like(data, jnp.nan), data)
    return pattern.weight(data), src


def live_block_scores(w: BlockSparseWeight, pool: str = "l2") -> Float[Array, "Kb Nb"]:
    """Block norms of the live blocks on the ``(Kb, Nb)`` grid; ``-inf`` for blocks not stored.

    Args:
      w: a block-sparse weight.
      pool: ``"l2"``, ``"l1"`` or ``"max"`` of the block's absolute values.

    Returns:
      ``(Kb, Nb)`` float32 scores.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.block_sparse import block_sparse_from_dense
      >>> w = block_sparse_from_dense(jnp.ones((4, 4)), jnp.eye(2, dtype=bool), block=(2, 2), capacity=2)
      >>> live_block_scores(w, "l1").tolist()
      [[4.0, -inf], [-inf, 4.0]]
    """
    if pool not in ("l2", "l1", "max"):
        raise ValueError(f"pool must be 'l2', 'l1' or 'max'; got {pool!r}.")
    a = jnp.abs(w.data.astype(jnp.float32))
    if pool == "l2":
        s = jnp.sqrt(jnp.sum(a * a, axis=(1, 2)))
    elif pool == "l1":
        s = jnp.sum(a, axis=(1, 2))
    else:
        s = jnp.max(a, axis=(1, 2))
    kb, nb = w.grid_shape
    rows = jnp.where(live_mask(w), w.row_idx, kb)
    return jnp.full((kb, nb), -jnp.inf, jnp.float32).at[rows, w.col_idx].set(s, mode="drop")


# ------------------------------------------------------------------------------------------- layout
def layer_layouts(tree: PyTree) -> dict[str, dict]:
    """The format of every compressed layer in ``tree``, found by its pattern object (not by leaf names).

    A layer's values sit at its pattern's layer path (an NNX model state) or at the same path below another
    top-level key (Linen ``{"params", "sparse_pattern"}``, a training state ``{"params", "pattern", ...}``;
    ``params`` is looked at first). The static config comes from the pattern, so an abstract tree
    (``jax.eval_shape``) is described completely.

    Args:
      tree: any pytree holding layers' pattern objects (leaves may be ``jax.ShapeDtypeStruct``).

    Returns:
      ``{layer path: {"format": "block_sparse" | "nm", "shape", ..., "arrays": {field: leaf path}}}``
      with ``block`` and ``capacity`` (block-sparse) or ``n``, ``m``, ``pack_tile``, ``bits``, ``groups``,
      ``out_features`` (N:M), and ``dtype`` where the values leaf was found.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsparse.flax.linen import NMDense
      >>> v = jax.eval_shape(NMDense(4).init, jax.random.key(0), jnp.ones((1, 16)))
      >>> d = layer_layouts(v)[""]
      >>> d["format"], d["m"], d["dtype"], d["arrays"]["meta"]
      ('nm', 4, 'float32', 'sparse_pattern/pattern/meta')
    """
    leaves = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_pattern)[0]:
        leaves["/".join(path_names(p))] = leaf
    tops = sorted({k.split("/")[0] for k in leaves}, key=lambda t: (t != "params", t))
    layers = {}
    for name, pattern in leaves.items():
        if not is_pattern(pattern):
            continue
        parts = name.split("/")[:-1]
        block = isinstance(pattern, BlockSparsePattern)
        param = BLOCK_PARAM if block else NM_PARAM
        found = [("/".join(parts), "/".join(parts + [param]))]
        found += [("/".join(parts[1:]), "/".join([t, *parts[1:], param])) for t in tops if parts]
        layer, values = next(((k, v) for k, v in found if v in leaves), (found[0][0], None))
        arrays = {} if values is None else {param: values}
        arrays.update(
            {
                f.name: f"{name}/{f.name}"
                for f in dataclasses.fields(pattern)
                if not f.metadata.get("static")
            }
        )
        if block:
            desc = {
                "format": "block_sparse",
                "shape": list(pattern.shape),
                "block": list(pattern.block),
                "capacity": pattern.capacity,
            }
        else:
            desc = {
                "format": "nm",
                "n": pattern.n,
                "m": pattern.m,
                "pack_tile": pattern.pack_tile,
                "bits": index_bits(pattern.m),
                "groups": pattern.shape[0] // pattern.m,
                "out_features": pattern.shape[1],
                "shape": list(pattern.shape),
            }
        if values is not None:
            desc["dtype"] = str(jnp.dtype(leaves[values].dtype))
        layers[layer] = {**desc, "arrays": arrays}
    return layers
