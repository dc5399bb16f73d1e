"""Schedules as optax-style callables ``step -> value`` (traced steps welcome) and the mask-update gate.

* :func:`polynomial_sparsity`: Zhu & Gupta (2017) gradual pruning,
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power``, evaluated on the update grid
  ``t0, t0 + dt, ...`` (held constant between updates), ``s_i`` before ``t0`` and ``s_f`` after ``t1``.
* :func:`cosine_fraction`: RigL's drop fraction ``f(t) = alpha / 2 * (1 + cos(pi * t / t_end))``, 0 after ``t_end``.
* :func:`update_gate`: ``True`` at ``t0, t0 + dt, ...`` up to ``t1`` — the steps where masks change.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxsparse import _validation as v

__all__ = ["polynomial_sparsity", "cosine_fraction", "update_gate"]

Schedule = Callable[[Int[ArrayLike, ""]], Float[Array, ""]]


def _window(begin_step: int, end_step: int | None, frequency: int) -> None:
    v.check_int("begin_step", begin_step, 0)
    v.check_int("frequency", frequency, 1)
    if end_step is not None:
        v.check_int("end_step", end_step, 0)
        v.check_schedule_window("begin_step", begin_step, "end_step", end_step)


def update_gate(
    frequency: int, begin_step: int = 0, end_step: int | None = None
) -> Callable[[ArrayLike], Bool[Array, ""]]:
    """``gate(step)`` is True when ``begin_step <= step <= end_step`` and ``(step - begin_step) % frequency == 0``.

    >>> gate = update_gate(100, begin_step=100, end_step=300)
    >>> [bool(gate(t)) for t in (0, 100, 150, 300, 400)]
    [False, True, False, True, False]
    """
    _window(begin_step, end_step, frequency)

    def gate(step):
        step = jnp.asarray(step, jnp.int32)
        ok = (step >= begin_step) & ((step - begin_step) % frequency == 0)
        return ok if end_step is None else ok & (step <= end_step)

    return gate


def polynomial_sparsity(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int = 1,
    initial_sparsity: float = 0.0,
    power: float = 3.0,
) -> Schedule:
    """Zhu & Gupta's gradual-pruning schedule, quantised to the update grid.

    >>> sched = polynomial_sparsity(0.9, begin_step=0, end_step=100, frequency=10)
    >>> [round(float(sched(t)), 4) for t in (0, 5, 10, 100, 500)]
    [0.0, 0.0, 0.2439, 0.9, 0.9]
    """
    final_sparsity = v.check_sparsity("final_sparsity", final_sparsity)
    initial_sparsity = v.check_sparsity("initial_sparsity", initial_sparsity)
    _window(begin_step, end_step, frequency)
    if power <= 0:
        raise ValueError(f"`power` must be > 0; got {power}.")
    span = max(end_step - begin_step, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        t = jnp.clip(step, begin_step, end_step)
        t = begin_step + (t - begin_step) // frequency * frequency
        frac = jnp.where(step >= end_step, 1.0, (t - begin_step).astype(jnp.float32) / span)
        return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** power

    return schedule


def cosine_fraction(initial_fraction: float, end_step: int) -> Schedule:
    """RigL's cosine-annealed drop fraction.

    >>> f = cosine_fraction(0.3, end_step=100)
    >>> [round(float(f(t)), 4) for t in (0, 50, 100, 200)]
    [0.3, 0.15, 0.0, 0.0]
    """
    initial_fraction = v.check_fraction("initial_fraction", initial_fraction)
    v.check_int("end_step", end_step, 1)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        value = initial_fraction / 2 * (1 + jnp.cos(jnp.pi * jnp.minimum(t, end_step) / end_step))
        return jnp.where(t > end_step, 0.0, value)

    return schedule
