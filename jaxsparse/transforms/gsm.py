"""Global Sparse Momentum SGD (Ding et al. 2019): only the globally most important weights get the objective's
gradient; all the others only decay.

Every step, over all pruned leaves together, the ``Q = int(nonzero_ratio * N)`` entries with the largest
``|g * w|`` keep their gradient; the objective gradient is zeroed elsewhere *before* weight decay, which still
applies to every weight; then momentum SGD: ``z <- beta * z + (M * g + lambda * w)``, ``w <- w - lr * z``.
Weights outside the top-``Q`` decay geometrically towards 0, so the final global magnitude prune to the same
density (``jaxsparse.magnitude_masks(params, 1 - nonzero_ratio, scope="global")``) removes weights that are
already near zero.

Checked against the authors' code (``DingXiaoH/GSM-SGD``, ``gsm_train.train_one_step``: metric ``|g * w|`` over all
conv/FC kernels, top-Q by threshold, masked gradient plus weight decay on all, momentum buffer). Their defaults:
ResNet-56/CIFAR-10 ``momentum=0.98``, ``weight_decay=1e-4``; LeNet ``momentum=0.99``, ``weight_decay=5e-4``,
Nesterov. Ties at the threshold are kept by position here (exactly ``Q`` entries) rather than all kept.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree

from jaxsparse import _validation as v
from jaxsparse._tree import is_none
from jaxsparse.allocation import prunable
from jaxsparse.masks import global_topk_masks

__all__ = ["global_sparse_momentum"]


class _GSMMaskState(NamedTuple):
    """Stateless (the mask is recomputed from ``|g * w|`` every step)."""


def _gsm_mask(nonzero_ratio: float, where: PyTree | None) -> optax.GradientTransformation:
    def init(params):
        return _GSMMaskState()

    def update(grads, state, params=None):
        if params is None:
            raise ValueError(
                "global_sparse_momentum needs `params` in update(grads, state, params)."
            )
        selected = prunable(params) if where is None else where
        scores = jax.tree.map(
            lambda sel, g, p: jnp.abs(g * p).astype(jnp.float32) if sel else None,
            selected,
            grads,
            params,
        )
        n = sum(s.size for s in jax.tree.leaves(scores))
        keep = global_topk_masks(scores, int(nonzero_ratio * n))
        masked = jax.tree.map(
            lambda m, g: g if m is None else jnp.where(m, g, jnp.zeros((), g.dtype)),
            keep,
            grads,
            is_leaf=is_none,
        )
        return masked, state

    return optax.GradientTransformation(init, update)


def global_sparse_momentum(
    learning_rate: float | optax.Schedule,
    nonzero_ratio: float,
    *,
    momentum: float = 0.98,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
    where: PyTree | None = None,
) -> optax.GradientTransformation:
    """GSM: momentum SGD where only the top ``nonzero_ratio`` of ``|g * w|`` (global) get the objective gradient.

    Args:
      learning_rate: a float or an optax schedule.
      nonzero_ratio: the density ``r`` the model is pruned to at the end (``Q = int(r * N)`` active weights).
      momentum: ``beta`` (the authors' 0.98 for ResNet-56).
      weight_decay: ``lambda``, applied to every weight, masked or not.
      nesterov: Nesterov momentum (the authors' LeNet runs).
      where: a pytree of Python bools selecting the pruned leaves; default :func:`jaxsparse.prunable`. Other
        leaves get their full gradient.

    Returns:
      An optax ``GradientTransformation`` (``update`` needs ``params``).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxsparse
      >>> params = {"w": jax.random.normal(jax.random.PRNGKey(0), (10, 10)), "b": jnp.zeros(10)}
      >>> tx = global_sparse_momentum(0.1, 0.2, momentum=0.9, weight_decay=0.5)
      >>> state = tx.init(params)
      >>> for t in range(200):
      ...     grads = {"w": -0.1 * jnp.sign(params["w"]), "b": jnp.zeros(10)}  # pushes |w| up
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> masks = jaxsparse.magnitude_masks(params, 0.8, scope="global")
      >>> w = jnp.abs(params["w"])  # 20 weights settle at 0.1 / 0.5, the other 80 decay to ~0
      >>> int(masks["w"].sum()), bool(w[masks["w"]].min() > 0.19), bool(w[~masks["w"]].max() < 1e-3)
      (20, True, True)
    """
    if isinstance(nonzero_ratio, bool) or not isinstance(nonzero_ratio, (int, float)):
        raise TypeError(f"`nonzero_ratio` must be a float in (0, 1]; got {nonzero_ratio!r}.")
    if not 0.0 < nonzero_ratio <= 1.0:
        raise ValueError(f"`nonzero_ratio` must be in (0, 1]; got {nonzero_ratio!r}.")
    v.check_fraction("momentum", momentum)
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or weight_decay < 0
    ):
        raise ValueError(f"`weight_decay` must be a float >= 0; got {weight_decay!r}.")
    return optax.chain(
        _gsm_mask(float(nonzero_ratio), where),
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )
