"""Streaming calibration statistics of a layer's inputs: token count, per-feature sums and sums of squares, and
optionally ``X^T X`` (the SparseGPT Hessian up to a factor ``2/n``).

Statistics are running sums, so updating from batches in any order, or from a batch sharded over devices (the
sums become all-reduces under ``jit``), gives the same result. Everything is accumulated in float32 or wider.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from jaxsparse import _validation as v

__all__ = [
    "ActivationStats",
    "init_activation_stats",
    "update_activation_stats",
    "activation_sq_norms",
    "activation_mean",
    "activation_var",
    "hessian_from_stats",
    "warn_if_ill_conditioned",
]


class ActivationStats(NamedTuple):
    """Running sums over calibration tokens of one layer's input ``x`` (features on the last axis)."""

    count: Float[Array, ""]  # number of tokens seen
    sum: Float[Array, " d"]  # sum_t x_t
    sq_sum: Float[Array, " d"]  # sum_t x_t**2, i.e. ||X_j||^2
    xtx: Float[Array, "d d"] | None  # sum_t x_t x_t^T, or None when not requested


def init_activation_stats(
    features: int, *, hessian: bool = True, dtype=jnp.float32
) -> ActivationStats:
    """Empty statistics for inputs with ``features`` channels; ``hessian=False`` skips the ``(d, d)`` sum.

    Args:
      features: the layer's input features ``d`` (>= 1).
      hessian: also accumulate ``X^T X`` (needed by SparseGPT, not by magnitude or Wanda).
      dtype: the floating-point dtype of the sums.

    Returns:
      An :class:`ActivationStats` of zeros (``xtx`` is ``None`` without ``hessian``).

    Raises:
      ValueError: ``features < 1``.
      TypeError: ``features`` is not an int or ``dtype`` is not floating-point.

    Example:
      >>> s = init_activation_stats(3, hessian=False)
      >>> s.sum.shape, s.xtx is None
      ((3,), True)
    """
    features = v.check_int("features", features, 1)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`dtype` must be a floating-point dtype; got {dtype}.")
    z = jnp.zeros((features,), dtype)
    return ActivationStats(
        jnp.zeros((), dtype), z, z, jnp.zeros((features, features), dtype) if hessian else None
    )


def update_activation_stats(
    stats: ActivationStats, x: Float[ArrayLike, "... d"]
) -> ActivationStats:
    """Adds the tokens of ``x`` (all leading axes are tokens) to ``stats``; pure and jittable.

    Args:
      stats: the running statistics.
      x: a batch of the layer's inputs, a float array with the ``d`` features on its last axis.

    Returns:
      The updated :class:`ActivationStats` (``x`` is cast to the statistics' dtype).

    Raises:
      ValueError: ``x`` does not have ``d`` features on its last axis.
      TypeError: ``x`` is not a floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> s = update_activation_stats(init_activation_stats(2), jnp.array([[1.0, 2.0], [3.0, 4.0]]))
      >>> float(s.count), s.sq_sum.tolist(), s.xtx.tolist()
      (2.0, [10.0, 20.0], [[10.0, 14.0], [14.0, 20.0]])
    """
    x = jnp.asarray(x)
    v.check_float_array("x", x)
    d = stats.sum.shape[0]
    if x.ndim < 1 or x.shape[-1] != d:
        raise ValueError(
            f"`x` must have {d} features on its last axis (the layer's in_features); got shape {x.shape}."
        )
    dt = stats.sum.dtype
    x2 = x.reshape(-1, d).astype(dt)
    xtx = None
    if stats.xtx is not None:
        xtx = stats.xtx + jnp.einsum("ti,tj->ij", x2, x2, preferred_element_type=dt)
    return ActivationStats(
        stats.count + x2.shape[0], stats.sum + x2.sum(0), stats.sq_sum + jnp.square(x2).sum(0), xtx
    )


def activation_sq_norms(stats: ActivationStats) -> Float[Array, " d"]:
    """``||X_j||^2`` per input feature (Wanda's statistic).

    Args:
      stats: the running statistics.

    Returns:
      The ``(d,)`` sums of squares ``sum_t x_tj ** 2``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = update_activation_stats(init_activation_stats(2), jnp.array([[1.0, 2.0], [3.0, 4.0]]))
      >>> activation_sq_norms(s).tolist()
      [10.0, 20.0]
    """
    return stats.sq_sum


