"""One-shot masks for a whole params pytree: magnitude, random and SNIP, per leaf or global.

``sparsity`` is everywhere one of: a float (uniform over the default prunable leaves), a budget from
:func:`jaxsparse.budget` (e.g. ERK), or a pytree shaped like ``params`` with a sparsity per leaf (``None`` =
dense). Counts are exact: a leaf of ``N`` weights at sparsity ``s`` keeps ``N - floor(s * N)``; a global mask keeps
the sum of those counts, chosen by one threshold across leaves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree

from jaxsparse import _groups as _g
from jaxsparse import _topk
from jaxsparse import _validation as v
from jaxsparse._scores import allowed_scores, masks_from_counts
from jaxsparse._tree import check_same_structure, is_none, map_live, unwrap
from jaxsparse.allocation import Budget, as_budget, keep_count, layer_axes

__all__ = [
    "leaf_sparsities",
    "masks_from_scores",
    "magnitude_masks",
    "random_masks",
    "snip_masks",
    "SCOPES",
]

SCOPES = ("layer", "global")


def leaf_sparsities(sparsity: float | Budget | PyTree, params: PyTree) -> PyTree:
    """Resolves ``sparsity`` (float, budget or per-leaf pytree) to a per-leaf pytree with ``None`` for dense.

    A scalar may be a Python or NumPy number or a 0-d (possibly traced) array, e.g. a hyperparameter of
    ``optax.inject_hyperparams``. NNX Variables in ``params`` are unwrapped (see :func:`jaxsparse.leaf_paths`).

    Args:
      sparsity: a float in ``[0, 1)`` (uniform over :func:`jaxsparse.prunable` leaves), a budget from
        :func:`jaxsparse.budget` (e.g. ERK), or a pytree like ``params`` of per-leaf sparsities (``None`` = dense).
      params: the parameter pytree (only its structure and shapes are read).

    Returns:
      A pytree like ``params`` with a sparsity (or ``None`` for dense) per leaf; a per-leaf pytree is returned as
      given once checked.

    Raises:
      ValueError: a sparsity outside ``[0, 1)`` or a per-leaf pytree not shaped like ``params``.
      TypeError: ``sparsity`` is none of the accepted kinds.

    Example:
      >>> import jax.numpy as jnp
      >>> leaf_sparsities(0.5, {"w": jnp.ones((4, 4)), "b": jnp.ones(4)})
      {'b': None, 'w': 0.5}
    """
    v.check_sparsity_spec("sparsity", sparsity)
    params = unwrap(params)
    if callable(sparsity) or v.is_scalar(sparsity):
        return as_budget(sparsity)(params)
    check_same_structure("sparsity", sparsity, "params", params)
    for s in jax.tree.leaves(sparsity):
        if not isinstance(s, jax.core.Tracer):
            v.check_sparsity("sparsity leaf", s)
    return sparsity


def masks_from_scores(
    scores: PyTree, sparsities: PyTree, scope: str = "layer", layer_axes: PyTree | None = None
) -> PyTree:
    """Keeps the highest scores: ``N - floor(s * N)`` per leaf, or that total over all leaves with ``"global"``.

    ``scores`` leaves where ``sparsities`` is ``None`` are ignored (mask ``None``). ``layer_axes`` (a pytree of
    ``int`` / ``None``, see :func:`jaxsparse.layer_axes`) makes every layer slice of a stacked leaf keep its own
    ``keep_count(s, slice size)``.

    Args:
      scores: a pytree of float scores; larger is kept.
      sparsities: a pytree like ``scores`` of per-leaf sparsities in ``[0, 1)`` or ``None`` (e.g. from
        :func:`leaf_sparsities`).
      scope: ``"layer"`` (each leaf keeps its own count) or ``"global"`` (one threshold across leaves keeps the
        sum of the counts).
      layer_axes: optional pytree like ``sparsities`` of stacked-layer axes (``int``) or ``None``.

    Returns:
      A pytree like ``scores``: ``bool`` masks where ``sparsities`` has a value, ``None`` elsewhere.

    Raises:
      ValueError: an unknown ``scope``, or ``scores``/``sparsities``/``layer_axes`` of different structures.

    Example:
      >>> import jax.numpy as jnp
      >>> m = masks_from_scores({"w": jnp.arange(10.0)}, {"w": 0.7})
      >>> m["w"].astype(int).tolist()
      [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
      >>> m = masks_from_scores({"w": jnp.arange(8.0).reshape(2, 4)}, {"w": 0.5}, layer_axes={"w": 0})
      >>> m["w"].astype(int).tolist()
      [[0, 0, 1, 1], [0, 0, 1, 1]]
    """
    v.check_choice("scope", scope, SCOPES)
    check_same_structure("scores", scores, "sparsities", sparsities)
    if layer_axes is None:
        layer_axes = jax.tree.map(lambda s: None, sparsities, is_leaf=is_none)
    check_same_structure("sparsities", sparsities, "layer_axes", layer_axes)
    live = map_live(lambda s, x: x, sparsities, scores)
    ks = map_live(  # per layer slice for stacked leaves
        lambda s, x, a: keep_count(s, x.size // (1 if a is None else x.shape[a])),
        sparsities,
        scores,
        layer_axes,
    )
    return masks_from_counts(live, ks, scope, layer_axes)


def _restrict(scores: PyTree, masks: PyTree | None) -> PyTree:
    if masks is None:
        return scores
    return jax.tree.map(  # NaN scores inside the masks still rank above every position outside them
        lambda m, s: s if m is None else allowed_scores(s, m), masks, scores, is_leaf=is_none
    )


def magnitude_masks(
    params: PyTree,
    sparsity: float | Budget | PyTree,
    scope: str = "layer",
    masks: PyTree | None = None,
) -> PyTree:
    """Keeps the largest ``|w|``; with ``masks``, only weights inside them (nested masks, as IMP and GMP need).

    Each pruned leaf of ``N`` weights at sparsity ``s`` keeps exactly ``N - floor(s * N)``
    (:func:`jaxsparse.keep_count`).

    Args:
      params: a pytree of arrays.
      sparsity: a float in ``[0, 1)`` (uniform over :func:`jaxsparse.prunable` leaves), a budget from
        :func:`jaxsparse.budget` (e.g. ERK), or a pytree like ``params`` of per-leaf sparsities (``None`` = dense).
      scope: ``"layer"`` or ``"global"`` (one magnitude threshold across leaves).
      masks: optional current masks (a pytree like ``params``, ``None`` leaves allowed); weights outside them rank
        below every weight inside.

    Returns:
      A pytree like ``params``: ``bool`` masks on the pruned leaves, ``None`` on dense ones.

    Raises:
      ValueError: a sparsity outside ``[0, 1)``, an unknown ``scope`` or mismatched pytrees.

    Example:
      >>> import jax.numpy as jnp
      >>> m = magnitude_masks({"w": jnp.array([[0.1, -3.0], [2.0, 0.5]])}, 0.5)
      >>> m["w"].tolist()
      [[False, True], [True, False]]
    """
    scores = jax.tree.map(lambda p: jnp.abs(p).astype(jnp.float32), params)
    return masks_from_scores(
        _restrict(scores, masks),
        leaf_sparsities(sparsity, params),
        scope,
        layer_axes(sparsity, params),
    )


def random_masks(key: PRNGKeyArray, params: PyTree, sparsity: float | Budget | PyTree) -> PyTree:
    """Uniformly random masks with exact per-leaf counts; independent of the values of ``params``.

    Args:
      key: a PRNG key.
      params: a pytree of arrays (only shapes are read).
      sparsity: a float in ``[0, 1)`` (uniform over :func:`jaxsparse.prunable` leaves), a budget from
        :func:`jaxsparse.budget` (e.g. ERK), or a pytree like ``params`` of per-leaf sparsities (``None`` = dense).

    Returns:
      A pytree like ``params``: ``bool`` masks keeping ``N - floor(s * N)`` of each pruned leaf, ``None`` on dense
      ones.

    Raises:
      ValueError: a sparsity outside ``[0, 1)`` or a per-leaf pytree not shaped like ``params``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> m = random_masks(jax.random.PRNGKey(0), {"w": jnp.zeros((10, 10))}, 0.9)
      >>> int(m["w"].sum())
      10
    """
    sparsities = leaf_sparsities(sparsity, params)
    axes = layer_axes(sparsity, params)
    if axes is None:
        axes = jax.tree.map(lambda s: None, sparsities, is_leaf=is_none)
    leaves = jax.tree.flatten(unwrap(params), is_leaf=is_none)[0]
    flat_s = jax.tree.flatten(sparsities, is_leaf=is_none)[0]
    flat_a = jax.tree.flatten(axes, is_leaf=is_none)[0]
    live = [i for i, s in enumerate(flat_s) if s is not None]
    out: list = [None] * len(leaves)
    if live:  # the hash and the selection run once per group of equally shaped units
        g = _g.grouping([jnp.shape(leaves[i]) for i in live], [flat_a[i] for i in live])
        sizes = [math.prod(jnp.shape(leaves[i])) // g.units[j] for j, i in enumerate(live)]
        ks = _g.per_unit(g, [keep_count(flat_s[i], n) for i, n in zip(live, sizes)])
        picked = _topk.random_top(g, key, len(leaves), tuple(live), ks)
        for i, m in zip(live, _g.unstack(g, picked)):
            out[i] = m
    return jax.tree.unflatten(jax.tree.structure(sparsities, is_leaf=is_none), out)


def snip_masks(
    loss_fn: Callable[..., Array],
    params: PyTree,
    batch: Any,
    sparsity: float | Budget | PyTree,
    scope: str = "global",
) -> PyTree:
    """SNIP (Lee et al. 2019): keeps the largest connection sensitivities ``|w * dL/dw|`` on one batch.

    ``loss_fn(params, batch)`` returns a scalar. ``scope="global"`` is the paper's rule; ``"layer"`` applies the
    budget's per-leaf counts (RigL's implementation).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, differentiable in ``params``.
      params: a pytree of arrays.
      batch: the batch passed to ``loss_fn``.
      sparsity: a float in ``[0, 1)`` (uniform over :func:`jaxsparse.prunable` leaves), a budget from
        :func:`jaxsparse.budget` (e.g. ERK), or a pytree like ``params`` of per-leaf sparsities (``None`` = dense).
      scope: ``"global"`` or ``"layer"``.

    Returns:
      A pytree like ``params``: ``bool`` masks on the pruned leaves, ``None`` on dense ones.

    Raises:
      ValueError: a sparsity outside ``[0, 1)``, an unknown ``scope`` or mismatched pytrees.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p, x: jnp.sum(p["w"] * x)
      >>> snip_masks(loss, {"w": jnp.array([[1.0, 1.0]])}, jnp.array([[3.0, 1.0]]), 0.5)["w"].tolist()
      [[True, False]]
    """
    grads = jax.grad(loss_fn)(params, batch)
    scores = jax.tree.map(lambda p, g: jnp.abs(p * g).astype(jnp.float32), params, grads)
    return masks_from_scores(scores, leaf_sparsities(sparsity, params), scope)
