"""Dynamic sparse training (sparse-to-sparse): static random sparsity, SET, RigL, SNFS and GraNet.

Each algorithm is written once, as its mask rule; :func:`~jaxsparse.transforms._factory.sparse_transform` makes it
an optax transformation that wraps any optax optimizer (``inner`` first, ``seed`` last), built on
:func:`jaxsparse.sparse_training`; ``rigl.rule`` (etc.) is the bare
:class:`~jaxsparse.transforms.common.MaskAlgorithm` factory. The methods differ only in their mask rule:

* :func:`static_sparse` (Liu et al. 2022): a random mask with exact per-leaf counts, never changed.
* :func:`set_training` (Mocanu et al. 2018): every ``update_every`` steps, per leaf drop the
  ``floor(n_active * f(t))`` smallest ``|w|`` and regrow as many uniformly at random among the positions not kept.
* :func:`rigl` (Evci et al. 2020): as SET, but regrow where the *dense* gradient ``|dL/dw|`` is largest.
* :func:`snfs` (Dettmers & Zettlemoyer 2019): regrow where an EMA of dense gradients ("momentum", kept in the
  state by ``observe``) is largest, optionally redistributing the regrowth across layers by mean momentum.
* :func:`granet` (Liu et al. 2021): gradual *global* magnitude pruning (Zhu & Gupta's cubic) plus per-layer
  prune-and-regrow by dense gradient ("zero-cost neuroregeneration").

Conventions shared by all: drop/grow counts are traced ints; inactive positions score ``-inf`` for drop; growth
picks among positions not kept (a just-dropped connection may come back and then keeps its value and moments);
newly grown connections start at exactly 0 with zeroed optimizer moments; mask updates happen at
``begin_step + k * update_every`` (``k >= 1``) up to ``end_step``, inside the one compiled step. The growth
gradient is the ``grads`` passed to ``update``: pruned weights are exactly zero, so ``jax.grad`` of the loss at
``params`` already is the dense gradient there — no second forward pass. (Call
``params = jaxsparse.apply_masks(params, state.masks)`` once after ``init`` if the first gradient must be sparse
too; otherwise the first step zeroes the pruned weights.)

The drop fraction ``f(t)`` is ``drop_fraction`` decayed by ``decay``: ``"cosine"`` (RigL:
``alpha / 2 * (1 + cos(pi * t / end_step))``), ``"linear"`` or ``"constant"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, PyTree

from jaxsparse import _validation as v
from jaxsparse._deprecations import module_getattr
from jaxsparse._tree import is_none, path_name
from jaxsparse.allocation import Budget, keep_count, layer_axes, overall_sparsity
from jaxsparse.masks import random_scores, topk_mask
from jaxsparse.oneshot import leaf_sparsities, random_masks
from jaxsparse.schedules import DECAYS, drop_fraction_schedule, update_gate
from jaxsparse.transforms import _stacked as _st
from jaxsparse.transforms._factory import sparse_transform
from jaxsparse.transforms.common import MaskAlgorithm, MaskContext
from jaxsparse.transforms.growth import drop_scores, prune_and_regrow
from jaxsparse.transforms.pruning import gradual_magnitude_pruning

__all__ = [
    "GROWTH_MODES",
    "SNFSState",
    "static_sparse",
    "set_training",
    "rigl",
    "snfs",
    "granet",
]

GROWTH_MODES = ("gradient", "random", "momentum")
END_FRACTION = 0.75  # RigL: mask updates stop at 75% of training by default


# ------------------------------------------------------------------------------------------------ validation
def _check_sparsity_arg(sparsity: Any) -> None:
    v.check_sparsity_spec("sparsity", sparsity)


def _resolve_end(
    name: str,
    end_step: int | None,
    total_steps: int | None,
    begin_step: int,
    default_fraction: float,
    required: bool = True,
) -> int | None:
    """``end_step`` if given, else ``default_fraction * total_steps``; checks both and the window."""
    v.check_int("begin_step", begin_step, 0)
    if total_steps is not None:
        v.check_int("total_steps", total_steps, 1)
    if end_step is None:
        if total_steps is None:
            if not required:
                return None
            raise ValueError(
                f"{name} needs `total_steps` (mask updates then stop at {default_fraction:g} of it) or an explicit "
                "`end_step`; got neither."
            )
        end_step = int(default_fraction * total_steps)
    v.check_int("end_step", end_step, 0)
    v.check_schedule_window("begin_step", begin_step, "end_step", end_step)
    return end_step


def _check_layers(params: PyTree, sparsities: PyTree, axes: PyTree | None = None) -> None:
    """Every pruned leaf (every layer slice of a stacked one) must keep at least one weight."""
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.flatten(sparsities, is_leaf=is_none)[0]
    flat_a = [None] * len(flat_s) if axes is None else jax.tree.flatten(axes, is_leaf=is_none)[0]
    for (path, p), s, a in zip(flat_p, flat_s, flat_a):
        if s is None or isinstance(s, jax.core.Tracer):
            continue
        if keep_count(s, p.size // (1 if a is None else p.shape[a])) < 1:
            raise ValueError(
                f"`sparsity` {float(s)!r} leaves leaf '{path_name(path)}' (shape {tuple(p.shape)}) with no weights; "
                "every pruned leaf must keep at least one (lower the sparsity or mark the leaf dense)."
            )


# ------------------------------------------------------------------------------------------------ schedules
# ------------------------------------------------------------------------------------------------ rules
def _init_random(sparsity: Any) -> Callable[[PyTree, Array], PyTree]:
    def init_masks(params, key):
        sparsities = leaf_sparsities(sparsity, params)
        axes = layer_axes(sparsity, params)
        _check_layers(params, sparsities, axes)
        return random_masks(key, params, sparsity)

    return init_masks


class SNFSState(NamedTuple):
    """SNFS's own state: the EMA of dense gradients ("momentum"), float32 per pruned leaf (``None`` if dense)."""

    momentum: PyTree


