"""One-shot N:M pruning of a trained model and conversion of its weights to the N:M kernel format and back.

The compressed representation is the kernel's own :class:`pallas_kernels.nm.NMWeight` (kept values + bit-packed
positions along the contraction axis), so a compressed ``(in, out)`` kernel goes straight into
``pallas_kernels.nm.nm_matmul``. Leaves that are not a 2-D kernel with groups along axis 0 (conv ``HWIO`` kernels,
other axes) are packed as the 2-D view the kernel expects and wrapped in :class:`NMLeaf`, which remembers the
original shape and axis. ``decompress_nm(compress_nm(p))`` is exactly the masked dense ``p``.

Two faces of the same packing: :func:`compress_nm` puts one kernel object per leaf in place of the leaf (any
layout, jittable), :func:`jaxsparse.flax.compress` with ``format="nm"`` writes the Flax layer layout
(``kernel_values`` + one ``NMPattern`` per layer, for :class:`jaxsparse.flax.nnx.NMLinear` and its Linen twin).
Both pack each leaf with the same function, so for the same kernel and mask ``values``/``meta`` are identical.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from jaxsparse import _validation as v
from jaxsparse._tree import check_mask, check_same_structure, is_none, path_name
from jaxsparse._where import Where, check_nm_leaf, check_where, selection
from jaxsparse.estimators import nm_masks
from jaxsparse.masks import apply_masks, nm_mask
from pallas_kernels.nm.format import NMWeight, pack_nm, unpack_nm

__all__ = ["NMLeaf", "one_shot_nm", "compress_nm", "decompress_nm"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMLeaf:
    """An :class:`NMWeight` of the 2-D view of a leaf that is not itself an ``(in, out)`` kernel.

    ``view`` is ``"rows"`` (``axis == ndim - 2``: the leaf reshaped to ``(prod(shape[:-1]), shape[-1])``, the im2col
    layout of an ``HWIO`` kernel) or ``"moved"`` (``axis`` moved to the front, the rest flattened).
    """

    weight: NMWeight
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))

    def todense(self) -> Array:
        dense = unpack_nm(self.weight)
        if self.axis == len(self.shape) - 2:
            return dense.reshape(self.shape)
        moved = (self.shape[self.axis],) + tuple(
            d for i, d in enumerate(self.shape) if i != self.axis
        )
        return jnp.moveaxis(dense.reshape(moved), 0, self.axis)


def _to_2d(x: Array, ax: int) -> Array:
    if ax == x.ndim - 2:
        return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    return jnp.moveaxis(x, ax, 0).reshape(x.shape[ax], -1)


def _pack_leaf(
    name: str,
    leaf: Any,
    mask: Any,
    n: int,
    m: int,
    axis: int,
    pack_tile: int | None,
) -> NMWeight | NMLeaf:
    """The one N:M packing of a leaf (:func:`compress_nm` and :func:`jaxsparse.flax.compress` both use it).

    Checks the leaf (floating point, ``axis`` divisible by ``m``) and its mask (bool, the leaf's shape; N:M when
    concrete, also when sharded over several processes), every error naming the leaf, then packs the 2-D view
    with :func:`pallas_kernels.nm.pack_nm`. ``mask=None``: the N:M magnitude mask along ``axis``.
    """
    ax = check_nm_leaf(name, leaf, n, m, axis)
    if mask is None:
        mask = nm_mask(jnp.abs(leaf), n, m, ax)
    else:
        check_mask(name, mask, leaf)
    plain = leaf.ndim == 2 and ax == 0
    w2 = _to_2d(leaf, ax)
    try:
        w = pack_nm(w2, _to_2d(jnp.asarray(mask), ax), n=n, m=m, pack_tile=pack_tile)
    except ValueError as e:
        view = "" if plain else f" (packed as its {tuple(w2.shape)} view, axis {ax} along the rows)"
        raise ValueError(f"params leaf '{name}'{view}: {e}") from None
    return w if plain else NMLeaf(w, tuple(leaf.shape), ax)


def _is_compressed(x: Any) -> bool:
    return isinstance(x, (NMWeight, NMLeaf))


def one_shot_nm(
    params: PyTree,
    n: int = 2,
    m: int = 4,
    *,
    axis: int = -2,
    transposable: bool = False,
    where: Where = None,
) -> PyTree:
    """Magnitude N:M pruning of a trained model: every group of ``m`` along ``axis`` keeps its ``n`` largest ``|w|``.

    The same mask :func:`jaxsparse.estimators.ste_nm` applies (so it is also how to freeze an STE-trained model).

    Args:
      params: a pytree of arrays.
      n: weights kept per group (1 <= n <= m).
      m: group size (<= 16); must divide the leaf's ``axis``.
      axis: the axis the groups of ``m`` run along (default -2, the input axis of a Flax kernel).
      transposable: N:M along both of the last two axes (``axis`` must then be the second-to-last).
      where: the leaves to prune: ``None`` (:func:`jaxsparse.prunable`), a pytree of Python bools shaped like
        ``params``, or a callable ``params -> that pytree``; the others pass through.

    Returns:
      ``params`` with the selected leaves masked (pruned entries set to 0), the others unchanged.

    Raises:
      ValueError: bad ``n``/``m``/``axis``, a selected leaf whose ``axis`` is not divisible by ``m``, or ``where``
        not shaped like ``params``.
      TypeError: a selected leaf is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> one_shot_nm({"w": jnp.array([[1.0], [-4.0], [3.0], [2.0]]), "b": jnp.ones(1)})["w"].ravel().tolist()
      [0.0, -4.0, 3.0, 0.0]
    """
    return apply_masks(
        params, nm_masks(params, n, m, axis=axis, transposable=transposable, where=where)
    )


def compress_nm(
    params: PyTree,
    n: int = 2,
    m: int = 4,
    *,
    axis: int = -2,
    masks: PyTree | None = None,
    where: Where = None,
    pack_tile: int | None = None,
) -> PyTree:
    """Replaces each selected leaf by its N:M compressed form (:class:`NMWeight`, or :class:`NMLeaf` for non-``(in, out)``
    layouts); other leaves are unchanged. Works under ``jit``.

    Without ``masks`` the N:M magnitude mask is used (the effective weights of :func:`~jaxsparse.estimators.ste_nm`);
    with ``masks`` (a pytree of bool N:M masks, ``None`` for dense leaves, e.g. transposable ones or masks from
    training) those positions are kept and ``where`` is ignored.

    The kernel objects replace the leaves; :func:`jaxsparse.flax.compress` (``format="nm"``) packs each leaf with
    the same code but writes the Flax layer layout (``kernel_values`` + an ``NMPattern`` per layer) instead:
    ``compress_nm(p, masks=mk)[...]["kernel"].values`` / ``.meta`` equal its ``kernel_values`` / ``pattern.meta``.

    Args:
      params: a pytree of arrays.
      n: weights kept per group (1 <= n <= m).
      m: group size (<= 16); must divide the leaf's ``axis``.
      axis: the axis the groups of ``m`` run along (default -2, the input axis of a Flax kernel).
      masks: optional pytree like ``params`` of bool N:M masks (``None`` = leave the leaf dense).
      where: the leaves to prune: ``None`` (:func:`jaxsparse.prunable`), a pytree of Python bools shaped like
        ``params``, or a callable ``params -> that pytree``; the others pass through.
      pack_tile: groups per metadata packing tile, passed to :func:`pallas_kernels.pack_nm` (default: its
        default).

    Returns:
      A pytree like ``params`` with :class:`NMWeight` (2-D kernels with groups along axis 0) or :class:`NMLeaf`
      (other layouts) in place of each compressed leaf.

    Raises:
      ValueError: bad ``n``/``m``/``axis``/``pack_tile``, a selected leaf whose ``axis`` is not divisible by ``m``,
        a mask not of its leaf's shape or not N:M (checked when concrete, also when sharded over several
        processes), or ``masks``/``where`` not shaped like ``params``. Errors name the leaf.
      TypeError: a selected leaf is not a floating-point array, or its mask is not bool.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"w": jnp.arange(16.0).reshape(8, 2), "b": jnp.ones(2)}
      >>> c = compress_nm(p, 2, 4)
      >>> type(c["w"]).__name__, c["w"].values.shape
      ('NMWeight', (2, 2, 2))
      >>> bool((decompress_nm(c)["w"] == one_shot_nm(p)["w"]).all())
      True
    """
    n, m = v.check_nm(n, m)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if masks is None:
        check_where(where)
        picks = selection(params, where)
        mask_leaves = [None] * len(flat)
    else:
        check_same_structure("masks", masks, "params", params)
        mask_leaves = jax.tree.leaves(masks, is_leaf=is_none)
        picks = [mk is not None for mk in mask_leaves]
    out = [
        _pack_leaf(path_name(path), leaf, mk, n, m, axis, pack_tile) if pick else leaf
        for (path, leaf), pick, mk in zip(flat, picks, mask_leaves)
    ]
    return jax.tree.unflatten(treedef, out)


def decompress_nm(tree: PyTree) -> PyTree:
    """Inverse of :func:`compress_nm`: every :class:`NMWeight` / :class:`NMLeaf` back to its masked dense array.

    Args:
      tree: a pytree from :func:`compress_nm` (other leaves pass through).

    Returns:
      The pytree with every compressed leaf replaced by its dense array (pruned entries 0), in its original shape.

    Example:
      >>> import jax.numpy as jnp
      >>> w = {"conv": jnp.arange(2 * 2 * 4 * 3.0).reshape(2, 2, 4, 3) - 20}
      >>> bool((decompress_nm(compress_nm(w, 1, 4))["conv"] == one_shot_nm(w, 1, 4)["conv"]).all())
      True
    """
    return jax.tree.map(
        lambda x: x.todense() if _is_compressed(x) else x, tree, is_leaf=_is_compressed
    )
