"""Eager argument checks shared by every public function: each error names the argument, its value and what
is allowed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.nm.masks import MAX_M, check_n_m

MAX_NM_M = MAX_M


def check_float_array(name: str, x: Any) -> None:
    dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a real floating-point array; got dtype {dtype}.")


def check_sparsity(name: str, value: Any) -> float:
    if isinstance(value, jax.core.Tracer):  # a traced hyperparameter (optax.inject_hyperparams)
        return value
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a float in [0, 1); got {value!r}.") from None
    if not 0.0 <= s < 1.0 or np.isnan(s):
        raise ValueError(f"`{name}` must be in [0, 1); got {value!r}.")
    return s


def is_scalar(value: Any) -> bool:
    """A Python/NumPy number or a 0-d (possibly traced) array; ``bool`` is not a scalar here."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float, np.number)):
        return True
    return isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0


def check_sparsity_spec(name: str, value: Any) -> None:
    """``value`` is a sparsity (a scalar in [0, 1), checked unless traced), a budget or a per-leaf pytree."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`{name}` must be a float in [0, 1), a budget or a per-leaf pytree; got {value!r}."
        )
    if is_scalar(value) and not isinstance(value, jax.core.Tracer):
        check_sparsity(name, value)


def check_fraction(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a float in [0, 1]; got {value!r}.")
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a float in [0, 1]; got {value!r} of type {type(value).__name__}."
        ) from None
    if not 0.0 <= s <= 1.0:  # also rejects NaN
        raise ValueError(f"`{name}` must be in [0, 1]; got {value!r}.")
    return s


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int; got {value!r} of type {type(value).__name__}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}; got {value}.")
    return int(value)


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}; got {value!r}.")
    return value


def check_nm(n: Any, m: Any) -> tuple[int, int]:
    return check_n_m(n, m)  # the kernels' rule: one N:M check for the whole project


def check_axis(name: str, axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"`{name}` must be in [{-ndim}, {ndim}) for an array of ndim {ndim}; got {axis}."
        )
    return axis % ndim


def check_divisible(name: str, shape: tuple[int, ...], axis: int, m: int) -> None:
    if shape[axis] % m:
        raise ValueError(
            f"`{name}` axis {axis} has length {shape[axis]} (shape {tuple(shape)}), which is not divisible by m={m}."
        )


def check_schedule_window(begin_name: str, begin: int, end_name: str, end: int) -> None:
    if end < begin:
        raise ValueError(
            f"`{end_name}` ({end}) must be >= `{begin_name}` ({begin}): the schedule ends before it begins."
        )
