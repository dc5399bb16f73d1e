"""Movement pruning (Sanh, Wolf & Rush 2020), hard and soft, for fine-tuning a dense model.

Each pruned weight matrix ``W`` gets a score tensor ``S`` of its shape, trained alongside it (keep the scores as
extra leaves of the trained pytree, e.g. ``{"params": params, "scores": scores}``). The forward pass uses
``W * M(S)``; the binarizer's backward is the identity (straight-through), so ``dL/dS = dL/dW' * W`` — with plain
SGD, ``S`` accumulates ``-lr * sum_t g_t * W_t``, the weights' *movement* away from zero — and
``dL/dW = dL/dW' * M``.

* hard (``method="topk"``): ``M = TopK(S, threshold)`` keeps the ``int(threshold * N)`` largest scores of each
  matrix (``threshold`` = fraction kept);
* soft (``method="sigmoid"``): ``M = sigmoid(S) > threshold``, plus the penalty
  ``lambda_t * movement_regularizer(scores)`` (mean over matrices of ``mean(sigmoid(S))``) added to the loss.

:func:`movement_schedule` gives ``(threshold_t, lambda_t)``: ``initial_threshold`` held for
``initial_warmup * warmup_steps`` steps, cubic decay to ``final_threshold``, held for the last
``final_warmup * warmup_steps`` steps, and ``lambda_t = final_lambda * threshold_t / final_threshold``.

Checked against the authors' code (``huggingface/transformers``, ``examples/research_projects/movement-pruning``:
``masked_run_glue.py`` ``schedule_threshold`` and ``regularization``, ``emmental/modules/binarizer.py``): the
schedule and penalty above are theirs; the sigmoid binarizer keeps at least ``int(0.005 * N) + 1`` weights per
matrix (their ``min_elements`` floor) — here the floor is the top-scored ones. Freezing the result for sparse
fine-tuning: ``masks = movement_masks(scores, final_threshold)``, then ``jaxsparse.fixed_masks(inner, masks)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PyTree

from jaxsparse import _validation as v
from jaxsparse._tree import is_none, map_live
from jaxsparse.allocation import prunable
from jaxsparse.masks import topk_mask

__all__ = [
    "MOVEMENT_METHODS",
    "init_movement_scores",
    "movement_masked",
    "movement_masks",
    "movement_regularizer",
    "movement_schedule",
]

MOVEMENT_METHODS = ("topk", "sigmoid")
MIN_KEPT = 0.005  # the sigmoid binarizer's floor: int(0.005 * N) + 1 weights per matrix


def init_movement_scores(
    params: PyTree, value: float = 0.0, *, where: PyTree | None = None
) -> PyTree:
    """Scores shaped like the pruned leaves (``where``, default :func:`jaxsparse.prunable`), ``None`` elsewhere.

    Args:
      params: the model's params.
      value: initial score (the authors' ``mask_init="constant"``, ``mask_scale=0``).
      where: a pytree of Python bools shaped like ``params`` selecting the pruned leaves.

    Returns:
      The scores pytree (float32 leaves; ``None`` for dense leaves).

    Example:
      >>> import jax.numpy as jnp
      >>> s = init_movement_scores({"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)})
      >>> s["kernel"].shape, s["bias"]
      ((3, 2), None)
    """
    where = prunable(params) if where is None else where
    return jax.tree.map(
        lambda sel, p: jnp.full(p.shape, value, jnp.float32) if sel else None, where, params
    )


def _binary(score: Array, threshold: Array, method: str) -> Array:
    if method == "topk":
        return topk_mask(score, jnp.floor(threshold * score.size).astype(jnp.int32))
    floor = int(MIN_KEPT * score.size) + 1
    return (jax.nn.sigmoid(score) > threshold) | topk_mask(score, floor)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _masked(w, score, threshold, method):
    return w * _binary(score, threshold, method).astype(w.dtype)


def _masked_fwd(w, score, threshold, method):
    mask = _binary(score, threshold, method).astype(w.dtype)
    return w * mask, (w, mask, threshold)


def _masked_bwd(method, res, g):
    w, mask, threshold = res
    return g * mask, (g * w).astype(jnp.float32), jnp.zeros_like(threshold)


_masked.defvjp(_masked_fwd, _masked_bwd)


def _check_method(method: str) -> None:
    v.check_choice("method", method, MOVEMENT_METHODS)


def movement_masked(
    params: PyTree, scores: PyTree, threshold: Float[ArrayLike, ""], method: str = "topk"
) -> PyTree:
    """The effective params ``W * M(S)`` with the straight-through backward (call inside the loss).

    Args:
      params: the weights.
      scores: :func:`init_movement_scores`-shaped scores (``None`` leaves stay dense).
      threshold: ``"topk"``: fraction of each matrix kept; ``"sigmoid"``: the threshold on ``sigmoid(S)``. May be
        traced (from :func:`movement_schedule`).
      method: ``"topk"`` (hard movement pruning) or ``"sigmoid"`` (soft).

    Returns:
      The params with masked leaves; gradients reach ``params`` through the mask and ``scores`` as ``g * W``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w, s = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}, {"w": jnp.array([0.0, 3.0, 1.0, 2.0])}
      >>> movement_masked(w, s, 0.5)["w"].tolist()
      [0.0, 2.0, 0.0, 4.0]
      >>> jax.grad(lambda s: movement_masked(w, s, 0.5)["w"].sum())(s)["w"].tolist()  # g * W
      [1.0, 2.0, 3.0, 4.0]
    """
    _check_method(method)
    t = jnp.asarray(threshold, jnp.float32)
    return jax.tree.map(
        lambda s, p: p if s is None else _masked(p, s, t, method), scores, params, is_leaf=is_none
    )


def movement_masks(scores: PyTree, threshold: Float[ArrayLike, ""], method: str = "topk") -> PyTree:
    """The bool masks ``M(S)`` (``None`` for dense leaves): what :func:`movement_masked` applies.

    Use it to freeze the result of movement pruning (``jaxsparse.fixed_masks(inner, masks)``).

    Args:
      scores: the trained scores (``None`` leaves stay ``None``).
      threshold: as :func:`movement_masked`.
      method: ``"topk"`` or ``"sigmoid"``.

    Returns:
      Bool masks shaped like the score leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> movement_masks({"w": jnp.array([0.0, 3.0, 1.0, 2.0]), "b": None}, 0.25)["w"].tolist()
      [False, True, False, False]
    """
    _check_method(method)
    t = jnp.asarray(threshold, jnp.float32)
    return map_live(lambda s: _binary(s, t, method), scores)


def movement_regularizer(scores: PyTree) -> Float[Array, ""]:
    """Soft movement pruning's L1 penalty: the mean over score leaves of ``mean(sigmoid(S))``.

    Add ``lambda_t * movement_regularizer(scores)`` to the loss (``lambda_t`` from :func:`movement_schedule`).

    Args:
      scores: the scores pytree (``None`` leaves ignored).

    Returns:
      A float32 scalar in ``(0, 1)``.

    Example:
      >>> import jax.numpy as jnp
      >>> float(movement_regularizer({"a": jnp.zeros(4), "b": None}))
      0.5
    """
    leaves = [s for s in jax.tree.leaves(scores, is_leaf=is_none) if s is not None]
    if not leaves:
        raise ValueError("`scores` has no array leaves; expected at least one score tensor.")
    return sum(jnp.mean(jax.nn.sigmoid(s)) for s in leaves) / len(leaves)


def movement_schedule(
    total_steps: int,
    warmup_steps: int,
    *,
    initial_threshold: float = 1.0,
    final_threshold: float = 0.1,
    initial_warmup: float = 1.0,
    final_warmup: float = 2.0,
    final_lambda: float = 0.0,
) -> Callable[[ArrayLike], tuple[Float[Array, ""], Float[Array, ""]]]:
    """``step -> (threshold_t, lambda_t)``: the authors' cubic threshold schedule with warm-ups.

    Defaults are hard movement pruning to 10% kept (``initial_threshold=1``: nothing pruned at first). For soft
    movement pruning the authors use ``initial_threshold=0``, a small ``final_threshold`` (e.g. 0.1) on
    ``sigmoid(S)`` and ``final_lambda`` of order 100 s.

    Args:
      total_steps: training length.
      warmup_steps: the learning-rate warm-up length; the warm-ups below are multiples of it.
      initial_threshold, final_threshold: threshold before / after the cubic decay.
      initial_warmup, final_warmup: hold the initial / final threshold for this many ``warmup_steps``.
      final_lambda: penalty weight at the final threshold (soft movement pruning).

    Returns:
      The schedule (traced steps welcome).

    Example:
      >>> f = movement_schedule(100, 10, final_threshold=0.2)
      >>> [round(float(f(t)[0]), 4) for t in (0, 10, 45, 80, 81, 100)]
      [1.0, 1.0, 0.3, 0.2, 0.2, 0.2]
    """
    v.check_int("total_steps", total_steps, 1)
    v.check_int("warmup_steps", warmup_steps, 0)
    for name, x in (
        ("initial_threshold", initial_threshold),
        ("final_threshold", final_threshold),
        ("initial_warmup", initial_warmup),
        ("final_warmup", final_warmup),
        ("final_lambda", final_lambda),
    ):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"`{name}` must be a finite float >= 0; got {x!r}.")
    if final_threshold == 0:
        raise ValueError(
            "`final_threshold` must be > 0 (lambda_t is proportional to threshold_t / it)."
        )
    begin = initial_warmup * warmup_steps
    span = total_steps - (initial_warmup + final_warmup) * warmup_steps
    if span <= 0:
        raise ValueError(
            f"the warm-ups ({initial_warmup} + {final_warmup}) * {warmup_steps} steps leave no room in "
            f"`total_steps`={total_steps}."
        )

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        coeff = jnp.clip(1.0 - (t - begin) / span, 0.0, 1.0)
        threshold = final_threshold + (initial_threshold - final_threshold) * coeff**3
        threshold = jnp.where(t <= begin, initial_threshold, threshold)
        threshold = jnp.where(
            t > total_steps - final_warmup * warmup_steps, final_threshold, threshold
        )
        threshold = threshold.astype(jnp.float32)
        return threshold, (final_lambda * threshold / final_threshold).astype(jnp.float32)

    return schedule
