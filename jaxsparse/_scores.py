"""Scores for exact-count selection that no NaN or infinity can corrupt.

A selection ranks scores and keeps the top ``k`` among *allowed* positions (active weights for drop, positions not
kept for growth). Excluded positions score ``-inf`` and every allowed position scores a finite float32
(``NaN`` and ``-inf`` become the lowest finite value, ``+inf`` the highest), so an excluded position can only be
picked after every allowed one, whatever the gradients or weights hold.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

_MAX = float(jnp.finfo(jnp.float32).max)


def finite_scores(score: Float[ArrayLike, ...]) -> Float[Array, ...]:
    """``score`` as float32 with ``NaN``/``-inf`` -> lowest finite and ``+inf`` -> largest finite."""
    s = jnp.asarray(score).astype(jnp.float32)
    return jnp.nan_to_num(s, nan=-_MAX, posinf=_MAX, neginf=-_MAX)


def allowed_scores(
    score: Float[ArrayLike, ...], allowed: Bool[ArrayLike, ...]
) -> Float[Array, ...]:
    """Finite scores at ``allowed`` positions, ``-inf`` elsewhere (strictly below every allowed one)."""
    return jnp.where(allowed, finite_scores(score), -jnp.inf)
