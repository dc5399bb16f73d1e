"""Iterative magnitude pruning with weight rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

A round trains from ``rewind_params * mask``, prunes a fraction of the *remaining* weights by global magnitude
(nested masks), and rewinds the survivors to ``rewind_params`` (the weights at step k; k = 0 is the original
lottery ticket). Training itself is the user's jitted loop, e.g. with :func:`jaxsparse.fixed_masks`; see
``examples/lottery_ticket.py`` for a driver.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from jaxsparse import _validation as v
from jaxsparse._bitmask import check_not_packed
from jaxsparse._deprecations import module_getattr
from jaxsparse._tree import map_live
from jaxsparse.allocation import prunable
from jaxsparse.masks import apply_masks, global_topk_masks, topk_masks
from jaxsparse.oneshot import SCOPES

__all__ = ["imp_masks"]


def imp_masks(
    params: PyTree, masks: PyTree | None = None, fraction: float = 0.2, scope: str = "global"
) -> PyTree:
    """Prunes ``ceil(fraction * nnz)`` of the weights still inside ``masks`` (smallest ``|w|``); nested masks.

    ``masks=None`` starts from dense over the default prunable leaves (:func:`jaxsparse.prunable`). After ``r``
    rounds from dense, sparsity is ``1 - (1 - fraction) ** r`` up to the per-round ceil.

    Args:
      params: the trained weights (a pytree of arrays).
      masks: the current masks (a pytree like ``params``, ``None`` = not pruned), or ``None`` for dense.
      fraction: the fraction of the surviving weights pruned this round, in ``[0, 1)``.
      scope: ``"global"`` (one threshold over all leaves, ``ceil(fraction * total nnz)`` pruned) or ``"layer"``
        (``ceil(fraction * nnz)`` pruned in each leaf).

    Returns:
      The next round's masks, nested in ``masks``; ``None`` leaves stay ``None``.

    Raises:
      ValueError: ``fraction`` outside ``[0, 1)`` or an unknown ``scope``.

    Example:
      >>> import jax.numpy as jnp
      >>> m = imp_masks({"w": jnp.arange(1.0, 11.0)[None]}, {"w": jnp.ones((1, 10), bool)}, 0.2)
      >>> int(m["w"].sum())
      8
    """
    fraction = v.check_sparsity("fraction", fraction)
    v.check_choice("scope", scope, SCOPES)
    check_not_packed("masks", masks)
    if masks is None:
        masks = jax.tree.map(
            lambda sel, p: jnp.ones(p.shape, bool) if sel else None, prunable(params), params
        )
    scores = map_live(
        lambda m, p: jnp.where(m, jnp.abs(p).astype(jnp.float32), -jnp.inf), masks, params
    )
    counts = map_live(lambda m: int(jnp.sum(m)), masks)
    if scope == "global":
        nnz = sum(jax.tree.leaves(counts))
        return global_topk_masks(scores, nnz - math.ceil(fraction * nnz))
    return topk_masks(
        scores,
        map_live(lambda c: c - math.ceil(fraction * c), counts),
    )


__getattr__ = module_getattr(__name__, {"rewind": ("jaxsparse.apply_masks", apply_masks)})