def _ema_init(masks: PyTree, params: PyTree) -> SNFSState:
    return SNFSState(
        jax.tree.map(
            lambda m, p: None if m is None else jnp.zeros(p.shape, jnp.float32),
            masks,
            params,
            is_leaf=is_none,
        )
    )


def _ema_observe(beta: float) -> Callable[[MaskContext], SNFSState]:
    def observe(ctx: MaskContext):
        return SNFSState(
            jax.tree.map(
                lambda e, g: None if e is None else beta * e + (1.0 - beta) * g.astype(jnp.float32),
                ctx.extra.momentum,
                ctx.grads,
                is_leaf=is_none,
            )
        )

    return observe


def _abs_scores(masks: PyTree, tree: PyTree) -> PyTree:
    return jax.tree.map(
        lambda m, x: None if m is None else jnp.abs(x).astype(jnp.float32),
        masks,
        tree,
        is_leaf=is_none,
    )


def _grow_scores(grow: str, ctx: MaskContext, key: Array) -> PyTree:
    if grow == "random":
        return random_scores(key, ctx.masks)
    if grow == "momentum":
        return _abs_scores(ctx.masks, ctx.extra.momentum)
    return _abs_scores(ctx.masks, ctx.grads)


def _redistributed_counts(
    masks: PyTree, momentum: PyTree, fraction: Array, iterations: int
) -> tuple[PyTree, PyTree]:
    """SNFS: per-leaf (n_keep, n_grow); the total dropped is regrown across leaves in proportion to each leaf's
    mean ``|momentum|`` over its active weights, each leaf capped at ``max(0.99 * free, own drop)`` positions.

    The cap-and-redistribute fixed point runs ``iterations`` (= number of leaves + 1) rounds of a ``fori_loop``,
    enough for exact convergence; integer counts use largest remainders so the total is conserved exactly.
    """
    leaves, treedef = jax.tree.flatten(masks, is_leaf=is_none)
    live = [i for i, m in enumerate(leaves) if m is not None]
    ms = [leaves[i] for i in live]
    mom = jax.tree.flatten(momentum, is_leaf=is_none)[0]
    moms = [mom[i] for i in live]
    n_active = jnp.stack([jnp.sum(m, dtype=jnp.int32) for m in ms])
    n_drop = jnp.floor(n_active.astype(jnp.float32) * fraction).astype(jnp.int32)
    n_keep = n_active - n_drop
    sizes = jnp.array([m.size for m in ms], jnp.int32)
    free = sizes - n_keep  # positions growth may use (not kept)
    share = jnp.stack(
        [jnp.sum(jnp.where(m, jnp.abs(x), 0.0)) for m, x in zip(ms, moms)]
    ) / jnp.maximum(n_active, 1)
    share = jnp.where(
        jnp.sum(share) > 0, share, n_drop.astype(jnp.float32)
    )  # all-zero momentum: keep own drops
    total = jnp.sum(n_drop)
    limit = jnp.maximum(0.99 * free.astype(jnp.float32), n_drop.astype(jnp.float32))

    def body(_, saturated):
        rest = total.astype(jnp.float32) - jnp.sum(jnp.where(saturated, limit, 0.0))
        w = jnp.where(saturated, 0.0, share)
        prop = rest * w / jnp.maximum(jnp.sum(w), 1e-30)
        return saturated | (prop > limit)

    saturated = lax.fori_loop(0, iterations, body, jnp.zeros(len(ms), bool))
    rest = total.astype(jnp.float32) - jnp.sum(jnp.where(saturated, limit, 0.0))
    w = jnp.where(saturated, 0.0, share)
    alloc = jnp.where(saturated, limit, rest * w / jnp.maximum(jnp.sum(w), 1e-30))
    base = jnp.minimum(jnp.floor(alloc).astype(jnp.int32), free)
    residual = total - jnp.sum(base)
    room = base < free
    bonus = topk_mask(jnp.where(room, alloc - jnp.floor(alloc), -jnp.inf), residual) & room
    n_grow = base + bonus.astype(jnp.int32)

    def back(xs):
        out = [None] * len(leaves)
        for j, i in enumerate(live):
            out[i] = xs[j]
        return jax.tree.unflatten(treedef, out)

    return back(list(n_keep)), back(list(n_grow))


