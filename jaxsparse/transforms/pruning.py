"""Dense-to-sparse and fixed-mask training: fixed masks, one-shot pruning during training, gradual magnitude
pruning (Zhu & Gupta 2017).

Each algorithm is written once, as its mask rule, and made an optax transformation around any optax optimizer by
:func:`~jaxsparse.transforms._factory.sparse_transform`; ``gradual_magnitude_pruning.rule`` (etc.) is the bare
:class:`~jaxsparse.transforms.common.MaskAlgorithm` factory for composing new methods.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from jaxsparse import _validation as v
from jaxsparse._deprecations import module_getattr
from jaxsparse._scores import allowed_scores, masks_from_counts
from jaxsparse._tree import check_same_structure, is_none, map_live
from jaxsparse.allocation import Budget, keep_count, layer_axes, overall_sparsity
from jaxsparse.masks import random_scores
from jaxsparse.oneshot import SCOPES, leaf_sparsities, masks_from_scores
from jaxsparse.schedules import polynomial_sparsity, update_gate
from jaxsparse.transforms._factory import sparse_transform
from jaxsparse.transforms.common import MaskAlgorithm, MaskContext

__all__ = [
    "fixed_masks",
    "one_shot_pruning",
    "gradual_magnitude_pruning",
    "ONE_SHOT_METHODS",
]

ONE_SHOT_METHODS = ("magnitude", "random", "snip")


def _never(step):
    return jnp.zeros((), bool)


def _ones_like_budget(params: PyTree, sparsities: PyTree) -> PyTree:
    return map_live(lambda s, p: jnp.ones(p.shape, bool), sparsities, params)


@sparse_transform
def fixed_masks(masks: PyTree) -> MaskAlgorithm:
    """Trains inside fixed ``masks``: pruned weights are zeroed on the first step and stay exactly zero.

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      masks: a pytree like ``params`` of ``bool`` masks (True = trained) or ``None`` (dense leaf).
      seed: seeds the PRNG key kept in the state (an int; may be traced under ``vmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`~jaxsparse.SparseState`; ``update``
      needs ``params``. ``fixed_masks.rule(...)`` (the arguments without ``inner`` and ``seed``) returns the
      :class:`~jaxsparse.MaskAlgorithm` instead.

    Raises:
      TypeError: a mask leaf that is not boolean.
      ValueError: at ``tx.init``, ``masks`` not shaped like ``params`` (structure or leaf shapes).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones((2, 2))}
      >>> tx = fixed_masks(optax.sgd(0.1), {"w": jnp.eye(2, dtype=bool)})
      >>> updates, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
      >>> optax.apply_updates(params, updates)["w"].tolist()
      [[0.8999999761581421, 0.0], [0.0, 0.8999999761581421]]
    """
    for m in jax.tree.leaves(masks):
        if jnp.result_type(m) != jnp.bool_:
            raise TypeError(f"`masks` leaves must be bool arrays; got dtype {jnp.result_type(m)}.")

    def init(params, key):
        check_same_structure("masks", masks, "params", params)
        bad = [
            (m.shape, p.shape)
            for m, p in zip(*(jax.tree.flatten(t, is_leaf=is_none)[0] for t in (masks, params)))
            if m is not None and m.shape != p.shape
        ]
        if bad:
            raise ValueError(
                f"`masks` leaves must have their params' shapes; got mask/param shapes {bad}."
            )
        return map_live(lambda m: jnp.asarray(m, bool), masks), ()

    return MaskAlgorithm(init=init, update=lambda ctx: (ctx.masks, ctx.extra), is_update=_never)


@sparse_transform
def one_shot_pruning(
    sparsity: float | Budget | PyTree,
    method: str = "magnitude",
    scope: str = "layer",
    step: int = 0,
) -> MaskAlgorithm:
    """Dense training until ``step``, then a one-shot prune by ``method``, then training inside the mask.

    At ``step`` the masks are computed from the params (and gradients) passed to that update:
    ``"magnitude"`` keeps the largest ``|w|``, ``"snip"`` the largest ``|w * g|``, ``"random"`` a random subset;
    each pruned leaf keeps exactly ``N - floor(s * N)`` (or that total with ``scope="global"``).

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      sparsity: a float in ``[0, 1)`` (uniform over :func:`jaxsparse.prunable` leaves), a :func:`jaxsparse.budget`
        (e.g. ERK) or a pytree like ``params`` of per-leaf sparsities (``None`` = dense).
      method: ``"magnitude"``, ``"snip"`` or ``"random"``.
      scope: ``"layer"`` or ``"global"``.
      step: the step of the prune (>= 0).
      seed: seeds the PRNG key kept in the state (an int; may be traced under ``vmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`~jaxsparse.SparseState`; ``update``
      needs ``params``. ``one_shot_pruning.rule(...)`` (the arguments without ``inner`` and ``seed``) returns the
      :class:`~jaxsparse.MaskAlgorithm` instead.

    Raises:
      ValueError: a bad ``sparsity``, ``method`` or ``scope``, or ``step < 0``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.array([[1.0, -4.0], [3.0, 0.5]])}
      >>> tx = one_shot_pruning(optax.sgd(0.0), 0.5)
      >>> updates, state = tx.update({"w": jnp.zeros((2, 2))}, tx.init(params), params)
      >>> optax.apply_updates(params, updates)["w"].tolist()
      [[0.0, -4.0], [3.0, 0.0]]
    """
    v.check_choice("method", method, ONE_SHOT_METHODS)
    v.check_choice("scope", scope, SCOPES)
    v.check_int("step", step, 0)
    _check_sparsity_arg(sparsity)

    def init(params, key):
        return _ones_like_budget(params, leaf_sparsities(sparsity, params)), ()

    def update(ctx: MaskContext):
        sparsities = leaf_sparsities(sparsity, ctx.params)
        if method == "magnitude":
            scores = jax.tree.map(lambda p: jnp.abs(p).astype(jnp.float32), ctx.params)
        elif method == "snip":
            scores = jax.tree.map(
                lambda p, g: jnp.abs(p * g).astype(jnp.float32), ctx.params, ctx.grads
            )
        else:
            scores = random_scores(ctx.key, ctx.params)
        return masks_from_scores(scores, sparsities, scope), ctx.extra

    return MaskAlgorithm(init=init, update=update, is_update=update_gate(1, step, step))


def _check_sparsity_arg(sparsity: Any) -> None:
    v.check_sparsity_spec("sparsity", sparsity)


@sparse_transform
def gradual_magnitude_pruning(
    sparsity: float | Budget | PyTree,
    begin_step: int,
    end_step: int,
    frequency: int = 100,
    initial_sparsity: float = 0.0,
    scope: str = "layer",
    power: float = 3.0,
) -> MaskAlgorithm:
    """Zhu & Gupta's gradual magnitude pruning around any optax optimizer.

    Every ``frequency`` steps in ``[begin_step, end_step]``, magnitude masks at the cubic schedule's sparsity.
    Per-leaf targets scale with the schedule (``s_l(t) = s_t * s_l / s_final``), so a uniform budget follows ``s_t``
    exactly and ERK keeps its proportions; pruning is nested (monotone).

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      sparsity: the final sparsity: a float in ``[0, 1)`` (uniform over :func:`jaxsparse.prunable` leaves), a
        :func:`jaxsparse.budget` (e.g. ERK) or a pytree like ``params`` of per-leaf sparsities (``None`` = dense).
      begin_step: the first pruning step (>= 0).
      end_step: the step the final sparsity is reached (>= ``begin_step``); masks stay fixed after it.
      frequency: steps between mask updates (>= 1).
      initial_sparsity: the sparsity at ``begin_step``, in ``[0, 1)`` and <= the final sparsity.
      scope: ``"layer"`` (each leaf its own count) or ``"global"`` (one magnitude threshold over all leaves).
      power: the exponent of the schedule (> 0; 3: cubic), as in :func:`jaxsparse.polynomial_sparsity`.
      seed: seeds the PRNG key kept in the state (an int; may be traced under ``vmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`~jaxsparse.SparseState`; ``update``
      needs ``params``. ``gradual_magnitude_pruning.rule(...)`` (the arguments without ``inner`` and
      ``seed``) returns the :class:`~jaxsparse.MaskAlgorithm` instead.

    Raises:
      ValueError: a bad ``sparsity``, ``scope``, ``initial_sparsity`` or ``power``, a bad window
        (``end_step < begin_step``, ``frequency < 1``), or (at ``tx.init``) ``initial_sparsity`` above the final
        sparsity.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 8))}
      >>> tx = gradual_magnitude_pruning(optax.sgd(0.01), 0.75, begin_step=0, end_step=4, frequency=2)
      >>> state = tx.init(params)
      >>> for _ in range(5):
      ...     updates, state = tx.update({"w": jnp.zeros((8, 8))}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> int((params["w"] == 0).sum())
      48
    """
    _check_sparsity_arg(sparsity)
    v.check_choice("scope", scope, SCOPES)
    gate = update_gate(frequency, begin_step, end_step)
    polynomial_sparsity(
        0.5, begin_step, end_step, frequency, 0.0, power
    )  # validates the window eagerly
    initial_sparsity = v.check_sparsity("initial_sparsity", initial_sparsity)

    def targets(params, step):
        finals = leaf_sparsities(sparsity, params)
        final = overall_sparsity(finals, params)
        if not isinstance(final, jax.core.Tracer) and initial_sparsity > final:
            raise ValueError(
                f"`initial_sparsity` ({initial_sparsity}) must be <= the final sparsity ({final:.4g})."
            )
        s_t = polynomial_sparsity(final, begin_step, end_step, frequency, initial_sparsity, power)(
            step
        )
        # the ratio in Python doubles: exactly 1.0 for a uniform budget, so every leaf follows s_t exactly
        return map_live(lambda s: s_t * (s / final), finals)

    def prune(params, step, masks):
        """Magnitude masks at the schedule's counts; from ``end_step`` on exactly the final budget's counts
        (:func:`jaxsparse.keep_count` in Python doubles, as every other API), not float32 arithmetic. Stacked
        leaves (a budget's ``layer_axis``) keep their count in every layer slice."""
        finals = leaf_sparsities(sparsity, params)
        axes = layer_axes(sparsity, params)
        if axes is None:
            axes = jax.tree.map(lambda f: None, finals, is_leaf=is_none)
        done = jnp.asarray(step) >= end_step

        def count(s, f, p, a):
            n = p.size // (1 if a is None else p.shape[a])
            return jnp.where(done, keep_count(f, n), keep_count(s, n))

        ks = map_live(
            lambda f, s, p, a: count(s, f, p, a), finals, targets(params, step), params, axes
        )
        scores = map_live(lambda f, p: jnp.abs(p).astype(jnp.float32), finals, params)
        if masks is not None:  # nested: only weights inside the current masks can stay
            scores = jax.tree.map(
                lambda m, x: x if m is None else allowed_scores(x, m),
                masks,
                scores,
                is_leaf=is_none,
            )
        return masks_from_counts(scores, ks, scope, axes)

    def init(params, key):
        finals = leaf_sparsities(sparsity, params)
        if initial_sparsity == 0.0:
            return _ones_like_budget(params, finals), ()
        return prune(params, 0, None), ()

    def update(ctx: MaskContext):
        return prune(ctx.params, ctx.step, ctx.masks), ctx.extra

    return MaskAlgorithm(init=init, update=update, is_update=gate)


__getattr__ = module_getattr(
    __name__,
    {
        "fixed_masks_algorithm": ("jaxsparse.fixed_masks.rule", fixed_masks.rule),
        "one_shot_algorithm": ("jaxsparse.one_shot_pruning.rule", one_shot_pruning.rule),
        "gmp_algorithm": (
            "jaxsparse.gradual_magnitude_pruning.rule",
            gradual_magnitude_pruning.rule,
        ),
    },
)
