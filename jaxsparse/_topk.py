"""Exact top-k selection on stacked groups of leaves, and the counter hash behind random scores.

Top-k never sorts. Scores are mapped to ``uint32`` keys whose order is the float order, and the k-th largest key
is found by building it bit by bit (32 counting passes). Ties at the threshold are broken by position (tree order
of units, then lowest flat index first) with a second bisection over index bits, run once for all units, so
counts are exact and deterministic. Every pass is an elementwise compare plus one count per group of equally
shaped units (:mod:`jaxsparse._groups`), so the HLO does not grow with the number of leaves, and the same code
works on sharded arrays without gathering them: each pass is a local count and a scalar all-reduce.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from jaxsparse import _groups as _g


def ordered_key(score: Array) -> Array:
    """Maps float scores to ``uint32`` keys with the same order; NaN ranks lowest, -0.0 equals +0.0."""
    x = jnp.asarray(score).astype(jnp.float32)
    x = jnp.where(x == 0, jnp.float32(0), x)  # -0.0 -> +0.0 (XLA folds a `+ 0.0` away under jit)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))
    return jnp.where(
        jnp.isnan(x), jnp.uint32(0), key
    )  # -inf maps to 0x007FFFFF, so NaN is strictly lowest


def _flat_index(shape: Sequence[int]) -> Array:
    return lax.broadcasted_iota(jnp.int32, (math.prod(shape),), 0).reshape(shape)


def _group_counts(preds: Sequence[Array]) -> Array:
    """Per-unit counts of stacked boolean groups, concatenated in group order (one reduce per group)."""
    counts = [_g.unit_sum(p) for p in preds]
    return counts[0] if len(counts) == 1 else jnp.concatenate(counts)


def _per_group(g: _g.Grouping, x: Array, shared: bool, keys: Sequence[Array]) -> list[Array]:
    """A threshold per unit (or one shared scalar) shaped to broadcast against each stacked group."""
    if shared:
        return [x] * len(keys)
    return [_g.bcast(part, k.ndim) for part, k in zip(_g.split(g, x), keys)]


def _kth_largest(g: _g.Grouping, keys: Sequence[Array], ks: Array, shared: bool) -> Array:
    """Largest key value t with count(key >= t) >= k: per unit, or one over all units (``shared``).

    One 32-pass bisection for every group; each pass is one compare-and-count per group.
    """

    def body(i, t):
        cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        counts = _group_counts([k >= c for k, c in zip(keys, _per_group(g, cand, shared, keys))])
        counts = jnp.sum(counts) if shared else counts
        return jnp.where(counts >= ks, cand, t)

    init = jnp.zeros(() if shared else (g.n_units,), jnp.uint32)
    return lax.fori_loop(0, 32, body, init)


def _take_first_ties(g: _g.Grouping, ties: Sequence[Array], quotas: Array) -> list[Array]:
    """Keeps the first ``quota`` True entries (by flat index in the unit) of every unit: one bisection for all."""
    idx = [_flat_index(t.shape[1:])[None] for t in ties]
    bits = max(1, int(max(g.unit_sizes())).bit_length())

    def body(i, c):
        cand = c | (jnp.int32(1) << (bits - 1 - i))
        cuts = _per_group(g, cand, False, ties)
        counts = _group_counts([t & (j < cut) for t, j, cut in zip(ties, idx, cuts)])
        return jnp.where(counts <= quotas, cand, c)

    cut = lax.fori_loop(0, bits, body, jnp.zeros((g.n_units,), jnp.int32))
    cuts = _per_group(g, cut, False, ties)
    return [t & (j < c) for t, j, c in zip(ties, idx, cuts)]


def select_stacked(g: _g.Grouping, keys: Sequence[Array], ks: Array, shared: bool) -> list[Array]:
    """Top-``ks`` masks of stacked ``uint32`` key groups (see :mod:`jaxsparse._groups`).

    ``ks`` is a per-unit int32 vector in group order, or (``shared``) one scalar for all units together, in which
    case threshold ties go to units in tree order (leaf, then layer slice), lower flat index first.
    """
    sizes = jnp.asarray(g.unit_sizes().astype(np.int32))
    ks = jnp.clip(ks, 0, jnp.sum(sizes) if shared else sizes)
    t = _kth_largest(g, keys, ks, shared)
    ts = _per_group(g, t, shared, keys)
    greater = [k > c for k, c in zip(keys, ts)]
    ties = [k == c for k, c in zip(keys, ts)]
    n_greater = _group_counts(greater)
    n_ties = _group_counts(ties)
    if shared:  # ties go to the earliest units (tree order) first
        order = g.tree_order()
        inverse = np.argsort(order)
        in_tree = n_ties[order]
        before = (jnp.cumsum(in_tree) - in_tree)[inverse]
        quotas = jnp.clip(ks - jnp.sum(n_greater) - before, 0, n_ties)
    else:
        quotas = jnp.clip(ks - n_greater, 0, n_ties)
    partial = jnp.any((quotas > 0) & (quotas < n_ties))
    kept_ties = lax.cond(
        partial,
        lambda: _take_first_ties(g, ties, quotas),
        lambda: [e & (q > 0) for e, q in zip(ties, _per_group(g, quotas, False, ties))],
    )
    return [a | b for a, b in zip(greater, kept_ties)]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _select_groups(g: _g.Grouping, stacked: list[Array], ks: Array, shared: bool) -> list[Array]:
    return select_stacked(g, [ordered_key(s) for s in stacked], ks, shared)


def select_top(
    scores: list[Array], ks: Array, shared: bool, axes: tuple[int | None, ...] | None = None
) -> list[Array]:
    """Top-k masks of a list of score arrays; ``ks`` per unit in group order, or one scalar if ``shared``.

    The selection is one jitted computation per grouping (its size set by the number of distinct unit shapes);
    stacking and unstacking the leaves stay outside it, so an eager call runs a few cached executables per leaf
    instead of compiling a program that grows with the number of leaves.
    """
    g = _g.grouping([s.shape for s in scores], axes)
    return _g.unstack(g, _select_groups(g, _g.stack(g, scores), ks, shared))


def unit_ks(
    shapes: Sequence[tuple[int, ...]], axes: Sequence[int | None] | None, ks: Sequence
) -> Array:
    return _g.per_unit(_g.grouping(shapes, axes), list(ks))


def unit_seeds(g: _g.Grouping, key: Array, n_leaves: int, live: Sequence[int]) -> Array:
    """Per-unit hash seeds (group order) equal to :func:`jaxsparse.random_scores`' per-leaf seeds: one draw of
    ``n_leaves`` seeds from ``key``, leaf ``live[j]``'s seed for every unit of the ``j``-th grouped leaf."""
    seeds = jax.random.bits(key, (n_leaves,), jnp.uint32)
    return seeds[np.asarray(live, np.int64)[g.leaf_of_unit()]]


def stacked_uniform(g: _g.Grouping, seeds: Array) -> list[Array]:
    """:func:`hash_uniform` of every unit, one ``(units, *unit_shape)`` array per group: the same numbers
    :func:`jaxsparse.random_scores` gives leaf by leaf (a stacked leaf's slices continue its flat index)."""
    offsets = jnp.asarray(g.slice_of_unit() * g.unit_sizes(), jnp.uint32)
    out = []
    for shape, s, off in zip(g.shapes, _g.split(g, seeds), _g.split(g, offsets)):
        ndim = len(shape) + 1  # flat index within the unit, broadcast over the units
        out.append(hash_uniform((1, *shape), _g.bcast(s, ndim), _g.bcast(off, ndim)))
    return out


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def random_top(
    g: _g.Grouping, key: Array, n_leaves: int, live: tuple[int, ...], ks: Array
) -> list[Array]:
    """Top-``ks`` (per unit, group order) of :func:`stacked_uniform` with :func:`unit_seeds` from ``key``: exactly
    the per-unit top-k of :func:`jaxsparse.random_scores`, computed on the groups (one hash and one selection per
    distinct unit shape, one compiled program per grouping). Returns the stacked groups."""
    uniforms = stacked_uniform(g, unit_seeds(g, key, n_leaves, live))
    return select_stacked(g, [ordered_key(u) for u in uniforms], ks, False)


def hash_uniform(shape: tuple[int, ...], seed: Array, offset: Array | int = 0) -> Array:
    """Uniform ``[0, 1)`` float32 of ``shape``: the murmur3 finaliser of ``flat index + offset`` and ``seed``.

    ``seed`` and ``offset`` broadcast against ``shape`` (per-unit values for a stacked group).
    """
    x = (
        lax.broadcasted_iota(jnp.uint32, (math.prod(shape),), 0).reshape(shape)
        + jnp.asarray(offset, jnp.uint32)
    ) * jnp.uint32(0x9E3779B9) + seed
    for mul in (0x85EBCA6B, 0xC2B2AE35):
        x = (x ^ (x >> 16)) * jnp.uint32(mul)
    x = x ^ (x >> 16)
    return (x >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
