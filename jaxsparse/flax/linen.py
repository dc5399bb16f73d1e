"""Flax Linen sparse dense layers on the ``pallas_kernels`` ops: :class:`BlockSparseDense`, :class:`NMDense`.

Drop-in for :class:`flax.linen.Dense` (``features``, ``use_bias``, ``dtype``, ``param_dtype``, ``precision``,
``kernel_init``, ``bias_init``). Variables:

* ``params``: ``kernel_blocks [capacity, bk, bn]`` (block-sparse) or ``kernel_values [n, K // m, N]`` (N:M),
  and ``bias``; these are the only trainable leaves.
* ``sparse_pattern``: one ``pattern`` per layer, a :class:`~jaxsparse.flax.BlockSparsePattern` or
  :class:`~jaxsparse.flax.NMPattern` (index arrays; the static config is pytree metadata). Pass it to
  ``apply`` with the params: ``model.apply({"params": p, "sparse_pattern": s}, x)``.

The per-layer layout is the same as the NNX layers', so :mod:`jaxsparse.flax.train` and
:mod:`jaxsparse.flax.convert` work on both.

Example:
  >>> import jax, jax.numpy as jnp
  >>> layer = BlockSparseDense(4, block=(2, 2), density=0.5)
  >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 8)))
  >>> sorted(variables), variables["params"]["kernel_blocks"].shape
  (['params', 'sparse_pattern'], (4, 2, 2))
  >>> type(variables["sparse_pattern"]["pattern"]).__name__
  'BlockSparsePattern'
  >>> jax.jit(layer.apply)(variables, jnp.ones((3, 8))).shape
  (3, 4)
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Dtype, Initializer, PrecisionLike
from jaxtyping import Array, ArrayLike, Bool, Float

from jaxsparse.flax import _core
from jaxsparse.flax._core import PATTERN, PATTERN_COLLECTION, BlockSparsePattern, NMPattern
from pallas_kernels.nm import check_nm

__all__ = ["BlockSparseDense", "NMDense", "PATTERN_COLLECTION"]

_default_kernel_init = nn.initializers.lecun_normal()


def _pattern_variable(
    module: nn.Module, make: Callable[[], BlockSparsePattern | NMPattern]
) -> BlockSparsePattern | NMPattern:
    """The layer's pattern object: created by ``make`` at init, read from ``sparse_pattern`` at apply."""
    if not module.is_initializing() and not module.has_variable(PATTERN_COLLECTION, PATTERN):
        old = any(module.has_variable(PATTERN_COLLECTION, f) for f in ("row_idx", "meta"))
        hint = (
            f"this '{PATTERN_COLLECTION}' has the per-field layout of jaxsparse 0.1: convert it with "
            f"jaxsparse.flax.upgrade_patterns(params, {PATTERN_COLLECTION})"
            if old
            else f"apply the layer with both collections, model.apply({{'params': ..., "
            f"'{PATTERN_COLLECTION}': ...}}, x)"
        )
        raise ValueError(
            f"'{PATTERN_COLLECTION}/{PATTERN}' of layer '{'/'.join(module.scope.path)}' is missing: "
            f"{hint}."
        )
    return module.variable(PATTERN_COLLECTION, PATTERN, make).value


def _bias(module: nn.Module, features: int) -> Float[Array, " N"] | None:
    if not module.use_bias:
        return None
    return module.param("bias", module.bias_init, (features,), module.param_dtype)


