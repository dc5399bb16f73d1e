"""Pruning-at-initialisation scores beyond SNIP: GraSP (Wang et al. 2020) and SynFlow (Tanaka et al. 2020).

Both return bool masks with the exact counts of :func:`jaxsparse.masks_from_scores` (``N - floor(s * N)`` kept per
leaf, or that total over all leaves with ``scope="global"``, the papers' rule); ``None`` for dense leaves.

* :func:`grasp_masks`: score ``-w * (H g)`` on one batch (``H g``, a Hessian-gradient product, by one ``jvp`` of
  ``grad``); GraSP removes the *largest* scores (weights whose removal reduces gradient flow least), so the kept
  ones are the smallest. Checked against the authors' rule as reproduced in public GraSP ports
  (``grads = -weight * weight.grad`` after back-propagating ``sum(grad_w * grad_f)``, remove the top
  ``int(N * (1 - keep_ratio))`` of the normalised scores); the authors compute the loss on logits divided by a
  temperature ``T = 200``: pass such a loss.
* :func:`synflow_masks`: data-free. ``R = sum(f(1; |w| * mask))`` (all-ones input, absolute weights); score
  ``|w * dR/dw|``; ``iterations`` rounds of global pruning to densities ``d ** ((k + 1) / iterations)`` (the
  authors' exponential schedule, 100 rounds), each round scoring the weights still in the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from jaxsparse import _validation as v
from jaxsparse._tree import is_none, map_live
from jaxsparse.allocation import Budget
from jaxsparse.oneshot import SCOPES, leaf_sparsities, masks_from_scores

__all__ = ["grasp_masks", "synflow_masks"]


def grasp_masks(
    loss_fn: Callable[[PyTree, Any], Array],
    params: PyTree,
    batch: Any,
    sparsity: float | Budget | PyTree,
    scope: str = "global",
) -> PyTree:
    """GraSP: keeps the smallest ``-w * (H g)`` (removes the weights whose removal least reduces gradient flow).

    Args:
      loss_fn: ``(params, batch) -> scalar`` (the authors divide the logits by ``T = 200``).
      params: the initial weights.
      batch: one batch (the authors use ten samples per class).
      sparsity: a float, a :func:`jaxsparse.budget` or a per-leaf pytree (``None`` = dense).
      scope: ``"global"`` (the paper's) or ``"layer"``.

    Returns:
      Bool masks (``None`` for dense leaves).

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p, x: 0.5 * jnp.sum((x @ p["w"]) ** 2)  # H = x^T x = diag(1, 4, 1), g = H w
      >>> w = {"w": jnp.array([[1.0], [-1.0], [1.5]])}
      >>> m = grasp_masks(loss, w, jnp.diag(jnp.array([1.0, 2.0, 1.0])), 1 / 3)
      >>> m["w"].ravel().tolist()  # -w * (H g) = [-1, -16, -2.25]: the largest (w0) is removed
      [False, True, True]
    """
    v.check_choice("scope", scope, SCOPES)
    grad = lambda p: jax.grad(loss_fn)(p, batch)
    g = grad(params)
    hg = jax.jvp(grad, (params,), (g,))[1]
    scores = jax.tree.map(
        lambda w, h: (w * h).astype(jnp.float32), params, hg
    )  # keep largest w * Hg
    return masks_from_scores(scores, leaf_sparsities(sparsity, params), scope)


def synflow_masks(
    apply_fn: Callable[[PyTree, Array], Array],
    params: PyTree,
    input_shape: Sequence[int],
    sparsity: float | Budget | PyTree,
    iterations: int = 100,
    scope: str = "global",
) -> PyTree:
    """SynFlow: iterative, data-free pruning by synaptic flow ``|w * dR/dw|``, ``R = sum(f(1; |w|))``.

    Args:
      apply_fn: ``(params, x) -> outputs``; run on ``|params|`` (masked) and an all-ones input. Use the
        model in inference mode (BatchNorm with its running statistics).
      params: the initial weights.
      input_shape: shape of the all-ones input, batch axis included (e.g. ``(1, 784)``).
      sparsity: a float, a :func:`jaxsparse.budget` or a per-leaf pytree (``None`` = dense).
      iterations: pruning rounds (the authors' 100).
      scope: ``"global"`` (the paper's) or ``"layer"``.

    Returns:
      Bool masks (``None`` for dense leaves), nested over the rounds.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> f = lambda p, x: x @ p["a"] @ p["b"]
      >>> params = {"a": jnp.array([[1.0, 1.0], [1.0, 4.0]]), "b": jnp.array([[1.0], [0.1]])}
      >>> m = synflow_masks(f, params, (1, 2), {"a": 0.5, "b": None}, iterations=1)
      >>> m["a"].tolist(), m["b"]
      ([[True, False], [True, False]], None)
    """
    v.check_choice("scope", scope, SCOPES)
    v.check_int("iterations", iterations, 1)
    finals = leaf_sparsities(sparsity, params)
    ones = jnp.ones(tuple(int(d) for d in input_shape), jnp.result_type(*jax.tree.leaves(params)))
    masks = map_live(lambda s, p: jnp.ones(p.shape, bool), finals, params)

    @jax.jit
    def scores_of(masks):
        def flow(p):
            return jnp.sum(apply_fn(p, ones))

        abs_p = jax.tree.map(
            lambda m, p: jnp.abs(p) if m is None else jnp.where(m, jnp.abs(p), 0.0),
            masks,
            params,
            is_leaf=is_none,
        )
        g = jax.grad(flow)(abs_p)
        return map_live(
            lambda m, p, d: jnp.where(m, jnp.abs(p * d).astype(jnp.float32), -jnp.inf),
            masks,
            abs_p,
            g,
        )

    for k in range(iterations):
        frac = (k + 1) / iterations
        round_sparsity = map_live(lambda s: 1.0 - (1.0 - s) ** frac, finals)
        masks = masks_from_scores(scores_of(masks), round_sparsity, scope)
    return masks
