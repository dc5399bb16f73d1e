"""optax transformations for N:M training from scratch.

:func:`sr_ste_decay` is SR-STE's sparse-refined term (Zhou et al. 2021): it adds ``decay * (1 - E(W)) * W`` to the
gradient, where ``E`` is the same N:M magnitude mask :func:`jaxsparse.estimators.ste_nm` uses in the forward. Put it
first in a chain so the term passes through momentum / Adam like a gradient (as in the reference)::

    tx = optax.chain(sr_ste_decay(2, 4), optax.adam(1e-3))
    loss = lambda params, batch: model_loss(ste_nm(params, 2, 4), batch)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxsparse import _validation as v
from jaxsparse._tree import check_same_structure, is_none
from jaxsparse._where import Where, check_where
from jaxsparse.estimators import nm_masks

__all__ = ["sr_ste_decay"]


def sr_ste_decay(
    n: int = 2,
    m: int = 4,
    decay: float = 2e-4,
    *,
    axis: int = -2,
    transposable: bool = False,
    where: Where = None,
) -> optax.GradientTransformation:
    """SR-STE's decay on pruned weights: ``updates + decay * (1 - E(params)) * params`` on the selected leaves.

    ``E`` is recomputed from ``params`` on each step (``n``, ``m``, ``axis``, ``transposable`` and ``where`` must
    match the forward :func:`~jaxsparse.estimators.ste_nm`). The term is zero at kept weights and ``decay * w`` at
    pruned ones; ``decay = 0`` leaves the updates unchanged (plain STE). Stateless; needs ``params`` in ``update``.

    Chain it before the optimizer, as the README does: ``optax.chain(sr_ste_decay(2, 4, 2e-4), optax.adam(lr))``.

    Args:
      n: weights kept per group (1 <= n <= m).
      m: group size (<= 16).
      decay: SR-STE's ``lambda``, a finite float >= 0.
      axis: the axis the groups of ``m`` run along (default -2).
      transposable: N:M along both of the last two axes.
      where: the leaves to decay: ``None`` (:func:`jaxsparse.prunable`), a pytree of Python bools shaped like
        ``params``, or a callable ``params -> that pytree``.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Raises:
      TypeError: a non-numeric ``decay`` or non-int ``axis``.
      ValueError: bad ``n``/``m``, a negative or non-finite ``decay``, an empty ``where``; in ``update``, missing
        ``params`` or ``updates`` not shaped like ``params`` (and the errors of :func:`jaxsparse.nm_masks`).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = sr_ste_decay(2, 4, decay=0.5)
      >>> p = {"w": jnp.array([[1.0], [-4.0], [3.0], [2.0]])}
      >>> u, _ = tx.update({"w": jnp.zeros((4, 1))}, tx.init(p), p)
      >>> u["w"].ravel().tolist()
      [0.5, 0.0, 0.0, 1.0]
    """
    n, m = v.check_nm(n, m)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(
            f"`decay` must be a float >= 0; got {decay!r} of type {type(decay).__name__}."
        )
    decay = float(decay)
    if not decay >= 0 or not math.isfinite(decay):
        raise ValueError(f"`decay` (SR-STE's lambda) must be a finite float >= 0; got {decay}.")
    v.check_int("axis", axis)
    check_where(where)

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("sr_ste_decay needs `params` in update(updates, state, params).")
        check_same_structure("updates", updates, "params", params)
        masks = nm_masks(params, n, m, axis=axis, transposable=transposable, where=where)
        out = jax.tree.map(
            lambda mk, u, p: (
                u
                if mk is None
                else (u + decay * jnp.where(mk, jnp.zeros((), p.dtype), p)).astype(u.dtype)
            ),
            masks,
            updates,
            params,
            is_leaf=is_none,
        )
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)
