"""DSnoT (Zhang et al., ICLR 2024): training-free mask refinement by grow/prune swaps per output unit.

Per output unit (a column of a Flax ``(in, out)`` kernel; a torch "row"), with ``c_j = W_j E[x_j]``:

* reconstruction-error proxy ``eps = sum_{j pruned} c_j`` (expected dense minus sparse output);
* grow: among the initially pruned weights ranked by ``c_j / Var[x_j]^gamma``, take the largest if ``eps > 0``,
  else the smallest (the one that most reduces ``|eps|``);
* prune (unstructured): among the initially kept weights whose ``c_j`` has the sign that moves ``eps`` towards
  zero (``c_j < 0`` when ``eps >= 0``), take the lowest Wanda score ``|W_j| ||X_j||``; N:M: the lowest Wanda score
  among the still-kept, initially kept weights of the grown weight's ``m``-group, so every group keeps ``n``;
* a row swaps while ``|eps| > update_threshold`` (and, with ``same_sign``, while the swap would not flip the
  sign of ``eps``), for at most ``max_cycles`` cycles; a row that stops once stays stopped.

Differences from the reference code (zyxxmu/DSnoT), all in edge cases or units: ``E[x]`` is a per-token mean
(the reference divides the token sum by the number of sequences, i.e. its ``eps`` is ``seqlen`` times ours, so
its ``update_threshold=0.1`` at ``seqlen=2048`` is about ``5e-5`` here), ``Var`` is the pooled per-token
variance, and a row stops when it runs out of candidates instead of re-visiting weights. The loop is one
``lax.while_loop`` over cycles, vectorised over output units.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float

from jaxsparse import _validation as v
from jaxsparse.posttraining._common import check_kernel, check_vector

__all__ = ["dsnot_prune"]


@functools.partial(jax.jit, static_argnames=("group", "max_cycles", "var_power", "same_sign"))
def _dsnot(w, keep, mean, var, sq_norm, threshold, group, max_cycles, var_power, same_sign):
    wt = w.T.astype(jnp.float32)  # (rows = out, cols = in)
    keep0 = keep.T
    rows, cols = wt.shape
    r = jnp.arange(rows)
    c = wt * mean[None, :].astype(jnp.float32)
    eps0 = jnp.sum(jnp.where(keep0, 0.0, c), axis=1)
    g = c / jnp.power(jnp.maximum(var, 1e-12), var_power)[None, :]
    grow_order = jnp.argsort(
        jnp.where(keep0, jnp.inf, g), axis=1, stable=True
    )  # pruned first, ascending
    n_pruned = jnp.sum(~keep0, axis=1)
    wanda = jnp.abs(wt) * jnp.sqrt(jnp.maximum(sq_norm, 0.0))[None, :]
    neg, pos = keep0 & (c < 0), keep0 & (c > 0)
    neg_order = jnp.argsort(jnp.where(neg, wanda, jnp.inf), axis=1, stable=True)
    pos_order = jnp.argsort(jnp.where(pos, wanda, jnp.inf), axis=1, stable=True)
    n_neg, n_pos = jnp.sum(neg, axis=1), jnp.sum(pos, axis=1)

    def take(order, i):
        return order[r, jnp.clip(i, 0, cols - 1)]

    def cycle(state):
        keep, eps, lo, hi, pn, pp, active, t = state
        grow_hi = eps > 0
        gi = jnp.where(grow_hi, take(grow_order, hi), take(grow_order, lo))
        avail = lo <= hi
        if group:
            start = gi - gi % group
            idx = start[:, None] + jnp.arange(group)[None, :]
            cand = keep[r[:, None], idx] & keep0[r[:, None], idx]
            k = jnp.argmin(jnp.where(cand, wanda[r[:, None], idx], jnp.inf), axis=1)
            pi = start + k
            avail &= jnp.any(cand, axis=1)
            prune_pos = eps < 0  # unused for N:M pointer bookkeeping
        else:
            prune_pos = eps < 0
            pi = jnp.where(prune_pos, take(pos_order, pp), take(neg_order, pn))
            avail &= jnp.where(prune_pos, pp < n_pos, pn < n_neg)
        eps_after = eps + c[r, pi] - c[r, gi]
        ok = active & avail & (jnp.abs(eps) > threshold)
        if same_sign:
            ok &= jnp.sign(eps_after) == jnp.sign(eps0)
        keep = keep.at[r, gi].set(keep[r, gi] | ok)
        keep = keep.at[r, pi].set(keep[r, pi] & ~ok)
        eps = jnp.where(ok, eps_after, eps)
        hi = hi - (ok & grow_hi)
        lo = lo + (ok & ~grow_hi)
        if not group:
            pp = pp + (ok & prune_pos)
            pn = pn + (ok & ~prune_pos)
        return keep, eps, lo, hi, pn, pp, ok, t + 1

    def cond(state):
        return jnp.any(state[6]) & (state[7] < max_cycles)

    zeros = jnp.zeros((rows,), jnp.int32)
    init = (keep0, eps0, zeros, n_pruned - 1, zeros, zeros, jnp.ones((rows,), bool), jnp.int32(0))
    keep, *_ = lax.while_loop(cond, cycle, init)
    keep = keep.T
    return jnp.where(keep, w, jnp.zeros((), w.dtype)), keep


def dsnot_prune(
    weight: Float[ArrayLike, "fan_in fan_out"],
    mask: Bool[ArrayLike, "fan_in fan_out"],
    act_mean: Float[ArrayLike, " fan_in"],
    act_var: Float[ArrayLike, " fan_in"],
    act_sq_norm: Float[ArrayLike, " fan_in"],
    *,
    nm_group_size: int | None = None,
    update_threshold: float = 0.1,
    max_cycles: int = 50,
    var_power: float = 1.0,
    same_sign: bool | None = None,
) -> tuple[Float[Array, "fan_in fan_out"], Bool[Array, "fan_in fan_out"]]:
    """Refines the keep-``mask`` of a *dense* Flax ``(in, out)`` kernel by DSnoT swaps; returns ``(weight, mask)``.

    ``weight`` must be the dense (unpruned) kernel: regrown weights take their dense values. ``mask`` is the
    initial keep-mask (e.g. from :func:`wanda_prune`). ``act_mean``, ``act_var`` and ``act_sq_norm`` are the
    layer inputs' per-feature mean, variance and squared norm over calibration tokens (see
    :mod:`~jaxsparse.posttraining.calibration`). ``nm_group_size=m`` selects the N:M variant (swaps stay within
    one ``m``-group along the input axis). ``same_sign=None`` uses the reference defaults: off for unstructured,
    on for N:M. Every output column keeps its number of nonzeros (and every N:M group its ``n``);
    ``update_threshold=inf`` returns the initial mask. Jittable with the keyword arguments except
    ``update_threshold`` static.

    Args:
      weight: the dense, finite float ``(in, out)`` kernel.
      mask: the initial ``bool`` keep-mask, shaped like ``weight``.
      act_mean: the ``(in,)`` per-feature input means (:func:`activation_mean`).
      act_var: the ``(in,)`` per-feature input variances (:func:`activation_var`).
      act_sq_norm: the ``(in,)`` squared input norms (:func:`activation_sq_norms`).
      nm_group_size: ``m`` for the N:M variant (>= 1, dividing ``in``); ``None`` for unstructured.
      update_threshold: a row swaps while ``|eps|`` exceeds it (>= 0).
      max_cycles: the most swap cycles (>= 0; 0 returns the initial mask).
      var_power: ``gamma`` in the growth rank ``c_j / Var[x_j]^gamma``.
      same_sign: stop a row's swaps before one would flip the sign of its ``eps``; ``None`` for the default.

    Returns:
      ``(pruned_weight, keep_mask)``: the dense kernel masked by the refined mask, and that mask.

    Raises:
      ValueError: a kernel that is not 2-D, a mask or statistic of the wrong shape, non-finite inputs, an ``in``
        not divisible by ``nm_group_size``, ``max_cycles < 0`` or ``update_threshold < 0``.
      TypeError: a non-float kernel or statistic, or a non-int ``nm_group_size``/``max_cycles``.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1.0], [1.0], [0.5], [-2.0]])
      >>> mask = jnp.array([[True], [True], [False], [False]])
      >>> _, new = dsnot_prune(w, mask, jnp.ones(4), jnp.ones(4), jnp.ones(4), update_threshold=0.0, max_cycles=1)
      >>> new.ravel().tolist()   # eps = 0.5 - 2 < 0: regrow -2, prune a kept weight with c > 0
      [False, True, False, True]
    """
    weight = check_kernel("weight", weight)
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_ or mask.shape != weight.shape:
        raise ValueError(
            f"`mask` must be a bool array of the kernel's shape {weight.shape}; got {mask.dtype} {mask.shape}."
        )
    d = weight.shape[0]
    act_mean = check_vector("act_mean", act_mean, d)
    act_var = check_vector("act_var", act_var, d)
    act_sq_norm = check_vector("act_sq_norm", act_sq_norm, d)
    group = 0
    if nm_group_size is not None:
        group = v.check_int("nm_group_size", nm_group_size, 1)
        v.check_divisible("weight", weight.shape, 0, group)
    max_cycles = v.check_int("max_cycles", max_cycles, 0)
    try:
        threshold = float(update_threshold)
    except TypeError:  # traced
        threshold = update_threshold
    else:
        if not threshold >= 0:
            raise ValueError(f"`update_threshold` must be >= 0; got {update_threshold!r}.")
    if same_sign is None:
        same_sign = bool(group)
    return _dsnot(
        weight,
        mask,
        act_mean,
        act_var,
        act_sq_norm,
        jnp.asarray(threshold, jnp.float32),
        group,
        max_cycles,
        float(var_power),
        bool(same_sign),
    )