def _drop_and_grow_rule(
    sparsity: float | Budget | PyTree,
    *,
    grow: str = "gradient",
    update_every: int = 100,
    drop_fraction: float = 0.3,
    decay: str = "cosine",
    begin_step: int = 0,
    end_step: int | None = None,
    drop_noise: float = 0.0,
    momentum: float = 0.9,
    redistribute: bool = False,
    skip_step_on_update: bool = True,
) -> MaskAlgorithm:
    """The generic drop-and-grow rule behind SET (``grow="random"``), RigL (``"gradient"``) and SNFS (``"momentum"``).

    Random initial masks with exact per-leaf counts from ``sparsity`` (a float = uniform, a
    :func:`jaxsparse.budget` such as ERK, or a per-leaf pytree). ``end_step=None`` (only with ``decay="constant"``)
    updates forever. ``redistribute`` (momentum growth only) moves regrowth across leaves (SNFS).
    """
    _check_sparsity_arg(sparsity)
    v.check_choice("grow", grow, GROWTH_MODES)
    v.check_int("update_every", update_every, 1)
    v.check_int("begin_step", begin_step, 0)
    if end_step is not None:
        v.check_int("end_step", end_step, 0)
        v.check_schedule_window("begin_step", begin_step, "end_step", end_step)
    schedule = drop_fraction_schedule(drop_fraction, end_step, decay)
    if (
        isinstance(drop_noise, bool)
        or not isinstance(drop_noise, (int, float))
        or not drop_noise >= 0
    ):
        raise ValueError(f"`drop_noise` must be a float >= 0; got {drop_noise!r}.")
    if grow == "momentum":
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, (int, float))
            or not 0.0 <= momentum < 1.0
        ):
            raise ValueError(f"`momentum` must be a float in [0, 1); got {momentum!r}.")
    if redistribute and grow != "momentum":
        raise ValueError(f"`redistribute=True` needs grow='momentum' (SNFS); got grow={grow!r}.")
    init_masks = _init_random(sparsity)

    def init(params, key):
        masks = init_masks(params, key)
        return masks, (_ema_init(masks, params) if grow == "momentum" else ())

    def update(ctx: MaskContext):
        k_drop, k_grow = jax.random.split(ctx.key)
        fraction = schedule(ctx.step)
        if redistribute:
            scores = _grow_scores(grow, ctx, k_grow)
            n_live = sum(m is not None for m in jax.tree.leaves(ctx.masks, is_leaf=is_none))
            n_keep, n_grow = _redistributed_counts(
                ctx.masks, ctx.extra.momentum, fraction, n_live + 1
            )
            masks, _ = prune_and_regrow(
                ctx.masks,
                drop_scores(ctx.params, ctx.masks, k_drop, drop_noise),
                n_keep,
                scores,
                n_grow,
            )
        else:
            source = ctx.extra.momentum if grow == "momentum" else ctx.grads
            kind = "random" if grow == "random" else "abs"
            masks = _st.drop_and_grow_tree(
                ctx.masks,
                ctx.params,
                kind,
                source,
                fraction,
                k_grow,
                k_drop,
                drop_noise,
                layer_axes(sparsity, ctx.params),
            )
        return masks, ctx.extra

    return MaskAlgorithm(
        init=init,
        update=update,
        is_update=update_gate(update_every, begin_step, end_step, include_begin=False),
        observe=_ema_observe(float(momentum)) if grow == "momentum" else None,
        grows=True,
        skip_step_on_update=bool(skip_step_on_update),
    )


