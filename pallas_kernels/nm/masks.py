"""The one N:M mask rule of the project: ``nm_mask(score, n, m, axis)``.

``jaxsparse.nm_mask`` is this function (re-exported); :func:`pallas_kernels.nm.pack_nm` uses it on ``|w|``
along axis 0 when it is given no mask.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float

__all__ = ["MAX_M", "check_n_m", "nm_mask"]

MAX_M = 16
"""Largest supported group size ``m`` (positions are stored in at most 4 bits)."""


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int; got {value!r} of type {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}; got {value}.")
    return int(value)


def check_n_m(n: Any, m: Any) -> tuple[int, int]:
    """The one check of an N:M pair (``jaxsparse`` validates ``n``/``m`` with it too).

    Args:
      n: weights kept per group, an int with ``1 <= n <= m``.
      m: group size, an int with ``1 <= m <= MAX_M``.

    Returns:
      ``(n, m)`` as Python ints.

    Raises:
      TypeError: ``n`` or ``m`` is not an int (``bool`` is not).
      ValueError: ``n``/``m`` outside those ranges, naming the value.

    Example:
      >>> check_n_m(2, 4)
      (2, 4)
    """
    n = _check_int("n", n, 1)
    m = _check_int("m", m, 1)
    if m > MAX_M:
        raise ValueError(f"`m` must be <= {MAX_M}; got m={m}.")
    if n > m:
        raise ValueError(f"`n` must be <= `m`; got n={n}, m={m}.")
    return n, m


def _check_args(score: Array, n: Any, m: Any, axis: Any) -> int:
    n, m = check_n_m(n, m)
    if not jnp.issubdtype(score.dtype, jnp.floating):
        raise TypeError(f"`score` must be a real floating-point array; got dtype {score.dtype}.")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"`axis` must be an int; got {axis!r} of type {type(axis).__name__}.")
    if not -score.ndim <= axis < score.ndim:
        raise ValueError(
            f"`axis` must be in [{-score.ndim}, {score.ndim}) for an array of ndim {score.ndim}; "
            f"got {axis}."
        )
    ax = axis % score.ndim
    if score.shape[ax] % m:
        raise ValueError(
            f"`score` axis {ax} has length {score.shape[ax]} (shape {tuple(score.shape)}), which is not "
            f"divisible by m={m}."
        )
    return ax


def nm_mask(score: Float[ArrayLike, ...], n: int, m: int, axis: int = -2) -> Bool[Array, ...]:
    """N:M mask: in every group of ``m`` consecutive entries along ``axis``, keep the ``n`` largest scores.

    The default axis -2 is the contraction (input) axis of a Flax ``Dense`` kernel ``(in, out)`` and the
    ``I`` axis of an ``HWIO`` conv kernel. No sort and no transpose: the groups are split in place and each
    entry's rank in its group is counted with ``m`` shifted comparisons (ties go to the lower index; NaN ranks
    as -inf), which XLA fuses into one elementwise pass, so exactly ``n`` entries per group are kept. For a
    magnitude mask pass ``jnp.abs(w)``.

    Args:
      score: floating scores, any shape; ``score.shape[axis]`` must be divisible by ``m``.
      n: entries kept per group, ``1 <= n <= m``.
      m: group size, ``1 <= m <= 16``.
      axis: the axis the groups run along.

    Returns:
      A ``bool`` array shaped like ``score`` with exactly ``n`` ``True`` per group.

    Example:
      >>> import jax.numpy as jnp
      >>> nm_mask(jnp.array([[1.0], [4.0], [3.0], [2.0]]), 2, 4).ravel().tolist()
      [False, True, True, False]
    """
    score = jnp.asarray(score)
    ax = _check_args(score, n, m, axis)
    if n == m:
        return jnp.ones(score.shape, bool)
    x = jnp.where(jnp.isnan(score), -jnp.inf, score)
    g = x.reshape(score.shape[:ax] + (score.shape[ax] // m, m) + score.shape[ax + 1 :])
    pos = lax.broadcasted_iota(jnp.int32, g.shape, ax + 1)
    rank = jnp.zeros(g.shape, jnp.int32)
    for j in range(m):
        other = lax.slice_in_dim(g, j, j + 1, axis=ax + 1)
        rank = rank + ((other > g) | ((other == g) & (pos > j))).astype(jnp.int32)
    return (rank < n).reshape(score.shape)
