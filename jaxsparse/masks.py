"""Mask constructors and mask application: exact top-k with a traced k, random, N:M and block masks.

Every function here is pure and works under ``jit``, ``vmap`` and ``grad``. Masks are ``bool`` arrays shaped like
the array they select from; a dense (unpruned) leaf of a params pytree carries ``None`` in the masks pytree.

Top-k never sorts. Scores are mapped to ``uint32`` keys whose order is the float order, and the k-th largest key
is found by building it bit by bit (32 counting passes). Ties at the threshold are broken by position (first leaf,
then lowest flat index first) with a second bisection over index bits, so counts are exact and deterministic.
Every pass is an elementwise compare plus a sum, which is why the same code works on sharded arrays without
gathering them: each pass is a local count and a scalar all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from jaxsparse import _validation as v
from jaxsparse._tree import check_same_structure, map_masked

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


# ------------------------------------------------------------------------------------------------ ordered keys
def _ordered_key(score: Array) -> Array:
    """Maps float scores to ``uint32`` keys with the same order; NaN ranks lowest, -0.0 equals +0.0."""
    x = jnp.asarray(score).astype(jnp.float32) + 0.0  # + 0.0 turns -0.0 into +0.0
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))
    return jnp.where(
        jnp.isnan(x), jnp.uint32(0), key
    )  # -inf maps to 0x007FFFFF, so NaN is strictly lowest


def _flat_index(shape: Sequence[int]) -> Array:
    return lax.broadcasted_iota(jnp.int32, (math.prod(shape),), 0).reshape(shape)


def _count(pred: Array) -> Array:
    return jnp.sum(pred, dtype=jnp.int32)


def _kth_largest_keys(keys: list[Array], ks: Array, shared: bool) -> Array:
    """Largest key value t with count(key >= t) >= k, per leaf (``ks`` shape (L,)) or over all leaves."""

    def body(i, t):
        cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        counts = jnp.stack([_count(key >= c) for key, c in zip(keys, _per_leaf(cand, len(keys)))])
        counts = jnp.sum(counts) if shared else counts
        return jnp.where(counts >= ks, cand, t)

    init = jnp.zeros(() if shared else (len(keys),), jnp.uint32)
    return lax.fori_loop(0, 32, body, init)


def _per_leaf(x: Array, n: int) -> list[Array]:
    return [x] * n if x.ndim == 0 else [x[i] for i in range(n)]


def _take_first_ties(ties: list[Array], quotas: list[Array]) -> list[Array]:
    """Keeps the first ``quota`` True entries (by flat index) of each ``ties`` array."""

    def one(tie: Array, quota: Array) -> Array:
        idx = _flat_index(tie.shape)
        bits = max(1, int(tie.size).bit_length())

        def body(i, c):
            cand = c | (jnp.int32(1) << (bits - 1 - i))
            return jnp.where(_count(tie & (idx < cand)) <= quota, cand, c)

        cut = lax.fori_loop(0, bits, body, jnp.int32(0))
        return tie & (idx < cut)

    return [one(t, q) for t, q in zip(ties, quotas)]


def _select_top(scores: list[Array], ks: Array, shared: bool) -> list[Array]:
    keys = [_ordered_key(s) for s in scores]
    sizes = jnp.array([s.size for s in scores], jnp.int32)
    ks = jnp.clip(ks, 0, jnp.sum(sizes) if shared else sizes)
    t = _kth_largest_keys(keys, ks, shared)
    ts = _per_leaf(t, len(keys))
    greater = [key > ti for key, ti in zip(keys, ts)]
    ties = [key == ti for key, ti in zip(keys, ts)]
    n_greater = jnp.stack([_count(g) for g in greater])
    n_ties = jnp.stack([_count(e) for e in ties])
    if shared:  # ties go to the earliest leaves first
        remaining = ks - jnp.sum(n_greater)
        before = jnp.cumsum(n_ties) - n_ties
        quotas = jnp.clip(remaining - before, 0, n_ties)
    else:
        quotas = jnp.clip(ks - n_greater, 0, n_ties)
    partial = jnp.any((quotas > 0) & (quotas < n_ties))
    kept_ties = lax.cond(
        partial,
        lambda: _take_first_ties(ties, _per_leaf(quotas, len(ties))),
        lambda: [e & (q > 0) for e, q in zip(ties, _per_leaf(quotas, len(ties)))],
    )
    return [g | e for g, e in zip(greater, kept_ties)]


# ------------------------------------------------------------------------------------------------ public: top-k
def topk_mask(score: Float[ArrayLike, ...], k: Int[ArrayLike, ""]) -> Bool[Array, ...]:
    """Mask of the ``k`` largest entries of ``score``; exactly ``min(max(k, 0), score.size)`` are True.

    ``k`` may be a traced integer. Ties are broken by flat index (lower first); NaN ranks below every number.

    >>> import jax.numpy as jnp
    >>> topk_mask(jnp.array([3.0, 1.0, 2.0, 2.0]), 2).tolist()
    [True, False, True, False]
    """
    score = jnp.asarray(score)
    v.check_float_array("score", score)
    return _select_top([score], jnp.asarray(k, jnp.int32)[None], shared=False)[0]


def topk_masks(scores: Any, ks: Any) -> Any:
    """Per-leaf :func:`topk_mask` over a pytree; ``ks`` has the same structure with an integer per leaf.

    Leaves of ``scores`` that are ``None`` stay ``None``. All leaves are searched in one 32-pass loop.

    >>> import jax.numpy as jnp
    >>> m = topk_masks({"a": jnp.arange(4.0), "b": None}, {"a": 1, "b": None})
    >>> m["a"].tolist(), m["b"]
    ([False, False, False, True], None)
    """
    check_same_structure("scores", scores, "ks", ks)
    leaves, treedef = jax.tree.flatten(scores, is_leaf=lambda x: x is None)
    k_leaves = jax.tree.flatten(ks, is_leaf=lambda x: x is None)[0]
    live = [i for i, s in enumerate(leaves) if s is not None]
    if not live:
        return scores
    for i in live:
        v.check_float_array(f"scores leaf {i}", jnp.asarray(leaves[i]))
    kk = jnp.stack([jnp.asarray(k_leaves[i], jnp.int32) for i in live])
    picked = _select_top([jnp.asarray(leaves[i]) for i in live], kk, shared=False)
    out = list(leaves)
    for i, m in zip(live, picked):
        out[i] = m
    return jax.tree.unflatten(treedef, out)


def global_topk_masks(scores: Any, k: Int[ArrayLike, ""]) -> Any:
    """Masks of the ``k`` largest entries over all (non-``None``) leaves of ``scores`` together.

    One threshold for the whole pytree, found without concatenating or sorting the leaves; ties go to
    earlier leaves (in ``jax.tree`` order) and lower flat indices first. ``k`` may be traced.

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
    picked = _select_top(
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

    >>> import jax, jax.numpy as jnp
    >>> s = random_scores(jax.random.PRNGKey(0), {"w": jnp.ones((2, 3), bool), "b": None})
    >>> s["w"].shape, bool(((s["w"] >= 0) & (s["w"] < 1)).all()), s["b"]
    ((2, 3), True, None)
    """
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is None)
    seeds = jax.random.bits(key, (len(leaves),), jnp.uint32)
    out = [None if m is None else _hash_uniform(m.shape, seeds[i]) for i, m in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)


def _hash_uniform(shape: tuple[int, ...], seed: Array) -> Array:
    x = (
        lax.broadcasted_iota(jnp.uint32, (math.prod(shape),), 0).reshape(shape)
        * jnp.uint32(0x9E3779B9)
        + seed
    )
    for mul in (0x85EBCA6B, 0xC2B2AE35):
        x = (x ^ (x >> 16)) * jnp.uint32(mul)
    x = x ^ (x >> 16)
    return (x >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def random_mask(key: PRNGKeyArray, shape: Sequence[int], k: Int[ArrayLike, ""]) -> Bool[Array, ...]:
    """A uniformly random mask of ``shape`` with exactly ``k`` True entries (``k`` may be traced).

    >>> import jax
    >>> int(random_mask(jax.random.PRNGKey(0), (4, 5), 7).sum())
    7
    """
    shape = tuple(int(d) for d in shape)
    return topk_mask(_hash_uniform(shape, jax.random.bits(key, (), jnp.uint32)), k)


# ------------------------------------------------------------------------------------------------ public: N:M
def nm_mask(score: Float[ArrayLike, ...], n: int, m: int, axis: int = -2) -> Bool[Array, ...]:
    """N:M mask: in every group of ``m`` consecutive entries along ``axis``, keep the ``n`` largest scores.

    The default axis -2 is the contraction (input) axis of a Flax ``Dense`` kernel ``(in, out)`` and the ``I``
    axis of an ``HWIO`` conv kernel. No sort and no transpose: the groups are split in place and each entry's rank
    in its group is counted with ``m`` shifted comparisons (ties go to the lower index; NaN ranks as -inf), which XLA
    fuses into one elementwise pass, so exactly ``n`` entries per group are kept.

    >>> import jax.numpy as jnp
    >>> nm_mask(jnp.array([[1.0], [4.0], [3.0], [2.0]]), 2, 4).ravel().tolist()
    [False, True, True, False]
    """
    score = jnp.asarray(score)
    v.check_nm(n, m)
    v.check_float_array("score", score)
    ax = v.check_axis("axis", axis, score.ndim)
    v.check_divisible("score", score.shape, ax, m)
    if n == m:
        return jnp.ones(score.shape, bool)
    x = jnp.where(jnp.isnan(score), -jnp.inf, score)
    g = x.reshape(score.shape[:ax] + (score.shape[ax] // m, m) + score.shape[ax + 1 :])
    pos = lax.broadcasted_iota(jnp.int32, g.shape, ax + 1)
    rank = jnp.zeros(g.shape, jnp.int32)
    for j in range(m):
        other = lax.slice_in_dim(g, j, j + 1, axis=ax + 1)
        rank = rank + ((other > g) | ((other == g) & (pos > j))).astype(jnp.int32)
    return (rank < n).reshape(score.shape)


# ------------------------------------------------------------------------------------------------ public: blocks
def block_scores(
    score: Float[ArrayLike, ...], block_shape: tuple[int, int], pool: str = "l2"
) -> Float[Array, "rb cb"]:
    """Pools ``|score|`` over ``block_shape`` tiles of the leaf viewed as a matrix ``(prod(shape[:-1]), shape[-1])``.

    ``pool`` is ``"l1"`` (sum), ``"l2"`` (root of sum of squares) or ``"max"``.

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

    >>> import jax.numpy as jnp
    >>> p = apply_masks({"w": jnp.array([1.0, 2.0]), "b": jnp.ones(1)}, {"w": jnp.array([True, False]), "b": None})
    >>> p["w"].tolist(), p["b"].tolist()
    ([1.0, 0.0], [1.0])
    """
    return map_masked(lambda p, m: jnp.where(m, p, jnp.zeros((), p.dtype)), params, masks)
