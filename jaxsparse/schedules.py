"""Schedules as optax-style callables ``step -> value`` (traced steps welcome) and the mask-update gate.

* :func:`polynomial_sparsity`: Zhu & Gupta (2017) gradual pruning,
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power``, evaluated on the update grid
  ``t0, t0 + dt, ...`` (held constant between updates), ``s_i`` before ``t0`` and ``s_f`` after ``t1``.
* :func:`drop_fraction_schedule`: the DST drop fraction, ``alpha / 2 * (1 + cos(pi * t / t_end))`` (RigL), linear or
  constant.
* :func:`gradient_annealing_schedule`: AutoSparse's gradient scale ``alpha_t`` for the annealed estimators.
* :func:`mask_decay_schedule`: PGF's ``beta_t`` for :func:`jaxsparse.decayed_nm`.
* :func:`update_gate`: ``True`` at ``t0, t0 + dt, ...`` up to ``t1`` — the steps where masks change; every
  training algorithm gates its mask updates with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxsparse import _validation as v

__all__ = [
    "ANNEALING_KINDS",
    "DECAYS",
    "MASK_DECAY_KINDS",
    "drop_fraction_schedule",
    "gradient_annealing_schedule",
    "mask_decay_schedule",
    "polynomial_sparsity",
    "update_gate",
]

DECAYS = ("cosine", "linear", "constant")
MASK_DECAY_KINDS = ("linear", "exponential")
ANNEALING_KINDS = ("sigmoid_cosine", "cosine")

Schedule = Callable[[Int[ArrayLike, ""]], Float[Array, ""]]


def _window(begin_step: int, end_step: int | None, frequency: int) -> None:
    v.check_int("begin_step", begin_step, 0)
    v.check_int("frequency", frequency, 1)
    if end_step is not None:
        v.check_int("end_step", end_step, 0)
        v.check_schedule_window("begin_step", begin_step, "end_step", end_step)


def update_gate(
    frequency: int,
    begin_step: int = 0,
    end_step: int | None = None,
    *,
    include_begin: bool = True,
) -> Callable[[ArrayLike], Bool[Array, ""]]:
    """``gate(step)`` is True when ``begin_step <= step <= end_step`` and ``(step - begin_step) % frequency == 0``.

    Args:
      frequency: steps between updates (>= 1).
      begin_step: the first update step.
      end_step: the last step an update may happen (inclusive); ``None`` for no end.
      include_begin: ``False`` skips the update at ``begin_step`` itself (DST: masks first change one period after
        training starts).

    Returns:
      ``step -> bool`` scalar, traceable.

    Example:
      >>> gate = update_gate(100, begin_step=100, end_step=300)
      >>> [bool(gate(t)) for t in (0, 100, 150, 300, 400)]
      [False, True, False, True, False]
    """
    _window(begin_step, end_step, frequency)

    def gate(step):
        step = jnp.asarray(step, jnp.int32)
        ok = (step >= begin_step) & ((step - begin_step) % frequency == 0)
        if not include_begin:
            ok = ok & (step > begin_step)
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

    ``s_t = final + (initial - final) * (1 - (t - begin_step) / (end_step - begin_step)) ** power`` where ``t`` is
    the step rounded down to the grid ``begin_step, begin_step + frequency, ...``; ``initial_sparsity`` before
    ``begin_step``, ``final_sparsity`` from ``end_step`` on.

    Args:
      final_sparsity: the sparsity reached at ``end_step``, in ``[0, 1)``.
      begin_step: the step pruning starts (>= 0).
      end_step: the step ``final_sparsity`` is reached (>= ``begin_step``).
      frequency: steps between mask updates (>= 1); the value is held constant between them.
      initial_sparsity: the sparsity at ``begin_step``, in ``[0, 1)``.
      power: the exponent (> 0); 3 is Zhu & Gupta's cubic schedule.

    Returns:
      ``step -> sparsity``, a float32 scalar; traceable.

    Raises:
      ValueError: a sparsity outside ``[0, 1)``, ``end_step < begin_step``, ``frequency < 1`` or ``power <= 0``.

    Example:
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


def drop_fraction_schedule(
    drop_fraction: float, end_step: int | None, decay: str = "cosine"
) -> Callable[[ArrayLike], Float[Array, ""]]:
    """``step -> f(t)``: ``drop_fraction`` decayed to 0 at ``end_step`` (``"cosine"``, ``"linear"``) or constant.

    ``"cosine"`` is RigL's ``drop_fraction / 2 * (1 + cos(pi * t / end_step))``, ``"linear"`` is
    ``drop_fraction * (1 - t / end_step)``; ``t`` is clipped to ``end_step``, so the value stays 0 after it.

    Args:
      drop_fraction: the fraction of a layer's active weights dropped at step 0, in ``[0, 1]``.
      end_step: the step the fraction reaches 0; required unless ``decay="constant"`` (may be ``None`` then).
      decay: one of ``"cosine"``, ``"linear"``, ``"constant"``.

    Returns:
      ``step -> fraction``, a float32 scalar; traceable.

    Raises:
      ValueError: ``drop_fraction`` outside ``[0, 1]``, an unknown ``decay``, or ``end_step=None`` with a decaying
        schedule.

    Example:
      >>> f = drop_fraction_schedule(0.3, 100)
      >>> [round(float(f(t)), 4) for t in (0, 50, 100, 200)]
      [0.3, 0.15, 0.0, 0.0]
      >>> [round(float(drop_fraction_schedule(0.3, 100, "linear")(t)), 4) for t in (0, 50)]
      [0.3, 0.15]
    """
    alpha = v.check_fraction("drop_fraction", drop_fraction)
    v.check_choice("decay", decay, DECAYS)
    if decay != "constant" and end_step is None:
        raise ValueError(
            f"decay={decay!r} needs an `end_step` (or `total_steps`); only decay='constant' runs without one."
        )
    span = float(max(end_step or 1, 1))

    def schedule(step):
        t = jnp.minimum(jnp.asarray(step, jnp.float32), span)
        if decay == "constant":
            return jnp.full((), alpha, jnp.float32)
        if decay == "linear":
            return jnp.asarray(alpha * (1.0 - t / span), jnp.float32)
        return jnp.asarray(alpha / 2 * (1.0 + jnp.cos(jnp.pi * t / span)), jnp.float32)

    return schedule


def gradient_annealing_schedule(
    end_step: int, *, alpha0: float = 1.0, begin_step: int = 0, kind: str = "sigmoid_cosine"
) -> Callable[[Int[ArrayLike, ""]], Float[Array, ""]]:
    """AutoSparse's annealing of the gradient scale ``alpha_t`` from ``alpha0`` to exactly 0 at ``end_step``.

    With ``u = (t - begin_step) / (end_step - begin_step)`` clipped to ``[0, 1]``:

    * ``"sigmoid_cosine"``: ``alpha0 * max((1 + cos(pi u)) / 2, 1 - sigmoid(-6 + 12 u))`` (slow start, then a fast
      drop; the sigmoid-cosine decay used by AutoSparse implementations);
    * ``"cosine"``: ``alpha0 * (1 + cos(pi u)) / 2``;

    and ``alpha_t = 0`` from ``end_step`` on (hard masking for the rest of training).

    Args:
      end_step: the step from which ``alpha_t = 0`` (>= 1, > ``begin_step``).
      alpha0: the scale at ``begin_step``, in ``[0, 1]``.
      begin_step: the step annealing starts (>= 0); ``alpha_t = alpha0`` before it.
      kind: ``"sigmoid_cosine"`` or ``"cosine"``.

    Returns:
      ``step -> alpha_t``, a float32 scalar; traceable.

    Raises:
      ValueError: ``end_step <= begin_step``, ``alpha0`` outside ``[0, 1]`` or an unknown ``kind``.

    Example:
      >>> sched = gradient_annealing_schedule(100, alpha0=0.8)
      >>> [round(float(sched(t)), 4) for t in (0, 50, 99, 100, 500)]
      [0.8, 0.4, 0.0022, 0.0, 0.0]
    """
    end_step = v.check_int("end_step", end_step, 1)
    begin_step = v.check_int("begin_step", begin_step, 0)
    if end_step <= begin_step:
        raise ValueError(
            f"`end_step` ({end_step}) must be > `begin_step` ({begin_step}): alpha would never reach 0."
        )
    alpha0 = v.check_fraction("alpha0", alpha0)
    v.check_choice("kind", kind, ANNEALING_KINDS)
    span = float(end_step - begin_step)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        u = jnp.clip((t - begin_step) / span, 0.0, 1.0)
        value = (1 + jnp.cos(jnp.pi * u)) / 2
        if kind == "sigmoid_cosine":
            value = jnp.maximum(value, 1 - jax.nn.sigmoid(-6.0 + 12.0 * u))
        return jnp.where(t >= end_step, 0.0, alpha0 * value)

    return schedule


def mask_decay_schedule(
    kind: str = "linear",
    decay_coef: float | None = None,
    *,
    begin_step: int = 0,
    end_step: int | None = None,
) -> Callable[[Int[ArrayLike, ""]], Float[Array, ""]]:
    """PGF's ``beta_t`` for :func:`decayed_nm`, with ``t = step - begin_step`` (1 during a dense phase before it):

    * ``"linear"``: ``beta_t = max(0, 1 - decay_coef * t)``;
    * ``"exponential"``: ``beta_t = exp(-decay_coef * t)``;

    and ``beta_t = 0`` from ``end_step`` on (PGF's final binary phase). ``end_step`` is required for ``"exponential"``
    (it never reaches 0 by itself); for ``"linear"`` a missing ``decay_coef`` defaults to
    ``1 / (end_step - begin_step)``.

    Args:
      kind: ``"linear"`` or ``"exponential"``.
      decay_coef: the decay rate per step, a finite float > 0; may be ``None`` only for ``"linear"`` with an
        ``end_step``.
      begin_step: the first step of the decay (>= 0); ``beta_t = 1`` before it.
      end_step: the step from which ``beta_t = 0`` (> ``begin_step``); ``None`` for no binary phase (``"linear"``
        only).

    Returns:
      ``step -> beta_t``, a float32 scalar in ``[0, 1]``; traceable.

    Raises:
      ValueError: an unknown ``kind``, ``end_step <= begin_step``, a missing or non-positive ``decay_coef``, or
        ``"exponential"`` without ``end_step``.

    Example:
      >>> beta = mask_decay_schedule("linear", 0.01, begin_step=10)
      >>> [round(float(beta(t)), 3) for t in (0, 10, 60, 110, 200)]
      [1.0, 1.0, 0.5, 0.0, 0.0]
      >>> beta = mask_decay_schedule("exponential", 0.1, end_step=50)
      >>> [round(float(beta(t)), 4) for t in (0, 10, 49, 50)]
      [1.0, 0.3679, 0.0074, 0.0]
    """
    v.check_choice("kind", kind, MASK_DECAY_KINDS)
    begin_step = v.check_int("begin_step", begin_step, 0)
    if end_step is not None:
        end_step = v.check_int("end_step", end_step, 0)
        if end_step <= begin_step:
            raise ValueError(
                f"`end_step` ({end_step}) must be > `begin_step` ({begin_step}): beta would never decay before the "
                "binary phase."
            )
    if decay_coef is None:
        if kind == "exponential" or end_step is None:
            raise ValueError(
                f"`decay_coef` is required for kind={kind!r}"
                + ("" if end_step is not None else " without `end_step`")
                + "; got None."
            )
        decay_coef = 1.0 / (end_step - begin_step)
    decay_coef = float(decay_coef)
    if not decay_coef > 0 or not math.isfinite(decay_coef):
        raise ValueError(
            f"`decay_coef` must be a finite float > 0 (otherwise beta never decays); got {decay_coef}."
        )
    if kind == "exponential" and end_step is None:
        raise ValueError(
            "`end_step` is required for kind='exponential': exp(-decay_coef * t) never reaches 0, so the forward "
            "would never become the target N:M; pass the step from which beta = 0."
        )

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        t = jnp.maximum(s - begin_step, 0.0)
        beta = (
            jnp.maximum(0.0, 1.0 - decay_coef * t) if kind == "linear" else jnp.exp(-decay_coef * t)
        )
        return beta if end_step is None else jnp.where(s >= end_step, 0.0, beta)

    return schedule