# ------------------------------------------------------------------------------------------------ static
@sparse_transform
def static_sparse(sparsity: float | Budget | PyTree) -> MaskAlgorithm:
    """Static sparse training (random pruning at initialisation): a random mask drawn once from ``seed``.

    Each pruned leaf keeps exactly ``N - floor(s * N)`` weights, uniformly at random; the masks never change.

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      sparsity: a float in ``[0, 1)`` (uniform over :func:`jaxsparse.prunable` leaves), a :func:`jaxsparse.budget`
        (e.g. ERK) or a pytree like ``params`` of per-leaf sparsities (``None`` = dense).
      seed: seeds the PRNG key kept in the state (an int; may be traced under ``vmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`~jaxsparse.SparseState`; ``update``
      needs ``params``. ``static_sparse.rule(...)`` (the arguments without ``inner`` and ``seed``) returns the
      :class:`~jaxsparse.MaskAlgorithm` instead.

    Raises:
      ValueError: a bad ``sparsity``; at ``tx.init``, a leaf the sparsity leaves with no weight.

    Example:
      Example:
      >>> import jax, jax.numpy as jnp, optax, jaxsparse
      >>> params = {"w": jnp.ones((10, 10)), "b": jnp.ones(10)}
      >>> tx = static_sparse(optax.adam(1e-3), jaxsparse.budget(0.9, "erk"))
      >>> state = tx.init(params)
      >>> int(state.masks["w"].sum()), state.masks["b"]
      (10, None)
    """
    _check_sparsity_arg(sparsity)
    init_masks = _init_random(sparsity)
    return MaskAlgorithm(
        init=lambda params, key: (init_masks(params, key), ()),
        update=lambda ctx: (ctx.masks, ctx.extra),
        is_update=lambda step: jnp.zeros((), bool),
    )


