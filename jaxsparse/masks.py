"""Mask constructors and mask application: exact top-k with a traced k, random, N:M and block masks.

Every function here is pure and works under ``jit``, ``vmap`` and ``grad``. Masks are ``bool`` arrays shaped like
the array they select from; a dense (unpruned) leaf of a params pytree carries ``None`` in the masks pytree.

Top-k never sorts. Scores are mapped to ``uint32`` keys whose order is the float order, and the k-th largest key
is found by building it bit by bit (32 counting passes). Ties at the threshold are broken by position (first leaf,
then lowest flat index first) with a second bisection over index bits, so counts are exact and deterministic.
Leaves of equal shape are stacked and searched together (one bisection and one tie pass for a whole pytree), so
the compiled selection does not grow with the number of leaves. Every pass is an elementwise compare plus a
count, which is why the same code works on sharded arrays without gathering them: each pass is a local count and
a scalar all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from jaxsparse import _topk
from jaxsparse import _validation as v
from jaxsparse._tree import check_same_structure, map_masked
from pallas_kernels.nm.masks import nm_mask  # the one N:M mask implementation, re-exported

__all__ = [
    "topk_mask",
    "topk_masks",
    "global_topk_masks",
    "random_mask",
    "random_scores",
    "nm_mask",
    "block_mask",
    "block_scores",
    "apply_masks",
]

_BLOCK_POOLS = ("l1", "l2", "max")


# ------------------------------------------------------------------------------------------------ public: top-k
def topk_mask(score: Float[ArrayLike, ...], k: Int[ArrayLike, ""]) -> Bool[Array, ...]:
    """Mask of the ``k`` largest entries of ``score``; exactly ``min(max(k, 0), score.size)`` are True.

    ``k`` may be a traced integer. Ties are broken by flat index (lower first); NaN ranks below every number.

    Args:
      score: a float array of any shape; larger is kept.
      k: how many entries to keep, an int scalar (clipped to ``[0, score.size]``).

    Returns:
      A ``bool`` array shaped like ``score``.

    Raises:
      TypeError: ``score`` is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> topk_mask(jnp.array([3.0, 1.0, 2.0, 2.0]), 2).tolist()
      [True, False, True, False]
    """
    score = jnp.asarray(score)
    v.check_float_array("score", score)
    return _topk.select_top([score], jnp.asarray(k, jnp.int32)[None], shared=False)[0]


def topk_masks(scores: Any, ks: Any, layer_axes: Any = None) -> Any:
    """Per-leaf :func:`topk_mask` over a pytree; ``ks`` has the same structure with an integer per leaf.

    Leaves of ``scores`` that are ``None`` stay ``None``. Leaves of equal shape are stacked and searched together:
    one 32-pass loop for the whole pytree, one compare-and-count per distinct shape in each pass.

    ``layer_axes`` (optional; same structure, an int or ``None`` per leaf) marks stacked (scanned) leaves: a leaf
    of shape ``(layers, d_in, d_out)`` with layer axis 0 gets ``k`` entries *per layer slice* (``k`` may then also
    be a length-``layers`` vector), i.e. it behaves as ``layers`` separate leaves.

    Args:
      scores: a pytree of float arrays, ``None`` leaves allowed.
      ks: a pytree like ``scores`` with the count to keep per leaf (``None`` where ``scores`` is ``None``).
      layer_axes: ``None``, one int for every leaf, or a pytree like ``scores`` of ints / ``None``.

    Returns:
      A pytree like ``scores`` of ``bool`` masks (``None`` leaves kept).

    Raises:
      ValueError: ``ks`` or ``layer_axes`` not shaped like ``scores``, or a bad layer axis.
      TypeError: a score leaf is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> m = topk_masks({"a": jnp.arange(4.0), "b": None}, {"a": 1, "b": None})
      >>> m["a"].tolist(), m["b"]
      ([False, False, False, True], None)
      >>> topk_masks({"w": jnp.array([[1.0, 2.0], [4.0, 3.0]])}, {"w": 1}, {"w": 0})["w"].tolist()
      [[False, True], [True, False]]
    """
    check_same_structure("scores", scores, "ks", ks)
    leaves, treedef = jax.tree.flatten(scores, is_leaf=lambda x: x is None)
    k_leaves = jax.tree.flatten(ks, is_leaf=lambda x: x is None)[0]
    live = [i for i, s in enumerate(leaves) if s is not None]
    if not live:
        return scores
    arrays = [jnp.asarray(leaves[i]) for i in live]
    for i, a in zip(live, arrays):
        v.check_float_array(f"scores leaf {i}", a)
    axes = _layer_axes_list("layer_axes", layer_axes, scores, live, arrays)
    kk = _topk.unit_ks([a.shape for a in arrays], axes, [k_leaves[i] for i in live])
    picked = _topk.select_top(arrays, kk, shared=False, axes=axes)
    out = list(leaves)
    for i, m in zip(live, picked):
        out[i] = m
    return jax.tree.unflatten(treedef, out)


def _layer_axes_list(
    name: str, layer_axes: Any, tree: Any, live: list[int], arrays: list[Array]
) -> tuple[int | None, ...] | None:
    """``layer_axes`` (None, an int for every leaf, or a pytree like ``tree``) as a checked tuple over ``live``."""
    if layer_axes is None:
        return None
    if isinstance(layer_axes, int) and not isinstance(layer_axes, bool):
        flat = [layer_axes] * len(jax.tree.leaves(tree, is_leaf=lambda x: x is None))
    else:
        check_same_structure("scores", tree, name, layer_axes)
        flat = jax.tree.flatten(layer_axes, is_leaf=lambda x: x is None)[0]
    out = []
    for i, a in zip(live, arrays):
        ax = flat[i]
        if ax is not None:
            ax = v.check_axis(f"{name} leaf {i}", ax, a.ndim)
            if a.ndim < 2:
                raise ValueError(
                    f"`{name}` leaf {i} marks a layer axis on a {a.ndim}-D leaf of shape {a.shape}; "
                    "a stacked leaf needs at least 2 dims (layers plus the layer's own)."
                )
        out.append(ax)
    return tuple(out) if any(a is not None for a in out) else None


def global_topk_masks(scores: Any, k: Int[ArrayLike, ""]) -> Any:
    """Masks of the ``k`` largest entries over all (non-``None``) leaves of ``scores`` together.

    One threshold for the whole pytree, found by one bisection over all leaves (no sort, no gather: equally
    shaped leaves are stacked, and each pass is a compare-and-count per shape); ties go to earlier leaves (in
    ``jax.tree`` order) and lower flat indices first, in one tie-breaking pass for all leaves. ``k`` may be
    traced.

    Args:
      scores: a pytree of float arrays, ``None`` leaves allowed (at least one array).
      k: how many entries to keep in all, an int scalar (clipped to ``[0, total size]``).

    Returns:
      A pytree like ``scores`` of ``bool`` masks (``None`` leaves kept).

    Raises:
      ValueError: ``scores`` has no array leaf.
      TypeError: a score leaf is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> m = global_topk_masks({"a": jnp.array([5.0, 1.0]), "b": jnp.array([4.0, 3.0])}, 3)
      >>> m["a"].tolist(), m["b"].tolist()
      ([True, False], [True, True])
    """
    leaves, treedef = jax.tree.flatten(scores, is_leaf=lambda x: x is None)
    live = [i for i, s in enumerate(leaves) if s is not None]
    if not live:
        raise ValueError("global_topk_masks: `scores` has no array leaves; expected at least one.")
    for i in live:
        v.check_float_array(f"scores leaf {i}", jnp.asarray(leaves[i]))
    picked = _topk.select_top(
        [jnp.asarray(leaves[i]) for i in live], jnp.asarray(k, jnp.int32), shared=True
    )
    out = list(leaves)
    for i, m in zip(live, picked):
        out[i] = m
    return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------------------------------------ public: random
def random_scores(key: PRNGKeyArray, tree: Any) -> Any:
    """Uniform ``[0, 1)`` scores shaped like every array leaf of ``tree``, deterministic given ``key``; ``None`` stays.

    Scores are a counter-based integer hash (the murmur3 finaliser) of each entry's flat index and a per-leaf seed
    drawn from ``key``: a few integer ops per entry. Threefry bits for every weight would cost more than the rest
    of a training step on CPU, even inside a ``lax.cond`` branch that is not taken.

    Args:
      key: a PRNG key.
      tree: a pytree whose array leaves give the shapes (values unused); ``None`` leaves allowed.

    Returns:
      A pytree like ``tree`` of float32 scores in ``[0, 1)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = random_scores(jax.random.PRNGKey(0), {"w": jnp.ones((2, 3), bool), "b": None})
      >>> s["w"].shape, bool(((s["w"] >= 0) & (s["w"] < 1)).all()), s["b"]
      ((2, 3), True, None)
    """
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is None)
    seeds = jax.random.bits(key, (len(leaves),), jnp.uint32)
    out = [
        None if m is None else _topk.hash_uniform(m.shape, seeds[i]) for i, m in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, out)


def random_mask(key: PRNGKeyArray, shape: Sequence[int], k: Int[ArrayLike, ""]) -> Bool[Array, ...]:
    """A uniformly random mask of ``shape`` with exactly ``k`` True entries (``k`` may be traced).

    Args:
      key: a PRNG key.
      shape: the mask's shape.
      k: how many entries are True, an int scalar (clipped to ``[0, prod(shape)]``).

    Returns:
      A ``bool`` array of ``shape``.

    Example:
      >>> import jax
      >>> int(random_mask(jax.random.PRNGKey(0), (4, 5), 7).sum())
      7
    """
    shape = tuple(int(d) for d in shape)
    return topk_mask(_topk.hash_uniform(shape, jax.random.bits(key, (), jnp.uint32)), k)


# ------------------------------------------------------------------------------------------------ public: blocks
def block_scores(
    score: Float[ArrayLike, ...], block_shape: tuple[int, int], pool: str = "l2"
) -> Float[Array, "rb cb"]:
    """Pools ``|score|`` over ``block_shape`` tiles of the leaf viewed as a matrix ``(prod(shape[:-1]), shape[-1])``.

    ``pool`` is ``"l1"`` (sum), ``"l2"`` (root of sum of squares) or ``"max"``.

    Args:
      score: a float array with ndim >= 2 (a weight or a score).
      block_shape: ``(rows, cols)`` of a tile, each >= 1, dividing the matrix view.
      pool: ``"l1"``, ``"l2"`` or ``"max"``.

    Returns:
      The float32 ``(rows // block_rows, cols // block_cols)`` block scores.

    Raises:
      ValueError: ``score.ndim < 2``, a ``block_shape`` that is not two positive ints dividing the matrix view, or
        an unknown ``pool``.
      TypeError: ``score`` is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> block_scores(jnp.ones((4, 4)), (2, 2), "l1").tolist()
      [[4.0, 4.0], [4.0, 4.0]]
    """
    score = jnp.asarray(score)
    v.check_float_array("score", score)
    rows, cols = _block_grid("score", score.shape, block_shape)
    v.check_choice("pool", pool, _BLOCK_POOLS)
    bh, bw = block_shape
    a = jnp.abs(score.reshape(rows, bh, cols, bw).astype(jnp.float32))
    if pool == "l1":
        return a.sum(axis=(1, 3))
    if pool == "l2":
        return jnp.sqrt(jnp.square(a).sum(axis=(1, 3)))
    return a.max(axis=(1, 3))


def block_mask(
    score: Float[ArrayLike, ...],
    block_shape: tuple[int, int],
    k: Int[ArrayLike, ""],
    pool: str = "l2",
) -> Bool[Array, ...]:
    """Keeps the ``k`` highest-scoring ``block_shape`` tiles (pooled by ``pool``); ``k`` counts blocks.

    Args:
      score: a float array with ndim >= 2, viewed as ``(prod(shape[:-1]), shape[-1])``.
      block_shape: ``(rows, cols)`` of a tile, dividing the matrix view.
      k: how many blocks to keep, an int scalar (may be traced; clipped to the block count).
      pool: ``"l1"``, ``"l2"`` or ``"max"`` (:func:`block_scores`).

    Returns:
      A ``bool`` array shaped like ``score``, True on the kept tiles.

    Raises:
      ValueError: as :func:`block_scores`.
      TypeError: ``score`` is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.1]])
      >>> block_mask(w, (2, 2), 1).astype(int).tolist()
      [[1, 1, 0, 0], [1, 1, 0, 0]]
    """
    score = jnp.asarray(score)
    blocks = topk_mask(block_scores(score, block_shape, pool), k)
    bh, bw = block_shape
    full = jnp.repeat(jnp.repeat(blocks, bh, axis=0), bw, axis=1)
    return full.reshape(score.shape)


def _block_grid(name: str, shape: tuple[int, ...], block_shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"`{name}` must have ndim >= 2 for block masks; got shape {shape}.")
    if len(block_shape) != 2 or any(int(b) < 1 for b in block_shape):
        raise ValueError(f"`block_shape` must be two positive ints; got {block_shape!r}.")
    rows, cols = math.prod(shape[:-1]), shape[-1]
    bh, bw = block_shape
    if bh > rows or bw > cols:
        raise ValueError(
            f"`block_shape` {tuple(block_shape)} is larger than `{name}` viewed as a ({rows}, {cols}) matrix."
        )
    if rows % bh or cols % bw:
        raise ValueError(
            f"`block_shape` {tuple(block_shape)} must divide `{name}` viewed as a ({rows}, {cols}) matrix."
        )
    return rows // bh, cols // bw


# ------------------------------------------------------------------------------------------------ apply
def apply_masks(params: Any, masks: Any) -> Any:
    """Zeroes ``params`` outside ``masks``; leaves whose mask is ``None`` pass through unchanged.

    Args:
      params: a pytree of arrays.
      masks: a pytree like ``params`` of boolean masks (True = kept) or ``None``.

    Returns:
      ``params`` with every entry outside its mask set to 0 (dtype kept).

    Example:
      >>> import jax.numpy as jnp
      >>> p = apply_masks({"w": jnp.array([1.0, 2.0]), "b": jnp.ones(1)}, {"w": jnp.array([True, False]), "b": None})
      >>> p["w"].tolist(), p["b"].tolist()
      ([1.0, 0.0], [1.0])
    """
    return map_masked(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, masks)
