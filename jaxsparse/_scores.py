"""Scores for exact-count selection that no NaN or infinity can corrupt.

A selection ranks scores and keeps the top ``k`` among *allowed* positions (active weights for drop, positions not
kept for growth). Excluded positions score ``-inf`` and every allowed position scores a finite float32
(``NaN`` and ``-inf`` become the lowest finite value, ``+inf`` the highest), so an excluded position can only be
picked after every allowed one, whatever the gradients or weights hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree

from jaxsparse._tree import map_live
from jaxsparse.masks import global_topk_masks, topk_masks

_MAX = float(jnp.finfo(jnp.float32).max)


def finite_scores(score: Float[ArrayLike, ...]) -> Float[Array, ...]:
    """``score`` as float32 with ``NaN``/``-inf`` -> lowest finite and ``+inf`` -> largest finite."""
    s = jnp.asarray(score).astype(jnp.float32)
    return jnp.nan_to_num(s, nan=-_MAX, posinf=_MAX, neginf=-_MAX)


def allowed_scores(
    score: Float[ArrayLike, ...], allowed: Bool[ArrayLike, ...]
) -> Float[Array, ...]:
    """Finite scores at ``allowed`` positions, ``-inf`` elsewhere (strictly below every allowed one)."""
    return jnp.where(allowed, finite_scores(score), -jnp.inf)


def masks_from_counts(scores: PyTree, ks: PyTree, scope: str, layer_axes: PyTree) -> PyTree:
    """Keeps the ``ks`` highest ``scores`` per leaf (per layer slice of a stacked leaf), or with ``scope="global"``
    their total over all leaves under one threshold; ``None`` where ``ks`` is ``None``.

    ``layer_axes`` is a pytree like ``ks`` of stacked-layer axes (``int``) or ``None``: ``ks`` then counts per
    slice, so a leaf's share of the global total is ``k`` times its number of slices.
    """
    if scope == "layer":
        return topk_masks(scores, ks, layer_axes=layer_axes)
    totals = map_live(lambda k, x, a: k * (1 if a is None else x.shape[a]), ks, scores, layer_axes)
    return global_topk_masks(scores, sum(jax.tree.leaves(totals)))
