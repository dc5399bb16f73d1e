"""Drop-and-grow primitives shared by the dynamic sparse training rules in :mod:`jaxsparse.transforms.dst`.

Every function is pure, works on masks pytrees (``None`` for dense leaves) and takes *traced* counts: the number of
connections dropped and grown changes over training (a cosine-decayed fraction of the active ones), so selection
goes through :func:`jaxsparse.topk_masks` (exact count, no sort, no gather) rather than ``lax.top_k``.

The rule, per masked leaf (Evci et al. 2020, RigL):

1. *drop*: keep the ``n_keep`` largest drop scores among the active positions (inactive positions score ``-inf``);
2. *grow*: among the positions **not kept** (just-dropped ones included) turn on the ``n_grow`` largest grow scores.

A just-dropped connection that is grown again is simply kept (it never left ``old & new``), so it keeps its value and
its optimizer moments; only ``new & ~old`` connections count as grown (see :func:`jaxsparse.sparse_training`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri
from jaxtyping import ArrayLike, Float, PRNGKeyArray, PyTree

from jaxsparse._tree import check_same_structure, is_none
from jaxsparse.masks import random_scores, topk_masks

__all__ = ["active_counts", "drop_counts", "drop_scores", "prune_and_regrow", "drop_and_grow"]


def _live(masks: PyTree, tree: PyTree) -> PyTree:
    """``tree``'s leaves where ``masks`` has an array, ``None`` where the mask is ``None``."""
    return jax.tree.map(lambda m, x: None if m is None else x, masks, tree, is_leaf=is_none)


def active_counts(masks: PyTree) -> PyTree:
    """Per-leaf number of active connections (int32 scalars; ``None`` for dense leaves).

    >>> import jax.numpy as jnp
    >>> active_counts({"w": jnp.array([True, False, True]), "b": None})["w"].item()
    2
    """
    return jax.tree.map(
        lambda m: None if m is None else jnp.sum(m, dtype=jnp.int32), masks, is_leaf=is_none
    )


def drop_counts(masks: PyTree, fraction: Float[ArrayLike, ""]) -> PyTree:
    """Per-leaf ``floor(n_active * fraction)`` (traced int32; ``fraction`` may be traced).

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
        lambda m, s: None if m is None else jnp.where(m, s, -jnp.inf), masks, mags, is_leaf=is_none
    )


def _normal_scores(key: PRNGKeyArray, masks: PyTree) -> PyTree:
    """Standard normal scores by the inverse CDF of :func:`random_scores` (same cheap hash, no threefry)."""
    uniform = random_scores(key, masks)
    return jax.tree.map(
        lambda u: None if u is None else ndtri(u + 0.5 / (1 << 24)), uniform, is_leaf=is_none
    )


def prune_and_regrow(
    masks: PyTree, drop_score: PyTree, n_keep: PyTree, grow_score: PyTree, n_grow: PyTree
) -> tuple[PyTree, PyTree]:
    """Keeps the top-``n_keep`` drop scores per leaf, then turns on the top-``n_grow`` grow scores among the rest.

    ``drop_score`` should be ``-inf`` at inactive positions (see :func:`drop_scores`) so that only active
    connections are kept; ``n_keep`` / ``n_grow`` are per-leaf (possibly traced) ints. Returns ``(new_masks, kept)``;
    ``new_masks`` has exactly ``n_keep + n_grow`` active entries per leaf whenever ``n_keep <= n_active`` and
    ``n_keep + n_grow <= size``.

    >>> import jax.numpy as jnp
    >>> m = {"w": jnp.array([True, True, False, False])}
    >>> new, kept = prune_and_regrow(m, {"w": jnp.array([3.0, 1.0, -jnp.inf, -jnp.inf])}, {"w": 1},
    ...                              {"w": jnp.array([0.0, 0.0, 5.0, 2.0])}, {"w": 1})
    >>> new["w"].tolist(), kept["w"].tolist()
    ([True, False, True, False], [True, False, False, False])
    """
    check_same_structure("masks", masks, "drop_score", drop_score)
    check_same_structure("masks", masks, "grow_score", grow_score)
    kept = topk_masks(_live(masks, drop_score), _live(masks, n_keep))
    candidates = jax.tree.map(
        lambda k, s: None if k is None else jnp.where(k, -jnp.inf, s.astype(jnp.float32)),
        kept,
        _live(masks, grow_score),
        is_leaf=is_none,
    )
    grown = topk_masks(candidates, _live(masks, n_grow))
    new = jax.tree.map(lambda k, g: None if k is None else k | g, kept, grown, is_leaf=is_none)
    return new, kept


def drop_and_grow(
    masks: PyTree,
    params: PyTree,
    grow_score: PyTree,
    fraction: Float[ArrayLike, ""],
    key: PRNGKeyArray | None = None,
    noise: float = 0.0,
) -> PyTree:
    """One RigL/SET-style update: per leaf drop ``floor(n_active * fraction)`` smallest ``|w|`` and grow as many.

    Per-leaf nnz is unchanged. ``grow_score`` is the dense gradient magnitude (RigL), random numbers (SET) or a
    momentum magnitude (SNFS without redistribution).

    >>> import jax.numpy as jnp
    >>> m = {"w": jnp.array([True, True, False, False])}
    >>> p = {"w": jnp.array([3.0, 0.1, 0.0, 0.0])}
    >>> drop_and_grow(m, p, {"w": jnp.array([0.0, 0.0, 0.2, 0.9])}, 0.5)["w"].tolist()
    [True, False, False, True]
    """
    n_drop = drop_counts(masks, fraction)
    n_keep = jax.tree.map(
        lambda a, d: None if a is None else a - d, active_counts(masks), n_drop, is_leaf=is_none
    )
    new, _ = prune_and_regrow(
        masks, drop_scores(params, masks, key, noise), n_keep, grow_score, n_drop
    )
    return new
