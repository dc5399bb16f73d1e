"""Drop-and-grow primitives shared by the dynamic sparse training rules in :mod:`jaxsparse.transforms.dst`.

Every function is pure, works on masks pytrees (``None`` for dense leaves) and takes *traced* counts: the number of
connections dropped and grown changes over training (a cosine-decayed fraction of the active ones), so selection
goes through :func:`jaxsparse.topk_masks`' selection (exact count, no sort, no gather) rather than ``lax.top_k``,
run on leaves stacked by shape (one selection per distinct shape, not per leaf).

The rule, per masked leaf (Evci et al. 2020, RigL):

1. *drop*: keep the ``n_keep`` largest drop scores among the active positions (inactive positions score ``-inf``);
2. *grow*: among the positions **not kept** (just-dropped ones included) turn on the ``n_grow`` largest grow scores.

Non-finite inputs cannot break the counts: scores are made finite before ranking (``NaN`` lowest, ``+inf``
highest; a ``NaN`` weight ranks as ``|w| = 0``) while excluded positions keep ``-inf`` below all of them, so a NaN
gradient or weight never makes growth land on a kept connection or the drop keep an inactive one.

A just-dropped connection that is grown again is simply kept (it never left ``old & new``), so it keeps its value and
its optimizer moments; only ``new & ~old`` connections count as grown (see :func:`jaxsparse.sparse_training`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri
from jaxtyping import ArrayLike, Float, PRNGKeyArray, PyTree

from jaxsparse import _groups as _g
from jaxsparse._scores import allowed_scores, finite_scores
from jaxsparse._tree import check_same_structure, is_none
from jaxsparse.masks import random_scores
from jaxsparse.transforms import _stacked as _st

__all__ = ["active_counts", "drop_counts", "drop_scores", "prune_and_regrow", "drop_and_grow"]


def _live(masks: PyTree, tree: PyTree) -> PyTree:
    """``tree``'s leaves where ``masks`` has an array, ``None`` where the mask is ``None``."""
    return jax.tree.map(lambda m, x: None if m is None else x, masks, tree, is_leaf=is_none)


def active_counts(masks: PyTree) -> PyTree:
    """Per-leaf number of active connections (int32 scalars; ``None`` for dense leaves).

    Args:
      masks: a pytree of ``bool`` masks, ``None`` for dense leaves.

    Returns:
      A pytree like ``masks`` of int32 scalars (``None`` kept).

    Example:
      >>> import jax.numpy as jnp
      >>> active_counts({"w": jnp.array([True, False, True]), "b": None})["w"].item()
      2
    """
    return jax.tree.map(
        lambda m: None if m is None else jnp.sum(m, dtype=jnp.int32), masks, is_leaf=is_none
    )


def drop_counts(masks: PyTree, fraction: Float[ArrayLike, ""]) -> PyTree:
    """Per-leaf ``floor(n_active * fraction)`` (traced int32; ``fraction`` may be traced).

    Args:
      masks: a pytree of ``bool`` masks, ``None`` for dense leaves.
      fraction: the drop fraction, a float scalar (computed in float32).

    Returns:
      A pytree like ``masks`` of int32 scalars (``None`` kept).

    Example:
      >>> import jax.numpy as jnp
      >>> drop_counts({"w": jnp.ones(10, bool)}, 0.25)["w"].item()
      2
    """
    f = jnp.asarray(fraction, jnp.float32)
    return jax.tree.map(
        lambda n: None if n is None else jnp.floor(n.astype(jnp.float32) * f).astype(jnp.int32),
        active_counts(masks),
        is_leaf=is_none,
    )


def drop_scores(
    params: PyTree, masks: PyTree, key: PRNGKeyArray | None = None, noise: float = 0.0
) -> PyTree:
    """``|w| (+ noise * N(0, 1))`` at active positions and ``-inf`` at inactive ones (float32).

    The small Gaussian noise (RigL uses ``1e-5``) breaks ties among equal magnitudes at random; with
    ``noise=0`` ties go to the lower flat index.

    Args:
      params: a pytree of arrays shaped like ``masks``.
      masks: a pytree of ``bool`` masks, ``None`` for dense leaves.
      key: a PRNG key for the noise; without one no noise is added.
      noise: the noise's standard deviation.

    Returns:
      A pytree like ``masks`` of float32 scores (``None`` kept).

    Raises:
      ValueError: ``params`` and ``masks`` of different structures.

    Example:
      >>> import jax.numpy as jnp
      >>> drop_scores({"w": jnp.array([-2.0, 1.0])}, {"w": jnp.array([True, False])})["w"].tolist()
      [2.0, -inf]
    """
    check_same_structure("params", params, "masks", masks)
    mags = jax.tree.map(
        lambda m, p: None if m is None else jnp.abs(p).astype(jnp.float32),
        masks,
        params,
        is_leaf=is_none,
    )
    if noise and key is not None:
        mags = jax.tree.map(
            lambda s, z: None if s is None else s + noise * z,
            mags,
            _normal_scores(key, masks),
            is_leaf=is_none,
        )
    return jax.tree.map(
        lambda m, s: None if m is None else allowed_scores(s, m), masks, mags, is_leaf=is_none
    )


def _normal_scores(key: PRNGKeyArray, masks: PyTree) -> PyTree:
    """Standard normal scores by the inverse CDF of :func:`random_scores` (same cheap hash, no threefry)."""
    uniform = random_scores(key, masks)
    return jax.tree.map(
        lambda u: None if u is None else ndtri(u + 0.5 / (1 << 24)), uniform, is_leaf=is_none
    )