# ------------------------------------------------------------------------------------------------ SET
@sparse_transform
def set_training(
    sparsity: float | Budget | PyTree,
    *,
    update_every: int = 100,
    drop_fraction: float = 0.3,
    decay: str = "cosine",
    total_steps: int | None = None,
    end_step: int | None = None,
    begin_step: int = 0,
    skip_step_on_update: bool = True,
) -> MaskAlgorithm:
    """Sparse Evolutionary Training (Mocanu et al. 2018) under RigL's schedule (as in RigL's SET baseline).

    Every ``update_every`` steps until ``end_step`` (default 75% of ``total_steps``; with ``decay="constant"`` it
    may be omitted to update forever), each leaf drops its ``floor(n_active * f(t))`` smallest-magnitude weights
    and regrows as many uniformly at random among the positions not kept, at value 0.

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      sparsity: a float in ``[0, 1)`` (uniform over :func:`jaxsparse.prunable` leaves), a :func:`jaxsparse.budget`
        (e.g. ERK) or a pytree like ``params`` of per-leaf sparsities (``None`` = dense).
      update_every: steps between mask updates (>= 1); the first update is at ``begin_step + update_every``.
      drop_fraction: the fraction of each leaf's active weights dropped, at step 0 (then decayed), in ``[0, 1]``.
      decay: the drop-fraction schedule, ``"cosine"``, ``"linear"`` or ``"constant"``
        (:func:`jaxsparse.drop_fraction_schedule`).
      total_steps: the training length (>= 1), used for the default ``end_step``.
      end_step: the last step a mask may change (default ``0.75 * total_steps``).
      begin_step: the step the schedule starts (>= 0).
      skip_step_on_update: no optimizer step on mask-update steps.
      seed: seeds the PRNG key kept in the state (an int; may be traced under ``vmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`~jaxsparse.SparseState`; ``update``
      needs ``params``. ``set_training.rule(...)`` (the arguments without ``inner`` and ``seed``) returns the
      :class:`~jaxsparse.MaskAlgorithm` instead.

    Raises:
      ValueError: a bad ``sparsity``, ``drop_fraction`` or ``decay``, ``update_every < 1``, neither ``end_step``
        nor ``total_steps`` (when required), ``end_step < begin_step``; at ``tx.init``, a leaf the sparsity leaves
        with no weight.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 8))}
      >>> tx = set_training(optax.sgd(0.1), 0.75, update_every=2, total_steps=8)
      >>> state, step = tx.init(params), jax.jit(tx.update)
      >>> for _ in range(4):
      ...     updates, state = step({"w": jnp.ones((8, 8))}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> int(state.masks["w"].sum()), int((params["w"] != 0).sum()) <= 16
      (16, True)
    """
    v.check_choice("decay", decay, DECAYS)
    end = _resolve_end(
        "set_training",
        end_step,
        total_steps,
        begin_step,
        END_FRACTION,
        required=decay != "constant",
    )
    return _drop_and_grow_rule(
        sparsity,
        grow="random",
        update_every=update_every,
        drop_fraction=drop_fraction,
        decay=decay,
        begin_step=begin_step,
        end_step=end,
        skip_step_on_update=skip_step_on_update,
    )


# ------------------------------------------------------------------------------------------------ RigL
@sparse_transform
def rigl(
    sparsity: float | Budget | PyTree,
    *,
    update_every: int = 100,
    drop_fraction: float = 0.3,
    decay: str = "cosine",
    total_steps: int | None = None,
    end_step: int | None = None,
    begin_step: int = 0,
    drop_noise: float = 1e-5,
    skip_step_on_update: bool = True,
) -> MaskAlgorithm:
    """RigL (Evci et al. 2020): drop by magnitude, regrow by dense-gradient magnitude, inside one compiled step.

    Defaults are the paper's: update every 100 steps, drop fraction 0.3 cosine-decayed to 0 at ``end_step``
    (75% of ``total_steps`` unless given; one of the two is required), ``N(0, 1e-5)`` tie-breaking noise on drop
    scores, new connections at 0 with zeroed optimizer moments, and no optimizer step on update iterations
    (``skip_step_on_update=True``). Pass the gradient of the loss at ``params`` (pruned weights are zero, so it is
    the dense gradient).

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      sparsity: a float in ``[0, 1)`` (uniform over :func:`jaxsparse.prunable` leaves), a :func:`jaxsparse.budget`
        (e.g. ERK) or a pytree like ``params`` of per-leaf sparsities (``None`` = dense).
      update_every: steps between mask updates (>= 1); the first update is at ``begin_step + update_every``.
      drop_fraction: the fraction of each leaf's active weights dropped, at step 0 (then decayed), in ``[0, 1]``.
      decay: the drop-fraction schedule, ``"cosine"``, ``"linear"`` or ``"constant"``
        (:func:`jaxsparse.drop_fraction_schedule`).
      total_steps: the training length (>= 1), used for the default ``end_step``.
      end_step: the last step a mask may change (default ``0.75 * total_steps``).
      begin_step: the step the schedule starts (>= 0).
      drop_noise: the standard deviation of the Gaussian noise added to drop scores (>= 0).
      skip_step_on_update: no optimizer step on mask-update steps.
      seed: seeds the PRNG key kept in the state (an int; may be traced under ``vmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`~jaxsparse.SparseState`; ``update``
      needs ``params``. ``rigl.rule(...)`` (the arguments without ``inner`` and ``seed``) returns the
      :class:`~jaxsparse.MaskAlgorithm` instead.

    Raises:
      ValueError: a bad ``sparsity``, ``drop_fraction`` or ``decay``, ``update_every < 1``, ``drop_noise < 0``,
        neither ``end_step`` nor ``total_steps`` (when required), ``end_step < begin_step``; at ``tx.init``, a leaf
        the sparsity leaves with no weight.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxsparse
      >>> params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 16)), "b": jnp.zeros(16)}
      >>> tx = rigl(optax.adam(1e-3), jaxsparse.budget(0.8, "erk"), update_every=5, total_steps=100)
      >>> state = tx.init(params)
      >>> step = jax.jit(tx.update)
      >>> for t in range(20):
      ...     grads = jax.tree.map(lambda p: jnp.cos(p + t), params)
      ...     updates, state = step(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> int(state.masks["w"].sum()), int((params["w"] != 0).sum()) <= int(state.masks["w"].sum())
      (52, True)
    """
    v.check_choice("decay", decay, DECAYS)
    end = _resolve_end("rigl", end_step, total_steps, begin_step, END_FRACTION)
    return _drop_and_grow_rule(
        sparsity,
        grow="gradient",
        update_every=update_every,
        drop_fraction=drop_fraction,
        decay=decay,
        begin_step=begin_step,
        end_step=end,
        drop_noise=drop_noise,
        skip_step_on_update=skip_step_on_update,
    )


