"""Mask rules on leaves stacked by shape (:mod:`jaxsparse._groups`): one computation per group, counts per unit.

The public pytree functions of :mod:`jaxsparse.transforms.growth` and the DST rules stack their inputs once, run
these, and unstack the new masks once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from jaxsparse import _groups as _g
from jaxsparse import _topk
from jaxsparse._scores import allowed_scores, finite_scores
from jaxsparse._tree import is_none


def regrow_groups(
    g: _g.Grouping, masks: list, drop: list, n_keep: Array, grow: list, n_grow: Array
) -> tuple[list, list]:
    """The rule on stacked groups: keep top-``n_keep`` drop scores, grow top-``n_grow`` among the rest."""
    kept = _topk.select_stacked(g, [_topk.ordered_key(d) for d in drop], n_keep, False)
    cand = [jnp.where(k, -jnp.inf, s.astype(jnp.float32)) for k, s in zip(kept, grow)]
    grown = _topk.select_stacked(g, [_topk.ordered_key(c) for c in cand], n_grow, False)
    return [k | gr for k, gr in zip(kept, grown)], kept


def unit_seeds(g: _g.Grouping, key: PRNGKeyArray, masks: PyTree, live: list[int]) -> Array:
    """Per-unit hash seeds equal to :func:`jaxsparse.random_scores`' per-leaf seeds for the same key and tree."""
    return _topk.unit_seeds(g, key, len(jax.tree.leaves(masks, is_leaf=is_none)), live)


def drop_and_grow_groups(
    g: _g.Grouping,
    masks: list,
    params: list,
    grow: list,
    fraction: Float[ArrayLike, ""],
    key: PRNGKeyArray | None,
    noise: float,
    seeds: Array | None,
) -> list:
    """:func:`drop_and_grow` on stacked groups (counts per unit, vectorised; NaN-safe scores as in growth)."""
    f = jnp.asarray(fraction, jnp.float32)
    active = jnp.concatenate([_g.unit_sum(m) for m in masks])
    n_drop = jnp.floor(active.astype(jnp.float32) * f).astype(jnp.int32)
    drop = [jnp.abs(jnp.where(jnp.isnan(p), 0, p)).astype(jnp.float32) for p in params]
    if key is not None and noise:
        z = [ndtri(u + 0.5 / (1 << 24)) for u in _topk.stacked_uniform(g, seeds)]
        drop = [d + noise * zi for d, zi in zip(drop, z)]
    drop = [allowed_scores(d, m) for m, d in zip(masks, drop)]
    grow = [finite_scores(x) for x in grow]
    new, _ = regrow_groups(g, masks, drop, active - n_drop, grow, n_drop)
    return new


def live_leaves(masks: PyTree, *trees: PyTree) -> tuple[list[int], list[list]]:
    """Positions of the masked (non-``None``) leaves, and those leaves of ``masks`` and of every tree."""
    leaves = jax.tree.flatten(masks, is_leaf=is_none)[0]
    live = [i for i, m in enumerate(leaves) if m is not None]
    flats = [jax.tree.flatten(t, is_leaf=is_none)[0] for t in trees]
    return live, [[leaves[i] for i in live]] + [[f[i] for i in live] for f in flats]


def rebuild(masks: PyTree, live: list[int], picked: list) -> PyTree:
    """``masks`` with its masked leaves replaced by ``picked``."""
    leaves, treedef = jax.tree.flatten(masks, is_leaf=is_none)
    out = list(leaves)
    for i, m in zip(live, picked):
        out[i] = m
    return jax.tree.unflatten(treedef, out)


def drop_and_grow_tree(
    masks: PyTree,
    params: PyTree,
    grow: str,
    source: PyTree | None,
    fraction: Float[ArrayLike, ""],
    key_grow: PRNGKeyArray | None,
    key_drop: PRNGKeyArray | None,
    noise: float,
    layer_axes: PyTree | None = None,
) -> PyTree:
    """The RigL/SET/SNFS update of a masks pytree with its grow scores made on the stacked groups.

    ``layer_axes`` (a pytree like ``masks`` of ``int`` / ``None``) applies the rule to every layer slice of a
    stacked leaf: counts, drop and growth per slice.

    ``grow`` is ``"random"`` (hashed uniforms from ``key_grow``, the numbers :func:`jaxsparse.random_scores` gives
    leaf by leaf) or ``"abs"`` (``|source|``: the dense gradient, or a momentum).
    """
    live, (ms, ps) = live_leaves(masks, params)
    if not live:
        return masks
    axes = None
    if layer_axes is not None:
        flat = jax.tree.flatten(layer_axes, is_leaf=is_none)[0]
        axes = tuple(flat[i] for i in live)
    g = _g.grouping([m.shape for m in ms], axes)
    m_s, p_s = _g.stack(g, ms), _g.stack(g, ps)
    if grow == "random":
        scores = _topk.stacked_uniform(g, unit_seeds(g, key_grow, masks, live))
    else:
        src = live_leaves(masks, source)[1][1]
        scores = [jnp.abs(x).astype(jnp.float32) for x in _g.stack(g, src)]
    noisy = bool(noise) and key_drop is not None
    seeds = unit_seeds(g, key_drop, masks, live) if noisy else None
    new = drop_and_grow_groups(
        g, m_s, p_s, scores, fraction, key_drop if noisy else None, noise, seeds
    )
    return rebuild(masks, live, _g.unstack(g, new))