def prune_and_regrow(
    masks: PyTree,
    drop_score: PyTree,
    n_keep: PyTree,
    grow_score: PyTree,
    n_grow: PyTree,
    layer_axes: tuple[int | None, ...] | None = None,
) -> tuple[PyTree, PyTree]:
    """Keeps the top-``n_keep`` drop scores per leaf, then turns on the top-``n_grow`` grow scores among the rest.

    ``drop_score`` should be ``-inf`` at inactive positions (see :func:`drop_scores`) so that only active
    connections are kept; ``n_keep`` / ``n_grow`` are per-leaf (possibly traced) ints. Returns ``(new_masks, kept)``;
    ``new_masks`` has exactly ``n_keep + n_grow`` active entries per leaf whenever ``n_keep <= n_active`` and
    ``n_keep + n_grow <= size``. Leaves of equal shape are processed together (one selection per shape).
    ``layer_axes`` (one int or ``None`` per masked leaf, in tree order) makes a stacked leaf's layer slices
    separate units; its counts are then per slice.

    Args:
      masks: a pytree of ``bool`` masks, ``None`` for dense leaves.
      drop_score: a pytree like ``masks`` of float scores (higher = kept).
      n_keep: per-leaf (or per-slice) counts of active entries to keep.
      grow_score: a pytree like ``masks`` of float scores (higher = grown first; NaN and -inf rank lowest, +inf
        highest).
      n_grow: per-leaf (or per-slice) counts of entries to turn on.
      layer_axes: one layer axis or ``None`` per masked leaf, in tree order; ``None`` for no stacked leaf.

    Returns:
      ``(new_masks, kept)``: the updated masks and the kept part of the old ones, both like ``masks``.

    Raises:
      ValueError: ``drop_score`` or ``grow_score`` not shaped like ``masks``.

    Example:
      >>> import jax.numpy as jnp
      >>> m = {"w": jnp.array([True, True, False, False])}
      >>> new, kept = prune_and_regrow(m, {"w": jnp.array([3.0, 1.0, -jnp.inf, -jnp.inf])}, {"w": 1},
      ...                              {"w": jnp.array([0.0, 0.0, 5.0, 2.0])}, {"w": 1})
      >>> new["w"].tolist(), kept["w"].tolist()
      ([True, False, True, False], [True, False, False, False])
    """
    check_same_structure("masks", masks, "drop_score", drop_score)
    check_same_structure("masks", masks, "grow_score", grow_score)
    live, (ms, drops, keeps, grows, ngrows) = _st.live_leaves(
        masks, drop_score, n_keep, grow_score, n_grow
    )
    if not live:
        return masks, masks
    g = _g.grouping([m.shape for m in ms], layer_axes)
    new, kept = _st.regrow_groups(
        g,
        _g.stack(g, ms),
        _g.stack(g, [allowed_scores(d, m) for d, m in zip(drops, ms)]),
        _g.per_unit(g, keeps),
        _g.stack(g, [finite_scores(x) for x in grows]),
        _g.per_unit(g, ngrows),
    )
    return _st.rebuild(masks, live, _g.unstack(g, new)), _st.rebuild(
        masks, live, _g.unstack(g, kept)
    )


def drop_and_grow(
    masks: PyTree,
    params: PyTree,
    grow_score: PyTree,
    fraction: Float[ArrayLike, ""],
    key: PRNGKeyArray | None = None,
    noise: float = 0.0,
    layer_axes: tuple[int | None, ...] | None = None,
) -> PyTree:
    """One RigL/SET-style update: per leaf drop ``floor(n_active * fraction)`` smallest ``|w|`` and grow as many.

    Per-leaf nnz is unchanged. ``grow_score`` is the dense gradient magnitude (RigL), random numbers (SET) or a
    momentum magnitude (SNFS without redistribution). Leaves of equal shape are stacked and updated together;
    ``layer_axes`` (see :func:`prune_and_regrow`) applies the rule to every layer slice of a stacked leaf.

    Args:
      masks: a pytree of ``bool`` masks, ``None`` for dense leaves.
      params: the weights, like ``masks`` (NaN weights count as 0).
      grow_score: a pytree like ``masks`` of float growth scores.
      fraction: the drop fraction, a float scalar (may be traced).
      key: a PRNG key for tie-breaking noise on the drop scores (used only with ``noise > 0``).
      noise: the noise's standard deviation.
      layer_axes: one layer axis or ``None`` per masked leaf, in tree order.

    Returns:
      The new masks, like ``masks``.

    Raises:
      ValueError: ``params`` or ``grow_score`` not shaped like ``masks``.

    Example:
      >>> import jax.numpy as jnp
      >>> m = {"w": jnp.array([True, True, False, False])}
      >>> p = {"w": jnp.array([3.0, 0.1, 0.0, 0.0])}
      >>> drop_and_grow(m, p, {"w": jnp.array([0.0, 0.0, 0.2, 0.9])}, 0.5)["w"].tolist()
      [True, False, False, True]
    """
    check_same_structure("masks", masks, "params", params)
    check_same_structure("masks", masks, "grow_score", grow_score)
    live, (ms, ps, grows) = _st.live_leaves(masks, params, grow_score)
    if not live:
        return masks
    g = _g.grouping([m.shape for m in ms], layer_axes)
    noise_key = key if (noise and key is not None) else None
    new = _st.drop_and_grow_groups(
        g,
        _g.stack(g, ms),
        _g.stack(g, [jnp.where(jnp.isnan(p), jnp.zeros((), p.dtype), p) for p in ps]),
        _g.stack(g, [finite_scores(x) for x in grows]),
        fraction,
        noise_key,
        noise,
        _st.unit_seeds(g, noise_key, masks, live) if noise_key is not None else None,
    )
    return _st.rebuild(masks, live, _g.unstack(g, new))
