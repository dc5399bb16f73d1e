"""Flax Linen sparse dense layers on the ``pallas_kernels`` ops: :class:`BlockSparseDense`, :class:`NMDense`.

Drop-in for :class:`flax.linen.Dense` (``features``, ``use_bias``, ``dtype``, ``param_dtype``, ``precision``,
``kernel_init``, ``bias_init``). Variables:

* ``params``: ``kernel_blocks [capacity, bk, bn]`` (block-sparse) or ``kernel_values [n, K // m, N]`` (N:M),
  and ``bias``; these are the only trainable leaves.
* ``sparse_pattern``: the non-trainable index leaves (block indices / N:M ``meta`` and ``nm_config``). Pass
  it to ``apply`` with the params: ``model.apply({"params": p, "sparse_pattern": s}, x)``.

The per-layer layout is the same as the NNX layers', so :mod:`jaxsparse.flax.train` and
:mod:`jaxsparse.flax.convert` work on both.

Example:
  >>> import jax, jax.numpy as jnp
  >>> layer = BlockSparseDense(4, block=(2, 2), density=0.5)
  >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 8)))
  >>> sorted(variables), variables["params"]["kernel_blocks"].shape
  (['params', 'sparse_pattern'], (4, 2, 2))
  >>> layer.apply(variables, jnp.ones((3, 8))).shape
  (3, 4)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxsparse.flax import _core

__all__ = ["BlockSparseDense", "NMDense", "PATTERN_COLLECTION"]

PATTERN_COLLECTION = _core.PATTERN_COLLECTION
_default_kernel_init = nn.initializers.lecun_normal()


def _check_pattern(module: nn.Module, fields: tuple[str, ...], packed: dict) -> None:
    if module.is_initializing():
        return  # the pattern is created from the packed initial kernel
    missing = [f for f in fields if not module.has_variable(PATTERN_COLLECTION, f)]
    if missing:
        raise ValueError(
            f"'{PATTERN_COLLECTION}/{missing[0]}' is missing: apply the layer with both collections, "
            f"model.apply({{'params': ..., '{PATTERN_COLLECTION}': ...}}, x)."
        )


def _missing(name: str):
    def init():
        raise ValueError(
            f"'{PATTERN_COLLECTION}/{name}' is missing: apply the layer with both collections, "
            f"model.apply({{'params': ..., '{PATTERN_COLLECTION}': ...}}, x)."
        )

    return init


class BlockSparseDense(nn.Module):
    """``y = x @ W + b`` with ``W`` stored as at most ``capacity`` non-zero ``(bk, bn)`` blocks.

    Attributes:
      features: output features (as :class:`flax.linen.Dense`).
      block: ``(bk, bn)``; must divide ``(in_features, features)``.
      capacity / density / block_mask: stored block slots, or a fraction of blocks, or an initial
        ``(Kb, Nb)`` bool mask (default mask: the ``capacity`` largest-L2 blocks of the initial kernel).
      impl, interpret: passed to :func:`~pallas_kernels.block_sparse.bsr_matmul`.
    """

    features: int
    block: tuple[int, int]
    capacity: int | None = None
    density: float | None = None
    block_mask: Any = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = _default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    impl: str = "auto"
    interpret: str | None = None

    @nn.compact
    def __call__(self, inputs: Float[Array, "... K"]) -> Float[Array, "... N"]:
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
            packed["w"] = _core.init_block_sparse(
                self.kernel_init(key, (k, self.features), self.param_dtype), block, capacity, mask
            )
            return packed["w"].data

        data = self.param(_core.BLOCK_PARAM, init_data)
        _check_pattern(self, _core.BLOCK_PATTERN_FIELDS, packed)
        pattern = {}
        for f in _core.BLOCK_PATTERN_FIELDS:
            init = (lambda f=f: getattr(packed["w"], f)) if self.is_initializing() else _missing(f)
            pattern[f] = self.variable(PATTERN_COLLECTION, f, init).value
        if data.shape != (capacity, *block):
            raise ValueError(
                f"{where}: params '{_core.BLOCK_PARAM}' has shape {data.shape}, but the layer stores "
                f"(capacity, bk, bn) = {(capacity, *block)}."
            )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        return _core.block_sparse_apply(
            inputs,
            data,
            pattern,
            bias,
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

    Example:
      >>> import jax, jax.numpy as jnp
      >>> v = NMDense(4).init(jax.random.key(0), jnp.ones((1, 16)))
      >>> v["params"]["kernel_values"].shape, v["sparse_pattern"]["nm_config"].tolist()
      ((2, 4, 4), [2, 4, 16])
    """

    features: int
    n: int = 2
    m: int = 4
    mask: Any = None
    pack_tile: int | None = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = _default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    impl: str = "auto"
    interpret: str | None = None

    @nn.compact
    def __call__(self, inputs: Float[Array, "... K"]) -> Float[Array, "... N"]:
        k = inputs.shape[-1]
        from pallas_kernels.nm import check_nm, default_pack_tile

        check_nm(self.n, self.m, k=k)
        pack_tile = self.pack_tile or default_pack_tile(k // self.m, self.m)
        packed = {}

        def init_values(key):
            kernel = self.kernel_init(key, (k, self.features), self.param_dtype)
            packed["w"] = _core.init_nm(kernel, self.n, self.m, self.mask, pack_tile)
            return packed["w"].values

        values = self.param(_core.NM_PARAM, init_values)
        _check_pattern(self, _core.NM_PATTERN_FIELDS, packed)
        pattern = {}
        for f in _core.NM_PATTERN_FIELDS:
            init = (
                (lambda f=f: _core.nm_pattern(packed["w"])[f])
                if self.is_initializing()
                else _missing(f)
            )
            pattern[f] = self.variable(PATTERN_COLLECTION, f, init).value
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        return _core.nm_apply(
            inputs,
            values,
            pattern["meta"],
            bias,
            n=self.n,
            m=self.m,
            pack_tile=pack_tile,
            dtype=self.dtype,
            precision=self.precision,
            impl=self.impl,
            interpret=self.interpret,
        )
