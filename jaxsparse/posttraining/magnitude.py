"""One-shot magnitude pruning of a single Dense kernel (the post-training baseline)."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from jaxsparse import _validation as v
from jaxsparse.posttraining._common import check_kernel, check_nm_fits, keep_mask, parse_sparsity

__all__ = ["magnitude_prune_layer"]


def magnitude_prune_layer(
    weight: Float[ArrayLike, "fan_in fan_out"],
    sparsity: float | tuple[int, int] = 0.5,
    *,
    scope: str = "layer",
) -> tuple[Float[Array, "fan_in fan_out"], Bool[Array, "fan_in fan_out"]]:
    """Zeroes the smallest ``|w|`` of a Flax ``(in, out)`` kernel; returns ``(pruned_weight, keep_mask)``.

    ``sparsity`` is a fraction in ``[0, 1)`` (exactly ``floor(sparsity * size)`` weights pruned) or an ``(n, m)``
    pair (keep the ``n`` largest of every ``m`` consecutive inputs, per output). ``scope="layer"`` compares all
    weights of the layer (as the Wanda/SparseGPT repositories' magnitude baseline does); ``scope="output"``
    compares within each output column (``floor(sparsity * in)`` pruned per column).

    Args:
      weight: a finite float ``(in, out)`` kernel.
      sparsity: a fraction in ``[0, 1)`` (unstructured) or an ``(n, m)`` pair (N:M along the input axis, ``m``
        dividing ``in_features``).
      scope: ``"layer"`` or ``"output"`` (unstructured sparsity only; N:M is always per output column).

    Returns:
      ``(pruned_weight, keep_mask)``: the kernel with pruned entries set to 0 and the ``bool`` mask of kept ones.

    Raises:
      ValueError: a kernel that is not 2-D or has non-finite entries, a bad ``sparsity``, or ``in_features`` not
        divisible by ``m``, or an unknown ``scope``.
      TypeError: the kernel is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> w, m = magnitude_prune_layer(jnp.array([[1.0, -4.0], [3.0, 2.0]]), 0.5)
      >>> w.tolist(), m.tolist()
      ([[0.0, -4.0], [3.0, 0.0]], [[False, True], [True, False]])
    """
    weight = check_kernel("weight", weight)
    pattern = parse_sparsity(sparsity)
    check_nm_fits("weight", weight.shape, pattern)
    v.check_choice("scope", scope, ("layer", "output"))
    mask = keep_mask(jnp.abs(weight), pattern, per_output=scope == "output")
    return jnp.where(mask, weight, jnp.zeros((), weight.dtype)), mask
