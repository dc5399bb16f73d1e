"""Sparse Model Soups (Zimmer et al. 2024) and SWAMP (Choi et al. 2024): iterative magnitude pruning whose
retraining trains several copies sharing one mask and averages them.

One round of :func:`sparse_model_soups`, from the current weights ``w`` and masks ``M``:

1. prune: ``M <- jaxsparse.imp_masks(w, M, fraction)`` (global magnitude over the weights still in ``M``, nested);
2. start: ``w0 = apply_masks(rewind_to if given else w, M)``;
3. retrain ``k`` ingredients with ``jax.vmap(train)(w0, M, i)`` for ``i = 0..k-1`` — one compiled program for all of
   them (shard the leading axis over devices to run them in parallel); ``train`` makes ingredient ``i`` differ by
   seed, batch order or a hyperparameter and must keep the weights outside ``M`` at zero (e.g. by training with
   :func:`jaxsparse.fixed_masks`);
4. average: ``w <- mean_i w_i`` (``"uniform"``) or the greedy soup (ingredients in decreasing ``evaluate`` order,
   each kept if the soup's ``evaluate`` does not drop).

SMS is this with no rewinding (each round starts from the soup). SWAMP is this with ``rewind_to`` = the weights at
an early step ``theta_k`` and a ``train`` that returns each particle's stochastic weight average over its trajectory
(:func:`swa_update` keeps that running mean); the average of the particles' SWA weights drives the next prune.
With one ingredient, a round is exactly an IMP round (prune, retrain, no averaging). A mean of exact zeros is an
exact zero, so the soup has exactly the mask's zeros.

Checked: SMS against the authors' code (``ZIB-IOL/SMS``, ``ensembleStrategies.py``: uniform and greedy soups
over ingredients sharing the mask, the next phase starting from the soup). SWAMP's code was not available; its
rule here follows the paper's abstract (particles from one matching ticket, SWA per particle, averaged weights
drive the prune); the number of particles and the SWA window are the caller's choice. BatchNorm statistics of a
soup must be recomputed by the caller (a forward pass over training batches) — there are no batch statistics here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Int, PyTree

from jaxsparse import _validation as v
from jaxsparse._tree import map_live
from jaxsparse.lottery import imp_masks
from jaxsparse.masks import apply_masks

__all__ = ["SoupResult", "soup", "greedy_soup", "swa_update", "sparse_model_soups", "SOUPS"]

SOUPS = ("uniform", "greedy")


class SoupResult(NamedTuple):
    """What :func:`sparse_model_soups` returns: the final soup, its masks and the last round's ingredients
    (stacked on a leading axis of length ``k``)."""

    params: PyTree
    masks: PyTree
    ingredients: PyTree


def soup(ingredients: PyTree, weights: ArrayLike | None = None) -> PyTree:
    """The (weighted) mean over the leading axis of stacked ingredients.

    Args:
      ingredients: a pytree whose leaves are stacked on axis 0 (e.g. the output of a ``vmap``-ed training run).
      weights: optional ``(k,)`` non-negative weights (normalised here); default uniform.

    Returns:
      The soup, shaped like one ingredient. Entries that are zero in every ingredient are exactly zero.

    Example:
      >>> import jax.numpy as jnp
      >>> soup({"w": jnp.array([[1.0, 0.0], [3.0, 0.0]])})["w"].tolist()
      [2.0, 0.0]
    """
    if weights is None:
        return jax.tree.map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), ingredients)
    w = jnp.asarray(weights, jnp.float32)
    if w.ndim != 1 or bool(jnp.any(w < 0)) or float(jnp.sum(w)) <= 0:
        raise ValueError(
            f"`weights` must be a 1-D array of non-negative numbers with a positive sum; got {weights!r}."
        )
    w = w / jnp.sum(w)
    return jax.tree.map(lambda x: jnp.tensordot(w, x, axes=1).astype(x.dtype), ingredients)


def greedy_soup(ingredients: PyTree, evaluate: Callable[[PyTree], float]) -> PyTree:
    """Greedy soup: ingredients in decreasing ``evaluate`` order, each added if the soup's score does not drop.

    Args:
      ingredients: stacked ingredients (leading axis ``k``).
      evaluate: ``params -> float``, higher is better (e.g. validation accuracy); called eagerly ``2k - 1`` times.

    Returns:
      The uniform soup of the chosen ingredients (at least the best one), so its score is ``>=`` the best
      ingredient's.

    Example:
      >>> import jax.numpy as jnp
      >>> stack = {"w": jnp.array([1.0, 2.0, 10.0])}
      >>> float(greedy_soup(stack, lambda p: -abs(float(p["w"]) - 1.6))["w"])
      1.5
    """
    k = jax.tree.leaves(ingredients)[0].shape[0]
    take = lambda i: jax.tree.map(lambda x: x[i], ingredients)
    scores = [float(evaluate(take(i))) for i in range(k)]
    order = sorted(range(k), key=lambda i: -scores[i])
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        trial = soup(jax.tree.map(lambda x: x[jnp.asarray(chosen + [i])], ingredients))
        score = float(evaluate(trial))
        if score >= best:
            chosen, best = chosen + [i], score
    return soup(jax.tree.map(lambda x: x[jnp.asarray(chosen)], ingredients))


def swa_update(average: PyTree, params: PyTree, count: Int[ArrayLike, ""]) -> PyTree:
    """One step of a stochastic weight average: the running mean of ``count`` snapshots plus ``params``.

    ``average`` after ``n`` calls with ``count = 0, 1, ..., n - 1`` is the mean of the ``n`` snapshots.

    Args:
      average: the running mean so far (any values when ``count == 0``).
      params: the new snapshot.
      count: how many snapshots ``average`` holds (may be traced).

    Returns:
      The updated running mean, shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> avg = swa_update({"w": jnp.array(0.0)}, {"w": jnp.array(4.0)}, 0)
      >>> float(swa_update(avg, {"w": jnp.array(2.0)}, 1)["w"])
      3.0
    """
    n = jnp.asarray(count, jnp.float32)
    return jax.tree.map(lambda a, p: (a + (p - a) / (n + 1)).astype(a.dtype), average, params)


def sparse_model_soups(
    train: Callable[[PyTree, PyTree, Array], PyTree],
    params: PyTree,
    *,
    ingredients: int = 3,
    rounds: int = 3,
    fraction: float = 0.54,
    masks: PyTree | None = None,
    rewind_to: PyTree | None = None,
    combine: str = "uniform",
    evaluate: Callable[[PyTree], float] | None = None,
    scope: str = "global",
) -> SoupResult:
    """Sparse Model Soups (or SWAMP, with ``rewind_to``): ``rounds`` of prune, retrain ``k`` ingredients, average.

    Args:
      train: ``(params, masks, index) -> params``: retrains one ingredient (a jittable function, e.g. a
        ``lax.fori_loop`` over a :func:`jaxsparse.fixed_masks` step); ``index`` (a traced int32) selects the
        ingredient's seed / batch order / hyperparameter. It is ``jax.jit(jax.vmap(train))``-ed once.
      params: the (pretrained) starting weights.
      ingredients: ``k``, the number of copies retrained per round (1: plain IMP without rewinding).
      rounds: prune-retrain rounds.
      fraction: share of the remaining weights pruned per round (default 0.54: 90% sparsity after 3 rounds).
      masks: starting masks (default: dense over :func:`jaxsparse.prunable`).
      rewind_to: SWAMP / lottery-ticket rewinding: each round restarts from these weights under the new mask.
      combine: ``"uniform"`` or ``"greedy"`` (needs ``evaluate``).
      evaluate: ``params -> float`` (higher is better) for the greedy soup.
      scope: ``"global"`` (the papers') or ``"layer"`` magnitude pruning, as in :func:`jaxsparse.imp_masks`.

    Returns:
      A :class:`SoupResult` (soup, masks, last round's stacked ingredients).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxsparse
      >>> target = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
      >>> def train(params, masks, i):
      ...     tx = jaxsparse.fixed_masks(optax.sgd(0.1), masks)
      ...     def step(_, carry):
      ...         p, s = carry
      ...         noise = 0.1 * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), i), (8, 4))
      ...         u, s = tx.update({"w": p["w"] - target + noise}, s, p)
      ...         return optax.apply_updates(p, u), s
      ...     return jax.lax.fori_loop(0, 20, step, (params, tx.init(params)))[0]
      >>> res = sparse_model_soups(train, {"w": jnp.zeros((8, 4))}, ingredients=3, rounds=2, fraction=0.5)
      >>> int(res.masks["w"].sum()), bool(((res.params["w"] != 0) <= res.masks["w"]).all())
      (8, True)
      >>> jax.tree.leaves(res.ingredients)[0].shape
      (3, 8, 4)
    """
    v.check_int("ingredients", ingredients, 1)
    v.check_int("rounds", rounds, 1)
    v.check_choice("combine", combine, SOUPS)
    if combine == "greedy" and evaluate is None:
        raise ValueError("combine='greedy' needs `evaluate` (params -> float, higher is better).")
    run = jax.jit(jax.vmap(train, in_axes=(None, None, 0)))
    index = jnp.arange(ingredients, dtype=jnp.int32)
    stacked = None
    for _ in range(rounds):
        masks = imp_masks(params, masks, fraction, scope)
        start = apply_masks(params if rewind_to is None else rewind_to, masks)
        stacked = run(start, masks, index)
        _check_inside(stacked, masks)
        params = greedy_soup(stacked, evaluate) if combine == "greedy" else soup(stacked)
    return SoupResult(params, masks, stacked)


def _check_inside(stacked: PyTree, masks: PyTree) -> None:
    """Every ingredient must keep the weights outside ``masks`` at exactly zero (else the soup would not)."""
    leak = map_live(lambda m, x: int(jnp.sum((x != 0) & ~m)), masks, stacked)
    bad = sum(c for c in jax.tree.leaves(leak))
    if bad:
        raise ValueError(
            f"`train` returned {bad} nonzero weight(s) outside the masks; it must keep pruned weights at zero "
            "(train with jaxsparse.fixed_masks(inner, masks))."
        )
