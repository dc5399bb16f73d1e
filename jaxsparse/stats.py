"""Measuring sparsity: per-leaf and global nnz / sparsity, and a FLOPs estimate for Dense and Conv layers.

These read concrete arrays and return Python numbers (for logging and reports), so call them outside ``jit``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from jaxsparse._tree import path_name

__all__ = ["LeafStats", "sparsity_summary", "global_sparsity", "flops"]


class LeafStats(NamedTuple):
    size: int
    nnz: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.size if self.size else 0.0


def sparsity_summary(params: PyTree) -> dict[str, LeafStats]:
    """``{'Dense_0/kernel': LeafStats(size, nnz), ...}`` counting exact nonzeros of every leaf.

    The count runs where each array lives (only the integer reaches the host), so leaves sharded over several
    processes work; call it outside ``jit``.

    Args:
      params: a pytree of arrays (``jax.Array`` or NumPy).

    Returns:
      A dict from each leaf's path name (``'/'``-joined keys) to its :class:`LeafStats`, in leaf order.

    Example:
      >>> import jax.numpy as jnp
      >>> sparsity_summary({"w": jnp.array([[0.0, 1.0], [2.0, 0.0]])})["w"].sparsity
      0.5
    """
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[path_name(path)] = LeafStats(int(np.size(leaf)), _count_nonzero(leaf))
    return out


def _count_nonzero(leaf) -> int:
    """Counted where the array lives: only the count reaches the host (a leaf sharded over several
    processes cannot be fetched whole by any of them)."""
    if isinstance(leaf, jax.Array):
        return int(jnp.count_nonzero(leaf))
    return int(np.count_nonzero(np.asarray(leaf)))


def global_sparsity(params: PyTree, min_ndim: int = 2) -> float:
    """Fraction of zeros over all leaves with ``ndim >= min_ndim`` (the default prunable set).

    Args:
      params: a pytree of arrays.
      min_ndim: leaves with fewer dimensions (biases, norm scales by default) are not counted.

    Returns:
      ``1 - nnz / size`` over the counted leaves as a Python float; 0.0 when no leaf is counted.

    Example:
      >>> import jax.numpy as jnp
      >>> global_sparsity({"w": jnp.array([[0.0, 1.0], [2.0, 0.0]]), "b": jnp.zeros(2)})
      0.5
    """
    stats = [
        s
        for p, s in zip(jax.tree.leaves(params), sparsity_summary(params).values())
        if np.ndim(p) >= min_ndim
    ]
    size = sum(s.size for s in stats)
    return 1.0 - sum(s.nnz for s in stats) / size if size else 0.0


def flops(
    params: PyTree, spatial: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[float, float]:
    """``(dense, sparse)`` multiply-add FLOPs (x2) of one example's forward pass through Dense and Conv kernels.

    A 2-D leaf ``(in, out)`` counts ``2 * in * out``; an N-D conv kernel (``HWIO``) counts
    ``2 * prod(kernel) * prod(output spatial dims)``, with the output spatial dims given per path in ``spatial``
    (a conv kernel without an entry is an error). Sparse FLOPs scale each layer by its density (nonzeros / size),
    as RigL's accounting does. Other leaves (biases, norms) and zero-size kernels are ignored.

    Args:
      params: a pytree of parameters (or masked parameters).
      spatial: ``{path name: output spatial dims}`` for every conv kernel (ndim > 2), path names as in
        :func:`sparsity_summary`.

    Returns:
      ``(dense, sparse)`` FLOPs as Python floats.

    Raises:
      ValueError: a conv kernel has no entry in ``spatial``.

    Example:
      >>> import jax.numpy as jnp
      >>> flops({"Dense_0": {"kernel": jnp.array([[1.0, 0.0], [0.0, 0.0]])}})
      (8.0, 2.0)
    """
    spatial = dict(spatial or {})
    dense = sparse = 0.0
    for (name, st), leaf in zip(sparsity_summary(params).items(), jax.tree.leaves(params)):
        if np.ndim(leaf) < 2 or st.size == 0:  # a zero-size kernel does no work
            continue
        per_position = 2.0 * st.size
        if np.ndim(leaf) > 2:
            if name not in spatial:
                raise ValueError(
                    f"conv kernel '{name}' (shape {np.shape(leaf)}) needs its output spatial dims in `spatial`."
                )
            per_position *= math.prod(spatial[name])
        dense += per_position
        sparse += per_position * st.nnz / st.size
    return dense, sparse