class BlockSparseDense(nn.Module):
    """``y = x @ W + b`` with ``W`` stored as at most ``capacity`` non-zero ``(bk, bn)`` blocks.

    Attributes:
      features: output features (as :class:`flax.linen.Dense`).
      block: ``(bk, bn)``; must divide ``(in_features, features)``.
      capacity / density / block_mask: stored block slots, or a fraction of blocks, or an initial
        ``(Kb, Nb)`` bool mask (default mask: the ``capacity`` largest-L2 blocks of the initial kernel).
      impl, interpret: passed to :func:`~pallas_kernels.block_sparse.bsr_matmul`.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as :class:`flax.linen.Dense`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> v = BlockSparseDense(8, block=(4, 4), capacity=2).init(jax.random.key(0), jnp.ones((1, 16)))
      >>> p = v["sparse_pattern"]["pattern"]
      >>> v["params"]["kernel_blocks"].shape, p.shape, p.block, int(p.nnz)
      ((2, 4, 4), (16, 8), (4, 4), 2)
    """

    features: int
    block: tuple[int, int]
    capacity: int | None = None
    density: float | None = None
    block_mask: Bool[ArrayLike, "Kb Nb"] | None = None
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = _default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    impl: str = "auto"
    interpret: str | None = None

    @nn.compact
    def __call__(self, inputs: Float[Array, "... K"]) -> Float[Array, "... N"]:
        """``inputs @ W + bias`` on :func:`~pallas_kernels.block_sparse.bsr_matmul`."""
        k = inputs.shape[-1]
        where = (
            f"BlockSparseDense(features={self.features}) at {'/'.join(self.scope.path) or '<root>'}"
        )
        block = _core.check_block(self.block, k, self.features, where)
        grid = (k // block[0], self.features // block[1])
        capacity = _core.resolve_capacity(self.capacity, self.density, self.block_mask, grid, where)
        mask = (
            None
            if self.block_mask is None
            else _core.check_block_mask(self.block_mask, grid, capacity, where)
        )
        packed = {}

        def init_data(key):
            kernel = self.kernel_init(key, (k, self.features), self.param_dtype)
            packed["w"] = _core.init_block_sparse(kernel, block, capacity, mask)
            return packed["w"].data

        data = self.param(_core.BLOCK_PARAM, init_data)
        pattern = _pattern_variable(self, lambda: BlockSparsePattern.of(packed["w"]))
        want = {"shape": (k, self.features), "block": block, "capacity": capacity}
        pattern = _core.check_pattern(pattern, BlockSparsePattern, want, where)
        return _core.sparse_apply(
            inputs,
            data,
            pattern,
            _bias(self, self.features),
            dtype=self.dtype,
            precision=self.precision,
            impl=self.impl,
            interpret=self.interpret,
        )


class NMDense(nn.Module):
    """``y = x @ W + b`` with ``W`` stored N:M-sparse along the contraction axis.

    Attributes:
      features: output features.
      n, m: keep ``n`` of every ``m`` consecutive inputs per output.
      mask: optional initial ``(in, features)`` N:M bool mask (default: magnitude mask of the initial kernel).
      pack_tile, impl, interpret: see :func:`pallas_kernels.nm.pack_nm` / :func:`~pallas_kernels.nm.nm_matmul`.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as :class:`flax.linen.Dense`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> v = NMDense(4).init(jax.random.key(0), jnp.ones((1, 16)))
      >>> p = v["sparse_pattern"]["pattern"]
      >>> v["params"]["kernel_values"].shape, (p.n, p.m, p.pack_tile, p.shape)
      ((2, 4, 4), (2, 4, 16, (16, 4)))
    """

    features: int
    n: int = 2
    m: int = 4
    mask: Bool[ArrayLike, "K N"] | None = None
    pack_tile: int | None = None
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = _default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    impl: str = "auto"
    interpret: str | None = None

    @nn.compact
    def __call__(self, inputs: Float[Array, "... K"]) -> Float[Array, "... N"]:
        """``inputs @ W + bias`` on :func:`~pallas_kernels.nm.nm_matmul`."""
        k = inputs.shape[-1]
        where = f"NMDense(features={self.features}) at {'/'.join(self.scope.path) or '<root>'}"
        check_nm(self.n, self.m, k=k)
        packed = {}

        def init_values(key):
            kernel = self.kernel_init(key, (k, self.features), self.param_dtype)
            packed["w"] = _core.init_nm(kernel, self.n, self.m, self.mask, self.pack_tile)
            return packed["w"].values

        values = self.param(_core.NM_PARAM, init_values)
        pattern = _pattern_variable(self, lambda: NMPattern.of(packed["w"]))
        want = {"shape": (k, self.features), "n": self.n, "m": self.m}
        if self.pack_tile is not None:
            want["pack_tile"] = self.pack_tile
        pattern = _core.check_pattern(pattern, NMPattern, want, where)
        return _core.sparse_apply(
            inputs,
            values,
            pattern,
            _bias(self, self.features),
            dtype=self.dtype,
            precision=self.precision,
            impl=self.impl,
            interpret=self.interpret,
        )
