"""OWL (Yin et al., 2023): outlier-weighted layer-wise sparsity for post-training pruning.

Blocks (e.g. the transformer layers) that hold more *outlier* weights are pruned less. The layer outlier
distribution of a block is the fraction of its Wanda scores ``|W_ij| * ||X_j||`` above ``threshold`` times the
block's mean score; those ratios are mapped linearly onto ``[0, 2 * lam]``, centred, and subtracted from the
target sparsity, so every block's sparsity lies within ``2 * lam`` of the target and their mean is the target
(the equal-size blocks of a transformer then keep the overall sparsity).

:func:`outlier_ratio` and :func:`owl_sparsities` are the two steps; ``prune_nnx(..., owl=OWL())`` (and
``prune_linen``) run them on the dense model's calibration statistics before pruning.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float

from jaxsparse import _validation as v
from jaxsparse.posttraining.wanda import wanda_scores

__all__ = ["OWL", "outlier_ratio", "owl_sparsities"]


class OWL(NamedTuple):
    """Options of outlier-weighted layer-wise sparsity for the post-training driver.

    Attributes:
      threshold: a score counts as an outlier above ``threshold * mean`` (the paper's ``M``; 5 by default).
      lam: the sparsity of a block moves by at most ``2 * lam`` from the target (the paper's ``lambda``).
      block: layer name -> block key; layers with the same key share one outlier ratio and one sparsity
        (e.g. ``lambda n: n.split("/")[1]`` for ``"layers/3/attention/query"``). ``None``: every layer is
        its own block.
    """

    threshold: float = 5.0
    lam: float = 0.08
    block: Callable[[str], Hashable] | None = None


def outlier_ratio(
    kernels: Sequence[Float[ArrayLike, "fan_in fan_out"]],
    act_sq_norms: Sequence[Float[ArrayLike, " fan_in"]],
    threshold: float = 5.0,
) -> float:
    """Fraction of the Wanda scores of a block's kernels above ``threshold`` times their common mean.

    OWL's layer-wise outlier distribution ``D``: the scores of all the block's kernels are pooled.

    Args:
      kernels: the block's ``(in, out)`` kernels (one or more).
      act_sq_norms: each kernel's ``(in,)`` squared input norms, in the same order.
      threshold: the outlier factor ``M`` (> 0).

    Returns:
      The outlier ratio, a Python float in ``[0, 1]``.

    Raises:
      ValueError: ``threshold <= 0``, empty or unequal-length sequences, or an error of :func:`wanda_scores`.

    Example:
      >>> import jax.numpy as jnp
      >>> outlier_ratio([jnp.array([[1.0], [1.0], [1.0], [9.0]])], [jnp.ones(4)], threshold=2.0)
      0.25
    """
    if not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"`threshold` must be a positive number; got {threshold!r}.")
    if len(kernels) == 0 or len(kernels) != len(act_sq_norms):
        raise ValueError(
            f"`kernels` and `act_sq_norms` must be non-empty and of equal length; got "
            f"{len(kernels)} and {len(act_sq_norms)}."
        )
    scores = [wanda_scores(w, s).astype(jnp.float32).ravel() for w, s in zip(kernels, act_sq_norms)]
    flat = jnp.concatenate(scores)
    return float(jnp.mean(flat > threshold * jnp.mean(flat)))


def owl_sparsities(
    ratios: Mapping[Hashable, float], sparsity: float, lam: float = 0.08
) -> dict[Hashable, float]:
    """Per-block sparsities from outlier ratios: more outliers, lower sparsity; the mean is ``sparsity``.

    ``s_b = sparsity - (r_b - mean(r))`` with ``r = 2 * lam * (D - min D) / (max D - min D)`` (equal ratios:
    ``sparsity`` everywhere). Raises ``ValueError`` when a block's sparsity would leave ``[0, 1)``.

    Args:
      ratios: block key -> outlier ratio (:func:`outlier_ratio`), at least one, finite.
      sparsity: the target mean sparsity, in ``[0, 1)``.
      lam: the largest move from ``sparsity`` is ``2 * lam`` (spread over ``[0, 2 * lam]`` before centring), in
        ``[0, 1]``.

    Returns:
      Block key -> sparsity, in the order of ``ratios``.

    Raises:
      ValueError: ``sparsity`` or ``lam`` out of range, empty or non-finite ``ratios``, or a block sparsity
        outside ``[0, 1)``.

    Example:
      >>> owl_sparsities({"a": 0.01, "b": 0.03}, 0.5, lam=0.1)
      {'a': 0.6, 'b': 0.4}
    """
    sparsity = v.check_sparsity("sparsity", sparsity)
    lam = v.check_fraction("lam", lam)
    if not ratios:
        raise ValueError("`ratios` must name at least one block; got an empty mapping.")
    keys = list(ratios)
    d = np.asarray([float(ratios[k]) for k in keys], np.float64)
    if not np.isfinite(d).all():
        raise ValueError(f"`ratios` must be finite; got {dict(ratios)}.")
    span = d.max() - d.min()
    r = np.zeros_like(d) if span == 0 else (d - d.min()) / span * 2.0 * lam
    s = sparsity - (r - r.mean())
    if s.min() < 0 or s.max() >= 1:
        raise ValueError(
            f"`lam`={lam} moves the block sparsities to [{s.min():.4f}, {s.max():.4f}] around "
            f"sparsity={sparsity}, outside [0, 1); use a smaller lam."
        )
    return {k: round(float(x), 12) for k, x in zip(keys, s)}
