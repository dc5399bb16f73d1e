"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2`` within each output unit; no weight update."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from jaxsparse.posttraining._common import (
    check_kernel,
    check_nm_fits,
    check_vector,
    keep_mask,
    parse_sparsity,
)

__all__ = ["wanda_scores", "wanda_prune"]


def wanda_scores(
    weight: Float[ArrayLike, "fan_in fan_out"], act_sq_norm: Float[ArrayLike, " fan_in"]
) -> Float[Array, "fan_in fan_out"]:
    """Wanda importance ``|W_ij| * sqrt(act_sq_norm_i)`` for a Flax ``(in, out)`` kernel.

    ``act_sq_norm[i]`` is ``||X_i||^2``, the squared norm of input feature ``i`` over the calibration tokens (any
    positive rescaling, e.g. a mean instead of a sum, gives the same masks).

    Args:
      weight: a finite float ``(in, out)`` kernel.
      act_sq_norm: the ``(in,)`` squared input norms, e.g. :func:`activation_sq_norms` (negative entries are
        clipped to 0).

    Returns:
      The ``(in, out)`` scores, in ``weight``'s dtype.

    Raises:
      ValueError: a kernel that is not 2-D, an ``act_sq_norm`` of the wrong shape, or non-finite entries.
      TypeError: ``weight`` or ``act_sq_norm`` is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> wanda_scores(jnp.array([[1.0], [-2.0]]), jnp.array([4.0, 1.0])).ravel().tolist()
      [2.0, 2.0]
    """
    weight = check_kernel("weight", weight)
    act_sq_norm = check_vector("act_sq_norm", act_sq_norm, weight.shape[0])
    return jnp.abs(weight) * jnp.sqrt(jnp.maximum(act_sq_norm, 0.0)).astype(weight.dtype)[:, None]


def wanda_prune(
    weight: Float[ArrayLike, "fan_in fan_out"],
    act_sq_norm: Float[ArrayLike, " fan_in"],
    sparsity: float | tuple[int, int] = 0.5,
) -> tuple[Float[Array, "fan_in fan_out"], Bool[Array, "fan_in fan_out"]]:
    """Wanda pruning of one Flax ``(in, out)`` kernel; returns ``(pruned_weight, keep_mask)``.

    Scores are :func:`wanda_scores`. Unstructured: in every output column (a torch "row") exactly
    ``floor(sparsity * in)`` weights with the lowest scores are pruned. N:M (``sparsity=(n, m)``): in every output
    column and every ``m`` consecutive inputs the ``n`` highest scores are kept. Kept weights are unchanged.

    Args:
      weight: a finite float ``(in, out)`` kernel.
      act_sq_norm: the ``(in,)`` squared input norms over the calibration tokens (:func:`activation_sq_norms`).
      sparsity: a fraction in ``[0, 1)`` (unstructured) or an ``(n, m)`` pair (N:M along the input axis, ``m``
        dividing ``in_features``).

    Returns:
      ``(pruned_weight, keep_mask)``.

    Raises:
      ValueError: a kernel that is not 2-D, an ``act_sq_norm`` of the wrong shape, non-finite entries, a bad
        ``sparsity``, or ``in_features`` not divisible by ``m``.
      TypeError: ``weight`` or ``act_sq_norm`` is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1.0, 1.0], [2.0, -3.0]])
      >>> pruned, mask = wanda_prune(w, jnp.array([9.0, 1.0]), 0.5)   # input 0 is 3x louder
      >>> mask.tolist()
      [[True, True], [False, False]]
    """
    weight = check_kernel("weight", weight)
    pattern = parse_sparsity(sparsity)
    check_nm_fits("weight", weight.shape, pattern)
    mask = keep_mask(wanda_scores(weight, act_sq_norm), pattern, per_output=True)
    return jnp.where(mask, weight, jnp.zeros((), weight.dtype)), mask
