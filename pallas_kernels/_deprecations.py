"""Names removed from the public kernel API, kept working for one release behind a ``DeprecationWarning``.

Each entry maps the old name to a small function with the old behaviour, written on the new API.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

_REPLACEMENTS = {
    "nm_mask": (
        "pallas_kernels.nm.masks.nm_mask(score, n, m, axis) (jaxsparse.nm_mask); the old name ranked "
        "|w| along axis 0: use nm_mask(jnp.abs(w), n, m, axis=0)"
    ),
    "nm_problem": "pallas_kernels.nm.sparse_problem(rows, w, backend)",
    "use_nm_kernel": "pallas_kernels.nm.plan(rows, w, platforms=...).backend(platform)",
    "nm_cost_model": (
        "pallas_kernels.dispatch.estimate_seconds(sparse_problem(rows, w, backend), HARDWARE[platform])"
    ),
}


def module_getattr(module: str, names: Mapping[str, Callable[..., Any]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that returns ``names[name]`` with a ``DeprecationWarning``."""

    def __getattr__(name: str) -> Any:
        if name in names:
            warnings.warn(
                f"{module}.{name} is deprecated and will be removed in the next release; use "
                f"{_REPLACEMENTS[name]}.",
                DeprecationWarning,
                stacklevel=2,
            )
            return names[name]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def nm_mask_abs(w, n: int, m: int):
    """The old ``pallas_kernels.nm_mask(w, n, m)``: the ``n`` largest ``|w|`` of every ``m`` rows."""
    from pallas_kernels.nm.masks import nm_mask

    return nm_mask(jnp.abs(jnp.asarray(w)), n, m, axis=0)


def _old_problem(rows, k, n_out, n, m, dtype, kind):
    from pallas_kernels.nm.api import _problem

    return _problem(rows, k, n_out, n, m, dtype, kind)


def nm_problem(rows: int, k: int, n_out: int, n: int, m: int, dtype, kind: str):
    """The old ``nm_problem``: the cost-model view of ``(rows, K) @ W_nm`` on kernel ``kind``."""
    return _old_problem(rows, k, n_out, n, m, dtype, kind)


def _kernel_of(platform: str) -> str:
    return {"tpu": "tpu", "cuda": "mosaic_gpu"}[platform]


def nm_cost_model(platform: str, *, rows: int, k: int, n_out: int, n: int, m: int, dtype) -> dict:
    """The old ``nm_cost_model``: predicted seconds ``{"dense": ..., "kernel": ...}``."""
    from pallas_kernels import dispatch

    problem = _old_problem(rows, k, n_out, n, m, dtype, _kernel_of(platform))
    dense, kernel = dispatch.estimate_seconds(problem, dispatch.HARDWARE[platform])
    return {"dense": dense, "kernel": kernel}


def use_nm_kernel(
    platform: str, *, rows: int, k: int, n_out: int, n: int, m: int, dtype, pack_tile=None
) -> bool:
    """The old ``use_nm_kernel``: whether ``impl="auto"`` runs the kernel on ``platform``."""
    from pallas_kernels import dispatch
    from pallas_kernels.nm.api import _KERNELS

    kernel = _kernel_of(platform)
    dims = dict(rows=rows, k=k, n_out=n_out, n=n, m=m, dtype=dtype, pack_tile=pack_tile)
    if _KERNELS[kernel].unsupported_reason(**dims) is not None:
        return False
    problem = _old_problem(rows, k, n_out, n, m, dtype, kernel)
    return dispatch.choose(problem, platform) == "sparse"