def activation_mean(stats: ActivationStats) -> Float[Array, " d"]:
    """``E[x_j]`` over calibration tokens (DSnoT's statistic).

    Args:
      stats: the running statistics.

    Returns:
      The ``(d,)`` means (zeros when no token was seen).

    Example:
      >>> import jax.numpy as jnp
      >>> s = update_activation_stats(init_activation_stats(2), jnp.array([[1.0, 2.0], [3.0, 4.0]]))
      >>> activation_mean(s).tolist()
      [2.0, 3.0]
    """
    return stats.sum / jnp.maximum(stats.count, 1.0)


def activation_var(stats: ActivationStats) -> Float[Array, " d"]:
    """Population variance of each input feature over calibration tokens (DSnoT's statistic).

    ``E[x_j^2] - E[x_j]^2``, clipped at 0 against round-off.

    Args:
      stats: the running statistics.

    Returns:
      The ``(d,)`` variances.

    Example:
      >>> import jax.numpy as jnp
      >>> s = update_activation_stats(init_activation_stats(2), jnp.array([[1.0, 2.0], [3.0, 4.0]]))
      >>> activation_var(s).tolist()
      [1.0, 1.0]
    """
    mean = activation_mean(stats)
    return jnp.maximum(stats.sq_sum / jnp.maximum(stats.count, 1.0) - jnp.square(mean), 0.0)


def hessian_from_stats(stats: ActivationStats) -> Float[Array, "d d"]:
    """SparseGPT's ``H = (2/n) X^T X`` (the layer-wise squared-error Hessian).

    Args:
      stats: running statistics created with ``hessian=True``.

    Returns:
      The ``(d, d)`` Hessian, ``n`` being the token count (zeros when no token was seen).

    Raises:
      ValueError: ``stats`` carries no ``X^T X`` sum.

    Example:
      >>> import jax.numpy as jnp
      >>> s = update_activation_stats(init_activation_stats(2), jnp.array([[1.0, 2.0], [3.0, 4.0]]))
      >>> hessian_from_stats(s).tolist()
      [[10.0, 14.0], [14.0, 20.0]]
    """
    if stats.xtx is None:
        raise ValueError(
            "`stats` has no X^T X sum; create it with init_activation_stats(..., hessian=True)."
        )
    return stats.xtx * (2.0 / jnp.maximum(stats.count, 1.0))


def warn_if_ill_conditioned(
    hessian: Float[ArrayLike, "d d"], num_tokens: int, damp: float = 0.01, name: str = "layer"
) -> bool:
    """Warns when fewer calibration tokens than input features make ``H`` singular; returns whether it warned.

    The warning states the dampening that then keeps the Cholesky factorisation defined:
    ``damp * mean(diag H)`` added to the diagonal.

    Args:
      hessian: the ``(d, d)`` Hessian (concrete, or traced: the value is then not printed).
      num_tokens: the calibration tokens behind it.
      damp: SparseGPT's relative dampening, quoted in the warning.
      name: the layer's name in the warning.

    Returns:
      ``True`` when it warned (``num_tokens < d``), else ``False``.

    Example:
      >>> import warnings, jax.numpy as jnp
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     warned = warn_if_ill_conditioned(jnp.eye(4), num_tokens=2)
      >>> warned, len(caught), warn_if_ill_conditioned(jnp.eye(4), num_tokens=4)
      (True, 1, False)
    """
    d = int(np.shape(hessian)[0])
    num_tokens = int(num_tokens)
    if num_tokens >= d:
        return False
    try:
        diag_mean = float(jnp.mean(jnp.diag(jnp.asarray(hessian))))
        used = f"{damp} * {diag_mean:.4g} = {damp * diag_mean:.4g}"
    except jax.errors.ConcretizationTypeError:  # called under jit: the value is not known here
        used = f"{damp} * mean(diag H)"
    warnings.warn(
        f"{name}: {num_tokens} calibration tokens for {d} input features, so H = X^T X has rank <= {num_tokens} "
        f"and is singular; SparseGPT is regularised only by the dampening damp * mean(diag H) = {used} "
        f"added to the diagonal. Use at least {d} calibration tokens "
        "(many more for a well-conditioned Hessian).",
        stacklevel=3,
    )
    return True
