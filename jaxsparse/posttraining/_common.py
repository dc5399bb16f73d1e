"""Shared argument handling for the post-training pruners: the sparsity pattern and kernel/statistic checks."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jaxsparse import _validation as v
from jaxsparse.allocation import keep_count
from jaxsparse.masks import nm_mask, topk_mask


class Pattern(NamedTuple):
    """A parsed sparsity request: unstructured fraction ``sparsity`` or ``n`` kept of every ``m`` (N:M)."""

    sparsity: float
    n: int
    m: int

    @property
    def is_nm(self) -> bool:
        return self.m > 0


def parse_sparsity(sparsity: Any) -> Pattern:
    """``0.5`` -> unstructured 50%; ``(2, 4)`` -> 2:4 (keep 2 of every 4 along the kernel's input axis)."""
    if isinstance(sparsity, (tuple, list)):
        if len(sparsity) != 2:
            raise ValueError(
                f"`sparsity` must be a float in [0, 1) or an (n, m) pair for N:M; got {sparsity!r}."
            )
        n, m = v.check_nm(*sparsity)
        return Pattern(1.0 - n / m, n, m)
    return Pattern(v.check_sparsity("sparsity", sparsity), 0, 0)


def check_finite(name: str, x: Array, what: str) -> None:
    """Concrete ``x`` must be finite (under ``jit`` the values are unknown and not checked)."""
    if isinstance(x, jax.core.Tracer):
        return
    if isinstance(x, jax.Array):
        # counted where x lives (only the count is fetched: a kernel sharded over several processes cannot
        # be read whole by any of them), eagerly even inside a jit trace that closes over x
        with jax.ensure_compile_time_eval():
            bad = int(x.size - jnp.count_nonzero(jnp.isfinite(x)))
    else:
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x))))
    if bad:
        raise ValueError(
            f"`{name}` has {bad} non-finite entr{'y' if bad == 1 else 'ies'} (NaN or inf) of {np.size(x)}: "
            f"{what} Pruning on it would silently keep or drop arbitrary weights."
        )


def check_kernel(name: str, weight: Any) -> Array:
    weight = jnp.asarray(weight)
    v.check_float_array(name, weight)
    check_finite(name, weight, "the layer's weights are not finite.")
    if weight.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D Dense kernel of shape (in_features, out_features); got shape {weight.shape}."
        )
    return weight


def check_nm_fits(name: str, shape: tuple[int, ...], pattern: Pattern) -> None:
    if pattern.is_nm and shape[0] % pattern.m:
        raise ValueError(
            f"`sparsity`={pattern.n}:{pattern.m} needs in_features divisible by m={pattern.m}, but `{name}` has "
            f"shape {tuple(shape)} (in_features={shape[0]}); allowed m divide {shape[0]}."
        )


def check_vector(name: str, x: Any, length: int, what: str = "in_features") -> Array:
    x = jnp.asarray(x)
    v.check_float_array(name, x)
    if x.shape != (length,):
        raise ValueError(
            f"`{name}` must have shape ({length},) to match the kernel's {what}={length}; got shape {x.shape}. "
            "Calibration statistics must come from the inputs of this layer."
        )
    check_finite(
        name,
        x,
        "the calibration statistics (this layer's inputs) are not finite; check the calibration "
        "batches and the layers before it.",
    )
    return x


def num_pruned(sparsity: float, size: int) -> int:
    """Weights pruned from ``size`` at ``sparsity``: ``size - keep_count(sparsity, size)``, the one count rule of
    every jaxsparse API (:func:`jaxsparse.keep_count`)."""
    return size - keep_count(sparsity, size)


def keep_mask(score: Array, pattern: Pattern, per_output: bool) -> Array:
    """Keep-mask of an ``(in, out)`` score: top scores per output column, over the layer, or N:M along ``in``."""
    if pattern.is_nm:
        return _nm_keep(score, pattern.n, pattern.m)
    fan_in = score.shape[0]
    if per_output:
        return _per_output_keep(score, jnp.int32(fan_in - num_pruned(pattern.sparsity, fan_in)))
    return _layer_keep(score, jnp.int32(score.size - num_pruned(pattern.sparsity, score.size)))


@jax.jit
def _per_output_keep(score: Array, k: Array) -> Array:
    return jax.vmap(lambda col: topk_mask(col, k), in_axes=1, out_axes=1)(score)


@jax.jit
def _layer_keep(score: Array, k: Array) -> Array:
    return topk_mask(score, k)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _nm_keep(score: Array, n: int, m: int) -> Array:
    return nm_mask(score, n, m, axis=0)
