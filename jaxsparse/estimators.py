"""Forward-time estimators: the forward pass sees sparse weights, the backward pass decides what the dense
weights learn.

Every function here maps a params pytree to the *effective* params the model should use, and is meant to be
called on ``params`` inside ``loss_fn``::

    def loss_fn(params, batch):
        return model_loss(ste_nm(params, 2, 4), batch)

The masks are recomputed from the weights on every call (N:M: ``m`` comparisons per entry, no sort), so nothing
has to be stored between steps. Step-dependent quantities (``beta``, ``alpha``, the structure-decay frame) are
traced scalars from the schedules below, so the whole train step stays one compiled function.

* :func:`ste_nm`: N:M forward ``W * E(W)``, straight-through (identity) backward (Zhou et al. 2021). SR-STE is this
  forward plus :func:`jaxsparse.transforms.nm.sr_ste_decay` in the optimizer chain.
* :func:`decayed_nm` + :func:`mask_decay_schedule`: PGF mask decay (MDGF), pruned weights enter scaled by
  ``beta_t``.
* :func:`structure_decayed_nm` + :func:`structure_decay`: PGF structure decay (SDGF), the pattern steps through
  denser N':M' frames to the target.
* :func:`soft_nm` + :func:`init_sste_scale`: S-STE, a continuous N:M soft threshold with a frozen per-tensor scale.
* :func:`annealed_masking`, :func:`annealed_nm`, :func:`annealed_topk`, :func:`autosparse_threshold` +
  :func:`gradient_annealing_schedule`: gradient annealing (AutoSparse), the gradient reaching masked weights is
  ``alpha_t * g``.

Leaves are selected by ``where``: ``None`` (default, :func:`jaxsparse.prunable`: float leaves with ``ndim >= 2``),
a pytree of Python bools shaped like ``params``, or a callable ``params -> that pytree``. N:M groups run along
``axis`` (default -2: the input axis of a Flax ``(in, out)`` kernel, the ``I`` axis of ``HWIO``).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from jaxsparse import _validation as v
from jaxsparse._tree import check_same_structure, is_none, path_name
from jaxsparse._where import Where, check_nm_leaf, check_where, map_selected, selection
from jaxsparse.allocation import Budget
from jaxsparse.masks import nm_mask
from jaxsparse.oneshot import magnitude_masks

__all__ = [
    "nm_masks",
    "transposable_nm_mask",
    "ste_nm",
    "annealed_masking",
    "annealed_nm",
    "annealed_topk",
    "autosparse_threshold",
    "init_thresholds",
    "decayed_nm",
    "StructureDecay",
    "structure_decay",
    "structure_decayed_nm",
    "soft_nm",
    "init_sste_scale",
    "STRUCTURE_DECAY_KINDS",
    "BACKWARDS",
]

STRUCTURE_DECAY_KINDS = ("stepwise", "geometric")
BACKWARDS = ("ste", "scaled")
_ENUMERATE_MAX_M = 4  # transposable masks: exhaustive pattern search up to 4x4 blocks


@functools.cache
def _transposable_patterns(n: int, m: int) -> np.ndarray:
    """All m x m 0/1 matrices with n ones in every row and column, as a (m*m, P) float32 matrix."""
    rows = [np.isin(np.arange(m), c) for c in itertools.combinations(range(m), n)]
    pats = [np.stack(r) for r in itertools.product(rows, repeat=m)]
    pats = [p for p in pats if (p.sum(axis=0) == n).all()]
    return np.stack([p.reshape(-1) for p in pats], axis=1).astype(np.float32)


def transposable_nm_mask(
    score: Float[ArrayLike, "... r c"], n: int, m: int
) -> Bool[Array, "... r c"]:
    """An N:M mask along *both* of the last two axes: every ``m x m`` block has ``n`` kept per row and column.

    So ``W`` and ``W.T`` are both N:M along their contraction axes, and ``dX = dY @ W.T`` can use N:M too (the
    "transposable" masks of Hubara et al. 2021 / Hu et al. 2024). For ``m <= 4`` the block pattern with the largest
    total score is found exactly (a matmul against the 90 patterns of 2:4, 24 of 1:4, ...); for ``m > 4`` the block
    keeps the ``n`` best of the ``m`` cyclic diagonals ``{(i, (i + s) % m)}`` (valid, not optimal).

    Args:
      score: a float array with ndim >= 2 whose last two dimensions are divisible by ``m``; larger is kept.
      n: weights kept per group (1 <= n <= m).
      m: group size (<= 16).

    Returns:
      A ``bool`` array shaped like ``score`` with ``n`` True per row and per column of every ``m x m`` block.

    Raises:
      ValueError: bad ``n``/``m``, ``score.ndim < 2`` or a last dimension not divisible by ``m``.
      TypeError: ``score`` is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> mask = transposable_nm_mask(jnp.arange(16.0).reshape(4, 4), 2, 4)
      >>> mask.sum(axis=0).tolist(), mask.sum(axis=1).tolist()
      ([2, 2, 2, 2], [2, 2, 2, 2])
    """
    score = jnp.asarray(score)
    n, m = v.check_nm(n, m)
    v.check_float_array("score", score)
    if score.ndim < 2:
        raise ValueError(
            f"`score` must have ndim >= 2 for a transposable mask; got shape {score.shape}."
        )
    v.check_divisible("score", score.shape, score.ndim - 2, m)
    v.check_divisible("score", score.shape, score.ndim - 1, m)
    *lead, r, c = score.shape
    x = score.astype(jnp.float32).reshape(*lead, r // m, m, c // m, m)
    x = jnp.swapaxes(x, -3, -2)  # (..., R, C, m_row, m_col)
    if m <= _ENUMERATE_MAX_M:
        pats = jnp.asarray(_transposable_patterns(n, m))
        best = jnp.argmax(x.reshape(*x.shape[:-2], m * m) @ pats, axis=-1)
        blocks = pats.T[best].reshape(x.shape) > 0.5
    else:
        i = jnp.arange(m)
        shift = (i[None, :] - i[:, None]) % m  # diagonal index of (row, col)
        onehot = shift[None] == jnp.arange(m)[:, None, None]  # (s, m, m)
        diag = jnp.einsum("...ij,sij->...s", x, onehot.astype(jnp.float32))
        keep = nm_mask(diag, n, m, axis=-1)  # the n best diagonals
        blocks = jnp.take_along_axis(keep[..., None, :], jnp.broadcast_to(shift, x.shape), axis=-1)
    return jnp.swapaxes(blocks, -3, -2).reshape(score.shape)


def _leaf_nm_mask(leaf: Array, n: int, m: int, ax: int, transposable: bool) -> Array:
    if transposable:
        return transposable_nm_mask(jnp.abs(leaf), n, m)
    return nm_mask(jnp.abs(leaf), n, m, ax)


def nm_masks(
    params: PyTree,
    n: int = 2,
    m: int = 4,
    *,
    axis: int = -2,
    transposable: bool = False,
    where: Where = None,
) -> PyTree:
    """Magnitude N:M masks (``bool``) for the selected leaves of ``params``, ``None`` for the others.

    Each group of ``m`` consecutive entries along ``axis`` keeps its ``n`` largest ``|w|`` (ties: lower index).

    Args:
      params: a pytree of arrays.
      n: weights kept per group (1 <= n <= m).
      m: group size (<= 16); must divide the leaf's ``axis``.
      axis: the axis the groups of ``m`` run along (default -2, the input axis of a Flax kernel).
      transposable: N:M along both of the last two axes (:func:`transposable_nm_mask`; ``axis`` must then be the
        second-to-last).
      where: the leaves to sparsify: ``None`` (:func:`jaxsparse.prunable`), a pytree of Python bools shaped like
        ``params``, or a callable ``params -> that pytree``; the others pass through.

    Returns:
      A pytree like ``params``: ``bool`` masks on the selected leaves, ``None`` elsewhere.

    Raises:
      ValueError: bad ``n``/``m``/``axis``, a selected leaf whose ``axis`` is not divisible by ``m``, or ``where``
        not shaped like ``params``.
      TypeError: a selected leaf is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> masks = nm_masks({"w": jnp.array([[1.0], [-4.0], [3.0], [2.0]]), "b": jnp.ones(1)}, 2, 4)
      >>> masks["w"].ravel().tolist(), masks["b"]
      ([False, True, True, False], None)
    """
    n, m = v.check_nm(n, m)
    check_where(where)
    picks = selection(params, where)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for (path, leaf), pick in zip(flat, picks):
        if pick:
            ax = check_nm_leaf(path_name(path), leaf, n, m, axis, transposable)
            out.append(_leaf_nm_mask(leaf, n, m, ax, transposable))
        else:
            out.append(None)
    return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------------------------------------ STE
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _ste_leaf(w, n, m, ax, transposable):
    return jnp.where(_leaf_nm_mask(w, n, m, ax, transposable), w, jnp.zeros((), w.dtype))


def _ste_fwd(w, n, m, ax, transposable):
    return _ste_leaf(w, n, m, ax, transposable), None


def _ste_bwd(n, m, ax, transposable, _, g):
    return (g,)


_ste_leaf.defvjp(_ste_fwd, _ste_bwd)


def ste_nm(
    params: PyTree,
    n: int = 2,
    m: int = 4,
    *,
    axis: int = -2,
    transposable: bool = False,
    where: Where = None,
) -> PyTree:
    """N:M forward with a straight-through backward: forward ``W * E(W)``, gradient w.r.t. ``W`` = gradient w.r.t.
    the effective weights (dense, unmasked).

    ``E`` keeps the ``n`` largest ``|w|`` of every ``m`` consecutive entries along ``axis`` (ties: lower index),
    recomputed on each call. With ``transposable=True`` the mask is N:M along both of the last two axes
    (:func:`transposable_nm_mask`). Call it on ``params`` inside ``loss_fn``; for SR-STE add
    ``jaxsparse.transforms.nm.sr_ste_decay`` to the optimizer.

    Args:
      params: a pytree of arrays (the dense trained weights).
      n: weights kept per group (1 <= n <= m).
      m: group size (<= 16); must divide the leaf's ``axis``.
      axis: the axis the groups of ``m`` run along (default -2, the input axis of a Flax kernel).
      transposable: N:M along both of the last two axes (:func:`transposable_nm_mask`; ``axis`` must then be the
        second-to-last).
      where: the leaves to sparsify: ``None`` (:func:`jaxsparse.prunable`), a pytree of Python bools shaped like
        ``params``, or a callable ``params -> that pytree``; the others pass through.

    Returns:
      The effective params: selected leaves masked N:M, the others unchanged.

    Raises:
      ValueError: bad ``n``/``m``/``axis``, a selected leaf whose ``axis`` is not divisible by ``m``, or ``where``
        not shaped like ``params``.
      TypeError: a selected leaf is not a floating-point array.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> w = {"kernel": jnp.array([[1.0], [-4.0], [3.0], [2.0]])}
      >>> ste_nm(w, 2, 4)["kernel"].ravel().tolist()
      [0.0, -4.0, 3.0, 0.0]
      >>> jax.grad(lambda p: ste_nm(p, 2, 4)["kernel"].sum())(w)["kernel"].ravel().tolist()
      [1.0, 1.0, 1.0, 1.0]
    """
    n, m = v.check_nm(n, m)
    check_where(where)

    def one(name, leaf):
        ax = check_nm_leaf(name, leaf, n, m, axis, transposable)
        return _ste_leaf(leaf, n, m, ax, transposable)

    return map_selected(one, params, where)


# ------------------------------------------------------------------------------------------------ gradient annealing
@jax.custom_vjp
def _annealed_leaf(w, mask, alpha):
    return jnp.where(mask, w, jnp.zeros((), w.dtype))


def _annealed_fwd(w, mask, alpha):
    return _annealed_leaf(w, mask, alpha), (mask, alpha)


def _annealed_bwd(res, g):
    mask, alpha = res
    return jnp.where(mask, g, (alpha * g).astype(g.dtype)), None, None


_annealed_leaf.defvjp(_annealed_fwd, _annealed_bwd)


def _check_unit_scalar(name: str, value: Any) -> Array:
    """A real scalar in [0, 1] (checked when concrete; traced values pass through) as float32."""
    if not isinstance(value, jax.core.Tracer):
        a = np.asarray(value)
        if a.ndim != 0 or not np.issubdtype(a.dtype, np.number):
            raise TypeError(f"`{name}` must be a real scalar; got {value!r}.")
        if not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"`{name}` must be in [0, 1]; got {float(a)}.")
    return jnp.asarray(value, jnp.float32)


def annealed_masking(params: PyTree, masks: PyTree, alpha: Float[ArrayLike, ""]) -> PyTree:
    """Hard masking forward, annealed backward: forward ``W * M``; gradient ``g`` on kept and ``alpha * g`` on masked
    coordinates (``alpha = 1``: straight-through; ``alpha = 0``: plain hard masking). Leaves with a ``None`` mask pass
    through. ``alpha`` may be traced (e.g. :func:`gradient_annealing_schedule` of the step).

    Args:
      params: a pytree of arrays.
      masks: a pytree like ``params`` of boolean masks (True = kept) or ``None``.
      alpha: the gradient scale on masked coordinates, a real scalar in ``[0, 1]`` (checked when concrete).

    Returns:
      The masked params.

    Raises:
      ValueError: ``alpha`` outside ``[0, 1]`` or ``masks`` not shaped like ``params``.
      TypeError: ``alpha`` is not a real scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p, mk = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([True, False])}
      >>> jax.grad(lambda p: annealed_masking(p, mk, 0.25)["w"].sum())(p)["w"].tolist()
      [1.0, 0.25]
    """
    alpha = _check_unit_scalar("alpha", alpha)
    check_same_structure("masks", masks, "params", params)
    return jax.tree.map(
        lambda mk, p: p if mk is None else _annealed_leaf(p, jnp.asarray(mk, bool), alpha),
        masks,
        params,
        is_leaf=is_none,
    )


def annealed_nm(
    params: PyTree,
    alpha: Float[ArrayLike, ""],
    n: int = 2,
    m: int = 4,
    *,
    axis: int = -2,
    transposable: bool = False,
    where: Where = None,
) -> PyTree:
    """Gradient annealing on magnitude N:M masks recomputed each call (``alpha = 1`` is :func:`ste_nm`).

    :func:`nm_masks` of the (stop-gradient) params, then :func:`annealed_masking`.

    Args:
      params: a pytree of arrays.
      alpha: the gradient scale on pruned coordinates, a real scalar in ``[0, 1]``; may be traced.
      n: weights kept per group (1 <= n <= m).
      m: group size (<= 16); must divide the leaf's ``axis``.
      axis: the axis the groups of ``m`` run along (default -2, the input axis of a Flax kernel).
      transposable: N:M along both of the last two axes (:func:`transposable_nm_mask`; ``axis`` must then be the
        second-to-last).
      where: the leaves to sparsify: ``None`` (:func:`jaxsparse.prunable`), a pytree of Python bools shaped like
        ``params``, or a callable ``params -> that pytree``; the others pass through.

    Returns:
      The effective params: selected leaves masked N:M, the others unchanged.

    Raises:
      ValueError: as :func:`nm_masks` and :func:`annealed_masking`.
      TypeError: as :func:`nm_masks` and :func:`annealed_masking`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = {"w": jnp.array([[1.0], [-4.0], [3.0], [2.0]])}
      >>> jax.grad(lambda p: annealed_nm(p, 0.5, 2, 4)["w"].sum())(p)["w"].ravel().tolist()
      [0.5, 1.0, 1.0, 0.5]
    """
    masks = nm_masks(
        jax.lax.stop_gradient(params), n, m, axis=axis, transposable=transposable, where=where
    )
    return annealed_masking(params, masks, alpha)


def annealed_topk(
    params: PyTree, alpha: Float[ArrayLike, ""], sparsity: float | Budget | PyTree
) -> PyTree:
    """Gradient annealing on per-leaf magnitude top-k masks (AutoSparse's fixed-budget "Top-K + GA" variant).

    ``sparsity`` is a float (uniform over the default prunable leaves), a :func:`jaxsparse.budget`, or a per-leaf
    pytree; each leaf keeps exactly ``size - floor(s * size)`` weights (top-k with no sort).

    Args:
      params: a pytree of arrays.
      alpha: the gradient scale on pruned coordinates, a real scalar in ``[0, 1]``; may be traced.
      sparsity: a float in ``[0, 1)``, a :func:`jaxsparse.budget` or a per-leaf pytree of sparsities (``None`` =
        not pruned), as for :func:`jaxsparse.magnitude_masks`.

    Returns:
      The effective params: pruned leaves masked, the others unchanged.

    Raises:
      ValueError: as :func:`jaxsparse.magnitude_masks` and :func:`annealed_masking`.
      TypeError: as :func:`jaxsparse.magnitude_masks` and :func:`annealed_masking`.

    Example:
      >>> import jax.numpy as jnp
      >>> out = annealed_topk({"w": jnp.arange(1.0, 11.0).reshape(5, 2)}, 0.1, 0.8)
      >>> int((out["w"] != 0).sum())
      2
    """
    masks = magnitude_masks(jax.lax.stop_gradient(params), sparsity)
    return annealed_masking(params, masks, alpha)


@jax.custom_vjp
def _threshold_leaf(w, s, alpha):
    tau = jax.nn.sigmoid(s).astype(w.dtype)
    return jnp.sign(w) * jnp.maximum(jnp.abs(w) - tau, 0)


def _threshold_fwd(w, s, alpha):
    return _threshold_leaf(w, s, alpha), (w, s, alpha)


def _threshold_bwd(res, g):
    w, s, alpha = res
    tau = jax.nn.sigmoid(s).astype(w.dtype)
    gx = jnp.where(
        jnp.abs(w) > tau, g, (alpha * g).astype(g.dtype)
    )  # gradient reaching x = |w| - tau, times sign
    dw = gx  # sign(w) * d|w|/dw = 1
    dtau = -jnp.sum((jnp.sign(w) * gx).astype(jnp.float32))
    ds = (dtau * jax.nn.sigmoid(s) * (1 - jax.nn.sigmoid(s))).astype(jnp.result_type(s))
    return dw, jnp.reshape(ds, jnp.shape(s)), None


_threshold_leaf.defvjp(_threshold_fwd, _threshold_bwd)


def init_thresholds(params: PyTree, init: float = -5.0, *, where: Where = None) -> PyTree:
    """One learnable threshold logit ``s`` per selected leaf (``tau = sigmoid(s)``), ``None`` for the others.

    Train these alongside ``params`` (e.g. ``{"params": params, "thresholds": thresholds}``) and use
    :func:`autosparse_threshold`; the default ``-5.0`` starts at ``tau = 0.0067``.

    Args:
      params: a pytree of arrays.
      init: the initial logit, a finite float.
      where: the leaves to sparsify: ``None`` (:func:`jaxsparse.prunable`), a pytree of Python bools shaped like
        ``params``, or a callable ``params -> that pytree``; the others pass through.

    Returns:
      A pytree like ``params``: a float32 scalar ``init`` on the selected leaves, ``None`` elsewhere.

    Raises:
      ValueError: a non-finite ``init``, an empty ``where`` or one not shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> init_thresholds({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})
      {'b': None, 'w': Array(-5., dtype=float32)}
    """
    check_where(where)
    init = float(init)
    if not math.isfinite(init):
        raise ValueError(f"`init` must be a finite float (a threshold logit); got {init}.")
    picks = selection(params, where)
    flat, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(
        treedef, [jnp.asarray(init, jnp.float32) if p else None for p in picks]
    )


def autosparse_threshold(params: PyTree, thresholds: PyTree, alpha: Float[ArrayLike, ""]) -> PyTree:
    """AutoSparse (Kundu et al. 2023): learnable per-leaf thresholds with gradient annealing.

    Forward ``sign(W) * relu(|W| - tau)`` with ``tau = sigmoid(s)`` per leaf (STR-style soft threshold, so the
    sparsity is learned, not set). Backward: ``dW = g`` where ``|W| > tau`` and ``alpha * g`` on masked coordinates;
    ``s`` receives the matching gradient ``-sum(sign(W) * dW) * sigmoid'(s)``. Leaves whose threshold is ``None`` pass
    through.

    Args:
      params: a pytree of arrays.
      thresholds: a pytree like ``params`` of scalar logits ``s`` or ``None`` (from :func:`init_thresholds`).
      alpha: the gradient scale on thresholded coordinates, a real scalar in ``[0, 1]``; may be traced.

    Returns:
      The soft-thresholded params.

    Raises:
      ValueError: ``alpha`` outside ``[0, 1]`` or ``thresholds`` not shaped like ``params``.
      TypeError: ``alpha`` is not a real scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p, th = {"w": jnp.array([0.5, -0.001])}, {"w": jnp.asarray(-5.0)}
      >>> autosparse_threshold(p, th, 0.1)["w"][1].item()
      -0.0
      >>> jax.grad(lambda p: autosparse_threshold(p, th, 0.1)["w"].sum())(p)["w"].tolist()
      [1.0, 0.10000000149011612]
    """
    alpha = _check_unit_scalar("alpha", alpha)
    check_same_structure("thresholds", thresholds, "params", params)
    return jax.tree.map(
        lambda s, p: p if s is None else _threshold_leaf(p, s, alpha),
        thresholds,
        params,
        is_leaf=is_none,
    )


# ------------------------------------------------------------------------------------------------ PGF: mask decay
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _decayed_leaf(w, beta, n, m, ax, scaled):
    mask = _leaf_nm_mask(w, n, m, ax, False)
    return jnp.where(mask, w, (beta * w).astype(w.dtype))


def _decayed_fwd(w, beta, n, m, ax, scaled):
    out = _decayed_leaf(w, beta, n, m, ax, scaled)
    return out, ((_leaf_nm_mask(w, n, m, ax, False), beta) if scaled else None)


def _decayed_bwd(n, m, ax, scaled, res, g):
    if not scaled:
        return g, None
    mask, beta = res
    return jnp.where(mask, g, (beta * g).astype(g.dtype)), None


_decayed_leaf.defvjp(_decayed_fwd, _decayed_bwd)


def decayed_nm(
    params: PyTree,
    beta: Float[ArrayLike, ""],
    n: int = 2,
    m: int = 4,
    *,
    axis: int = -2,
    backward: str = "ste",
    where: Where = None,
) -> PyTree:
    """PGF mask decay (MDGF, Bambhaniya et al. 2024): forward ``W * (E + beta * (1 - E))`` with the N:M magnitude mask
    ``E`` recomputed each call; ``beta = 1`` is dense, ``beta = 0`` is hard N:M.

    ``backward="ste"`` (the reference code) passes the gradient through unscaled; ``"scaled"`` multiplies the gradient
    of pruned weights by ``beta`` (the true derivative of the forward). ``beta`` is a traced scalar, typically
    ``mask_decay_schedule(...)(step)``.

    Args:
      params: a pytree of arrays.
      beta: the weight of pruned entries in the forward, a real scalar in ``[0, 1]``; may be traced.
      n: weights kept per group (1 <= n <= m).
      m: group size (<= 16); must divide the leaf's ``axis``.
      axis: the axis the groups of ``m`` run along (default -2, the input axis of a Flax kernel).
      backward: ``"ste"`` or ``"scaled"``.
      where: the leaves to sparsify: ``None`` (:func:`jaxsparse.prunable`), a pytree of Python bools shaped like
        ``params``, or a callable ``params -> that pytree``; the others pass through.

    Returns:
      The effective params.

    Raises:
      ValueError: bad ``n``/``m``/``axis``/``backward``, ``beta`` outside ``[0, 1]``, a selected leaf whose ``axis``
        is not divisible by ``m``, or ``where`` not shaped like ``params``.
      TypeError: a selected leaf is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> decayed_nm({"w": jnp.array([[1.0], [-4.0], [3.0], [2.0]])}, 0.5, 2, 4)["w"].ravel().tolist()
      [0.5, -4.0, 3.0, 1.0]
    """
    n, m = v.check_nm(n, m)
    v.check_choice("backward", backward, BACKWARDS)
    check_where(where)
    beta = _check_unit_scalar("beta", beta)

    def one(name, leaf):
        ax = check_nm_leaf(name, leaf, n, m, axis)
        return _decayed_leaf(leaf, beta, n, m, ax, backward == "scaled")

    return map_selected(one, params, where)


# ------------------------------------------------------------------------------------------------ PGF: structure decay
class StructureDecay(NamedTuple):
    """A structure-decay (SDGF) plan: N:M ``frames`` applied over equal spans of ``[begin_step, end_step)``, dense
    before ``begin_step`` and the last frame (the target) from ``end_step`` on."""

    frames: tuple[tuple[int, int], ...]
    begin_step: int
    end_step: int

    def frame_index(self, step: Int[ArrayLike, ""]) -> Int[Array, ""]:
        """-1 before ``begin_step``, then ``floor(F * (t - begin) / (end - begin))``, ``F - 1`` from ``end_step``."""
        t = jnp.asarray(step, jnp.int32)
        f = len(self.frames)
        idx = (t - self.begin_step) * f // (self.end_step - self.begin_step)
        return jnp.where(t < self.begin_step, -1, jnp.clip(idx, 0, f - 1)).astype(jnp.int32)


def _stepwise_frames(n: int, m: int) -> list[tuple[int, int]]:
    ks = [m - 1]
    k = m // 2
    while k > n:
        ks.append(k)
        k //= 2
    ks.append(n)
    out: list[int] = []
    for k in ks:
        if k >= n and (not out or k < out[-1]):
            out.append(k)
    return [(k, m) for k in out]


def _geometric_frames(n: int, m: int) -> list[tuple[int, int]]:
    return [(n * 2**j, m * 2**j) for j in (3, 2, 1, 0) if m * 2**j <= v.MAX_NM_M]


def structure_decay(
    n: int, m: int, *, begin_step: int = 0, end_step: int, kind: str = "stepwise"
) -> StructureDecay:
    """PGF structure decay (SDGF): the N:M pattern steps through denser frames to the target ``n:m``.

    * ``"stepwise"``: ``(m-1):m, (m/2):m, (m/4):m, ..., n:m`` (e.g. 1:8: 7:8, 4:8, 2:8, 1:8), density decreasing;
    * ``"geometric"``: ``n*2^j : m*2^j`` for j = 3, 2, 1, 0 (constant density, coarse to fine groups); frames with a
      group size above 16 are left out (this library's N:M supports ``m <= 16``).

    Each frame holds for an equal share of ``[begin_step, end_step)``; the target holds from ``end_step`` on.

    Args:
      n: the target's kept weights per group (1 <= n <= m).
      m: the target's group size (<= 16).
      begin_step: the first step of the first frame (>= 0); the forward is dense before it.
      end_step: the step the target ``n:m`` starts; at least one step per frame after ``begin_step``.
      kind: ``"stepwise"`` or ``"geometric"``.

    Returns:
      A :class:`StructureDecay` for :func:`structure_decayed_nm`.

    Raises:
      ValueError: bad ``n``/``m``/``kind``, a negative step, or ``end_step - begin_step`` below the frame count.

    Example:
      >>> sd = structure_decay(1, 8, end_step=400)
      >>> sd.frames
      ((7, 8), (4, 8), (2, 8), (1, 8))
      >>> [int(sd.frame_index(t)) for t in (0, 99, 100, 399, 400, 10**6)]
      [0, 0, 1, 3, 3, 3]
    """
    n, m = v.check_nm(n, m)
    v.check_choice("kind", kind, STRUCTURE_DECAY_KINDS)
    begin_step = v.check_int("begin_step", begin_step, 0)
    end_step = v.check_int("end_step", end_step, 0)
    frames = _stepwise_frames(n, m) if kind == "stepwise" else _geometric_frames(n, m)
    if end_step - begin_step < len(frames):
        raise ValueError(
            f"`end_step` ({end_step}) must be >= `begin_step` ({begin_step}) + {len(frames)} (one step per frame "
            f"{frames}); otherwise some frames, possibly the target {n}:{m}, are never reached."
        )
    return StructureDecay(tuple(frames), begin_step, end_step)


def structure_decayed_nm(
    params: PyTree,
    step: Int[ArrayLike, ""],
    decay: StructureDecay,
    *,
    axis: int = -2,
    where: Where = None,
) -> PyTree:
    """The SDGF forward at ``step`` (traced): the current frame's N':M' magnitude mask, straight-through backward.

    One compiled function serves every frame (``lax.switch`` over the static frames). Every frame's ``m'`` must
    divide the leaf's ``axis``.

    Args:
      params: a pytree of arrays.
      step: the training step, an int scalar; may be traced.
      decay: the plan from :func:`structure_decay`.
      axis: the axis the groups of ``m`` run along (default -2, the input axis of a Flax kernel).
      where: the leaves to sparsify: ``None`` (:func:`jaxsparse.prunable`), a pytree of Python bools shaped like
        ``params``, or a callable ``params -> that pytree``; the others pass through.

    Returns:
      The effective params: dense before ``decay.begin_step``, then the current frame's N':M' masking.

    Raises:
      TypeError: ``decay`` is not a :class:`StructureDecay`, or a selected leaf is not a floating-point array.
      ValueError: a frame's ``m'`` does not divide a selected leaf's ``axis``, or a bad ``axis``/``where``.

    Example:
      >>> import jax.numpy as jnp
      >>> sd = structure_decay(2, 4, end_step=10)
      >>> w = {"w": jnp.array([[1.0], [-4.0], [3.0], [2.0]])}
      >>> [structure_decayed_nm(w, t, sd)["w"].ravel().tolist() for t in (0, 10)]
      [[0.0, -4.0, 3.0, 2.0], [0.0, -4.0, 3.0, 0.0]]
    """
    if not isinstance(decay, StructureDecay):
        raise TypeError(
            f"`decay` must be a StructureDecay from structure_decay(...); got {type(decay).__name__}."
        )
    check_where(where)
    index = decay.frame_index(step) + 1  # 0 = dense phase

    def one(name, leaf):
        ax = 0
        for _, mm in decay.frames:
            ax = check_nm_leaf(name, leaf, 1, mm, axis)
        branches = [lambda w: w] + [
            functools.partial(lambda w, nn, mm: _ste_leaf(w, nn, mm, ax, False), nn=nn, mm=mm)
            for nn, mm in decay.frames
        ]
        return lax.switch(index, branches, leaf)

    return map_selected(one, params, where)


# ------------------------------------------------------------------------------------------------ S-STE
def _soft_threshold(w: Array, n: int, m: int, ax: int) -> Array:
    """``sign(w) * max(|w| - t, 0)`` with ``t`` the largest pruned ``|w|`` of each group (0 when ``n == m``)."""
    a = jnp.abs(w)
    keep = nm_mask(jnp.abs(w), n, m, ax)
    x = jnp.moveaxis(jnp.where(keep, 0, a), ax, -1)
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    t = jnp.broadcast_to(jnp.max(grouped, axis=-1, keepdims=True), grouped.shape).reshape(x.shape)
    t = jnp.moveaxis(t, -1, ax)
    return jnp.sign(w) * jnp.maximum(a - t, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _soft_leaf(w, scale, n, m, ax):
    return (scale.astype(w.dtype) * _soft_threshold(w, n, m, ax)).astype(w.dtype)


def _soft_fwd(w, scale, n, m, ax):
    return _soft_leaf(w, scale, n, m, ax), None


def _soft_bwd(n, m, ax, _, g):
    return g, None


_soft_leaf.defvjp(_soft_fwd, _soft_bwd)


def init_sste_scale(
    params: PyTree, n: int = 2, m: int = 4, *, axis: int = -2, where: Where = None
) -> PyTree:
    """S-STE's per-tensor scale ``beta = <W, S(W)> / <S(W), S(W)>`` (least-squares fit of ``W`` by ``beta * S(W)``),
    computed once (at initialisation) and then kept frozen: store it outside the trained params.

    ``None`` for unselected leaves; 1.0 for a leaf whose soft threshold is all zero.

    Args:
      params: a pytree of arrays (the initial weights).
      n: weights kept per group (1 <= n <= m).
      m: group size (<= 16); must divide the leaf's ``axis``.
      axis: the axis the groups of ``m`` run along (default -2, the input axis of a Flax kernel).
      where: the leaves to sparsify: ``None`` (:func:`jaxsparse.prunable`), a pytree of Python bools shaped like
        ``params``, or a callable ``params -> that pytree``; the others pass through.

    Returns:
      A pytree like ``params``: a float32 scalar ``beta`` on the selected leaves, ``None`` elsewhere.

    Raises:
      ValueError: bad ``n``/``m``/``axis``, a selected leaf whose ``axis`` is not divisible by ``m``, or ``where``
        not shaped like ``params``.
      TypeError: a selected leaf is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> w = {"w": jnp.array([[4.0], [1.0], [3.0], [2.0]])}
      >>> round(float(init_sste_scale(w)["w"]), 4)  # S(w) = [2, 0, 1, 0]
      2.2
    """
    n, m = v.check_nm(n, m)
    check_where(where)
    picks = selection(params, where)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for (path, leaf), pick in zip(flat, picks):
        if not pick:
            out.append(None)
            continue
        ax = check_nm_leaf(path_name(path), leaf, n, m, axis)
        w = jnp.asarray(leaf, jnp.float32)
        s = _soft_threshold(w, n, m, ax)
        den = jnp.sum(s * s)
        out.append(jnp.where(den > 0, jnp.sum(w * s) / jnp.where(den > 0, den, 1.0), 1.0))
    return jax.tree.unflatten(treedef, out)


def soft_nm(params: PyTree, scales: PyTree, n: int = 2, m: int = 4, *, axis: int = -2) -> PyTree:
    """S-STE (Hu et al. 2024) forward ``beta * S(W)``: in each group of ``m`` along ``axis``, ``t`` = the largest pruned
    ``|w|`` (the (m-n)-th smallest) and ``S(w) = sign(w) * max(|w| - t, 0)``, continuous in ``W`` with at most ``n``
    nonzeros per group; backward straight-through. ``scales`` comes from :func:`init_sste_scale` (``None`` leaves
    pass through unchanged).

    Args:
      params: a pytree of arrays.
      scales: a pytree like ``params`` of scalars or ``None`` (from :func:`init_sste_scale` with the same ``n``,
        ``m``, ``axis``); only leaves with a scale are thresholded.
      n: weights kept per group (1 <= n <= m).
      m: group size (<= 16); must divide the leaf's ``axis``.
      axis: the axis the groups of ``m`` run along (default -2, the input axis of a Flax kernel).

    Returns:
      The effective params.

    Raises:
      ValueError: bad ``n``/``m``/``axis``, ``scales`` not shaped like ``params``, or a scaled leaf whose ``axis``
        is not divisible by ``m``.
      TypeError: a scaled leaf is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> w = {"w": jnp.array([[4.0], [1.0], [3.0], [2.0]])}
      >>> soft_nm(w, init_sste_scale(w))["w"].ravel().tolist()
      [4.400000095367432, 0.0, 2.200000047683716, 0.0]
    """
    n, m = v.check_nm(n, m)

    def one(name, leaf, scale):
        if scale is None:
            return leaf
        ax = check_nm_leaf(name, leaf, n, m, axis)
        return _soft_leaf(leaf, jax.lax.stop_gradient(jnp.asarray(scale)), n, m, ax)

    return map_selected(
        one, params, lambda p: jax.tree.map(lambda _: True, p), scales, others_names=("scales",)
    )