# ------------------------------------------------------------------------------------------------ SNFS
@sparse_transform
def snfs(
    sparsity: float | Budget | PyTree,
    *,
    update_every: int = 100,
    drop_fraction: float = 0.5,
    decay: str = "cosine",
    total_steps: int | None = None,
    end_step: int | None = None,
    begin_step: int = 0,
    momentum: float = 0.9,
    redistribute: bool = True,
    skip_step_on_update: bool = True,
) -> MaskAlgorithm:
    """Sparse Networks From Scratch (Dettmers & Zettlemoyer 2019): sparse momentum growth.

    The state keeps an EMA (``momentum``, default 0.9) of the dense gradients of pruned leaves, updated every step
    — independent of the inner optimizer (``state.extra`` is a :class:`SNFSState`; ``state.extra.momentum`` is the
    EMA, a pytree like ``params`` with ``None`` for dense leaves). On update steps each leaf drops ``floor(n_active * f(t))`` smallest
    ``|w|`` (prune rate 0.5 cosine-decayed to 0 at ``end_step``, default ``total_steps``). With ``redistribute``
    (default), the total dropped is regrown across leaves in proportion to each leaf's mean ``|EMA|`` over its
    active weights (capped per leaf, fixed-point in a ``lax.fori_loop``), so the *network* nnz is conserved;
    without it, each leaf regrows what it dropped (RigL's "momentum" baseline). Growth picks the largest
    ``|EMA|`` among positions not kept.

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      sparsity: a float in ``[0, 1)`` (uniform over :func:`jaxsparse.prunable` leaves), a :func:`jaxsparse.budget`
        (e.g. ERK) or a pytree like ``params`` of per-leaf sparsities (``None`` = dense).
      update_every: steps between mask updates (>= 1); the first update is at ``begin_step + update_every``.
      drop_fraction: the fraction of each leaf's active weights dropped, at step 0 (then decayed), in ``[0, 1]``.
      decay: the drop-fraction schedule, ``"cosine"``, ``"linear"`` or ``"constant"``
        (:func:`jaxsparse.drop_fraction_schedule`).
      total_steps: the training length (>= 1), the default ``end_step``.
      end_step: the last step a mask may change (default ``total_steps``).
      begin_step: the step the schedule starts (>= 0).
      momentum: the EMA coefficient of the dense gradients, in ``[0, 1)``.
      redistribute: regrow across leaves by mean ``|EMA|`` (``False``: each leaf regrows what it dropped).
      skip_step_on_update: no optimizer step on mask-update steps.
      seed: seeds the PRNG key kept in the state (an int; may be traced under ``vmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`~jaxsparse.SparseState`; ``update``
      needs ``params``. ``snfs.rule(...)`` (the arguments without ``inner`` and ``seed``) returns the
      :class:`~jaxsparse.MaskAlgorithm` instead.

    Raises:
      ValueError: a bad ``sparsity``, ``drop_fraction`` or ``decay``, ``update_every < 1``, ``momentum`` outside
        ``[0, 1)``, neither ``end_step`` nor ``total_steps`` (when required), ``end_step < begin_step``; at
        ``tx.init``, a leaf the sparsity leaves with no weight.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"a": jax.random.normal(jax.random.PRNGKey(0), (8, 8)), "b": jnp.ones((8, 4))}
      >>> tx = snfs(optax.sgd(0.1, momentum=0.9), 0.5, update_every=2, total_steps=10)
      >>> state, step = tx.init(params), jax.jit(tx.update)
      >>> for _ in range(4):
      ...     updates, state = step({"a": jnp.zeros((8, 8)), "b": jnp.ones((8, 4))}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> int(state.masks["a"].sum() + state.masks["b"].sum())
      48
    """
    v.check_choice("decay", decay, DECAYS)
    end = _resolve_end("snfs", end_step, total_steps, begin_step, 1.0)
    return _drop_and_grow_rule(
        sparsity,
        grow="momentum",
        update_every=update_every,
        drop_fraction=drop_fraction,
        decay=decay,
        begin_step=begin_step,
        end_step=end,
        momentum=momentum,
        redistribute=redistribute,
        skip_step_on_update=skip_step_on_update,
    )


# ------------------------------------------------------------------------------------------------ GraNet
@sparse_transform
def granet(
    sparsity: float | Budget | PyTree,
    *,
    total_steps: int | None = None,
    prune_end_step: int | None = None,
    regrow_end_step: int | None = None,
    begin_step: int = 0,
    update_every: int = 100,
    drop_fraction: float = 0.5,
    decay: str = "cosine",
    initial_sparsity: float = 0.0,
    scope: str = "global",
    power: float = 3.0,
    skip_step_on_update: bool = False,
) -> MaskAlgorithm:
    """GraNet (Liu et al. 2021): gradual magnitude pruning with zero-cost neuroregeneration.

    Every ``update_every`` steps from ``begin_step``: (1) prune by magnitude (``scope="global"``: one threshold over
    all pruned leaves, GraNet's rule; ``"layer"``: GraNet-uniform) to Zhu & Gupta's cubic sparsity from
    ``initial_sparsity`` to ``sparsity``, reached at ``prune_end_step`` (default 75% of ``total_steps``); then
    (2) per leaf drop ``floor(n_active * r(t))`` smallest ``|w|`` and regrow as many where the dense gradient is
    largest, ``r`` decaying from ``drop_fraction`` (0.5) to 0 at ``regrow_end_step`` (default ``total_steps``).
    ``initial_sparsity > 0`` starts from a random mask (sparse-to-sparse); 0 starts dense. With
    ``drop_fraction=0`` this is exactly :func:`~jaxsparse.gradual_magnitude_pruning`.

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      sparsity: the final sparsity: a float in ``[0, 1)`` (uniform over :func:`jaxsparse.prunable` leaves), a
        :func:`jaxsparse.budget` (e.g. ERK) or a pytree like ``params`` of per-leaf sparsities (``None`` = dense).
      total_steps: the training length (>= 1), for the default ``prune_end_step`` and ``regrow_end_step``.
      prune_end_step: the step ``sparsity`` is reached (default ``0.75 * total_steps``).
      regrow_end_step: the step the regrowth fraction reaches 0 (default ``total_steps``).
      begin_step: the first pruning step (>= 0).
      update_every: steps between mask updates (>= 1).
      drop_fraction: the fraction of each leaf's active weights regrown, at step 0 (then decayed), in ``[0, 1]``.
      decay: the regrowth-fraction schedule, ``"cosine"``, ``"linear"`` or ``"constant"``.
      initial_sparsity: the sparsity at ``begin_step``, in ``[0, 1)`` and <= the final sparsity.
      scope: ``"global"`` or ``"layer"`` magnitude pruning.
      power: the exponent of the sparsity schedule (3: cubic).
      skip_step_on_update: no optimizer step on mask-update steps.
      seed: seeds the PRNG key kept in the state (an int; may be traced under ``vmap``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`~jaxsparse.SparseState`; ``update``
      needs ``params``. ``granet.rule(...)`` (the arguments without ``inner`` and ``seed``) returns the
      :class:`~jaxsparse.MaskAlgorithm` instead.

    Raises:
      ValueError: a bad ``sparsity``, ``initial_sparsity``, ``decay``, ``scope`` or ``power``, neither
        ``total_steps`` nor both end steps, an end step before ``begin_step``, ``update_every < 1``, or
        ``initial_sparsity`` above the final sparsity.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jax.random.normal(jax.random.PRNGKey(0), (10, 10))}
      >>> tx = granet(optax.sgd(0.01), 0.9, total_steps=12, update_every=2)
      >>> state, step = tx.init(params), jax.jit(tx.update)
      >>> for t in range(12):
      ...     updates, state = step({"w": jnp.full((10, 10), 0.1)}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> int(state.masks["w"].sum())
      10
    """
    _check_sparsity_arg(sparsity)
    v.check_choice("decay", decay, DECAYS)
    if prune_end_step is None or regrow_end_step is None:
        if total_steps is None:
            raise ValueError(
                "granet needs `total_steps` or both `prune_end_step` and `regrow_end_step`; got neither."
            )
    prune_end = _resolve_end("granet", prune_end_step, total_steps, begin_step, END_FRACTION)
    regrow_end = _resolve_end("granet", regrow_end_step, total_steps, begin_step, 1.0)
    v.check_schedule_window("begin_step", begin_step, "regrow_end_step", regrow_end)
    v.check_int("update_every", update_every, 1)
    initial_sparsity = v.check_sparsity("initial_sparsity", initial_sparsity)
    if (
        v.is_scalar(sparsity)
        and not isinstance(sparsity, jax.core.Tracer)
        and initial_sparsity > sparsity
    ):
        raise ValueError(
            f"`initial_sparsity` ({initial_sparsity}) must be <= `sparsity` ({sparsity})."
        )
    prune = gradual_magnitude_pruning.rule(
        sparsity, begin_step, prune_end, update_every, initial_sparsity, scope, power
    )
    schedule = drop_fraction_schedule(drop_fraction, regrow_end, decay)

    def init(params, key):
        finals = leaf_sparsities(sparsity, params)
        _check_layers(params, finals)
        if initial_sparsity == 0.0:
            return prune.init(params, key)
        final = overall_sparsity(finals, params)
        if initial_sparsity > final:
            raise ValueError(
                f"`initial_sparsity` ({initial_sparsity}) must be <= the final sparsity ({final:.4g})."
            )
        ratio = initial_sparsity / final
        return random_masks(
            key,
            params,
            jax.tree.map(lambda s: None if s is None else s * ratio, finals, is_leaf=is_none),
        ), ()

    def update(ctx: MaskContext):
        masks, _ = prune.update(ctx)
        axes = layer_axes(sparsity, ctx.params)
        return _st.drop_and_grow_tree(
            masks, ctx.params, "abs", ctx.grads, schedule(ctx.step), None, None, 0.0, axes
        ), ctx.extra

    return MaskAlgorithm(
        init=init,
        update=update,
        is_update=update_gate(update_every, begin_step, regrow_end),
        grows=True,
        skip_step_on_update=bool(skip_step_on_update),
    )


__getattr__ = module_getattr(
    __name__,
    {
        "sparse_evolutionary_training": ("jaxsparse.set_training", set_training),
        "dst_algorithm": (
            "jaxsparse.rigl.rule / set_training.rule / snfs.rule",
            _drop_and_grow_rule,
        ),
        "static_sparse_algorithm": ("jaxsparse.static_sparse.rule", static_sparse.rule),
        "set_algorithm": ("jaxsparse.set_training.rule", set_training.rule),
        "rigl_algorithm": ("jaxsparse.rigl.rule", rigl.rule),
        "snfs_algorithm": ("jaxsparse.snfs.rule", snfs.rule),
        "granet_algorithm": ("jaxsparse.granet.rule", granet.rule),
    },
)
