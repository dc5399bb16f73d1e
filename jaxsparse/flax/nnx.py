"""Flax NNX sparse linear layers on the ``pallas_kernels`` ops: :class:`BlockSparseLinear`, :class:`NMLinear`.

Both are drop-in for :class:`flax.nnx.Linear` (``in_features, out_features``, ``use_bias``, ``dtype``,
``param_dtype``, ``precision``, ``kernel_init``, ``bias_init``, ``rngs``): the dense kernel is drawn with
``kernel_init`` exactly as ``nnx.Linear`` would, then packed. Forward and backward run on
:func:`pallas_kernels.block_sparse.bsr_matmul` / :func:`pallas_kernels.nm.nm_matmul` (Pallas kernels on
TPU/GPU, the XLA reference or dense ``jnp.dot`` elsewhere, as the ops' dispatch decides; ``impl`` overrides).

Storage: only the stored values are :class:`flax.nnx.Param` (``kernel_blocks [capacity, bk, bn]`` or
``kernel_values [n, K // m, N]``, plus ``bias``), so ``nnx.state(model, nnx.Param)`` is exactly what an
optimizer should see. The indices are one :class:`SparsePattern` variable, ``pattern``, holding a
:class:`~jaxsparse.flax.BlockSparsePattern` or :class:`~jaxsparse.flax.NMPattern` (read it with
``layer.pattern.get_value()``); the static config (block, capacity, n, m, pack_tile) is Python ints on the
layer and static metadata of the pattern, so every method runs under ``nnx.jit``. The capacity (stored
block slots) is static, so a changed mask is re-packed on device into the same shapes
(:meth:`BlockSparseLinear.set_block_mask` or the tree functions in :mod:`jaxsparse.flax.train`) without
recompiling.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> layer = BlockSparseLinear(8, 4, block=(2, 2), density=0.5, rngs=nnx.Rngs(0))
  >>> layer.kernel_blocks.shape, int(layer.block_mask().sum()), layer.pattern.get_value().capacity
  ((4, 2, 2), 4, 4)
  >>> bool(jnp.allclose(layer(jnp.ones((3, 8))), jnp.ones((3, 8)) @ layer.todense() + layer.bias[...]))
  True
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import default_kernel_init
from flax.typing import Dtype, Initializer, PrecisionLike
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from jaxsparse.flax import _core
from jaxsparse.flax._core import BlockSparsePattern, NMPattern
from pallas_kernels.block_sparse import BlockSparseWeight, block_mask_of, block_sparse_to_dense
from pallas_kernels.nm import NMWeight, check_nm, unpack_nm

__all__ = ["SparsePattern", "BlockSparseLinear", "NMLinear"]


class SparsePattern(nnx.Variable):
    """Non-trainable variable holding a layer's pattern object (block indices or N:M positions).

    Its value is a :class:`~jaxsparse.flax.BlockSparsePattern` or :class:`~jaxsparse.flax.NMPattern`; filter
    with it to split the indices from the trainable params:
    ``graphdef, params, pattern = nnx.split(model, nnx.Param, SparsePattern)``.
    """


def _bias(
    use_bias: bool, init: Initializer, rngs: nnx.Rngs, n: int, dtype: Dtype
) -> nnx.Param | None:
    return nnx.Param(init(rngs.params(), (n,), dtype)) if use_bias else nnx.data(None)


class BlockSparseLinear(nnx.Module):
    """``y = x @ W + b`` with ``W`` stored as at most ``capacity`` non-zero ``(bk, bn)`` blocks.

    Args:
      in_features, out_features: as :class:`flax.nnx.Linear`.
      block: ``(bk, bn)`` block shape; must divide ``(in_features, out_features)``.
      capacity: stored block slots (static). Or give ``density`` (fraction of blocks, rounded up) or just
        ``block_mask`` (capacity = its block count).
      block_mask: optional initial ``(Kb, Nb)`` bool mask; default: the ``capacity`` blocks of largest L2 norm
        of the initial dense kernel.
      impl, interpret: passed to :func:`~pallas_kernels.block_sparse.bsr_matmul`.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init, rngs: as :class:`flax.nnx.Linear`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = BlockSparseLinear(8, 8, block=(4, 4), capacity=2, rngs=nnx.Rngs(0))
      >>> src = nnx.jit(lambda l, m: l.set_block_mask(m))(layer, jnp.array([[1, 0], [0, 0]], bool))
      >>> layer.block_mask().tolist(), int(layer.pattern.get_value().nnz)
      ([[True, False], [False, False]], 1)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        block: tuple[int, int],
        capacity: int | None = None,
        density: float | None = None,
        block_mask: Bool[ArrayLike, "Kb Nb"] | None = None,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        impl: str = "auto",
        interpret: str | None = None,
        rngs: nnx.Rngs,
    ):
        where = f"BlockSparseLinear({in_features}, {out_features})"
        self.block = _core.check_block(block, in_features, out_features, where)
        grid = (in_features // self.block[0], out_features // self.block[1])
        self.capacity = _core.resolve_capacity(capacity, density, block_mask, grid, where)
        if block_mask is not None:
            block_mask = _core.check_block_mask(block_mask, grid, self.capacity, where)
        kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        w = _core.init_block_sparse(kernel, self.block, self.capacity, block_mask)
        self.kernel_blocks = nnx.Param(w.data)
        self.pattern = SparsePattern(BlockSparsePattern.of(w))
        self.bias = _bias(use_bias, bias_init, rngs, out_features, param_dtype)
        self.in_features, self.out_features, self.use_bias = in_features, out_features, use_bias
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self.impl, self.interpret = impl, interpret

    @property
    def weight(self) -> BlockSparseWeight:
        """The kernel as a :class:`~pallas_kernels.block_sparse.BlockSparseWeight`."""
        return self.pattern.get_value().weight(self.kernel_blocks[...])

    def __call__(self, inputs: Float[Array, "... K"]) -> Float[Array, "... N"]:
        """``inputs @ W + bias`` on :func:`~pallas_kernels.block_sparse.bsr_matmul`."""
        return _core.sparse_apply(
            inputs,
            self.kernel_blocks[...],
            self.pattern.get_value(),
            self.bias[...] if self.bias is not None else None,
            dtype=self.dtype,
            precision=self.precision,
            impl=self.impl,
            interpret=self.interpret,
        )

    def block_mask(self) -> Bool[Array, "Kb Nb"]:
        """``(Kb, Nb)`` bool mask of the stored blocks."""
        return block_mask_of(self.weight)

    def todense(self) -> Float[Array, "K N"]:
        """The dense ``(in_features, out_features)`` kernel (zeros outside the stored blocks)."""
        return block_sparse_to_dense(self.weight)

    def set_block_mask(self, block_mask: Bool[ArrayLike, "Kb Nb"]) -> Int[Array, " cap"]:
        """Re-packs in place to ``block_mask`` (same capacity, works under ``nnx.jit``).

        Kept blocks keep their values, new blocks start at zero.

        Args:
          block_mask: ``(Kb, Nb)`` bool with at most ``capacity`` blocks.

        Returns:
          The ``[capacity]`` slot sources: move slot-shaped optimizer state with
          :func:`jaxsparse.flax.train.take_slots` and them.
        """
        mask = _core.check_block_mask(
            block_mask, self.pattern.get_value().grid_shape, self.capacity, type(self).__name__
        )
        w, src = _core.repack(self.weight, mask)
        self.kernel_blocks[...] = w.data
        self.pattern.set_value(BlockSparsePattern.of(w))
        return src


class NMLinear(nnx.Module):
    """``y = x @ W + b`` with ``W`` stored N:M-sparse along the contraction axis (``n`` of every ``m`` inputs).

    Args:
      in_features, out_features: as :class:`flax.nnx.Linear`; ``in_features % m == 0``.
      n, m: keep ``n`` of every ``m`` consecutive inputs per output (``1 <= n <= m <= 16``).
      mask: optional initial ``(in, out)`` bool N:M mask; default: N:M magnitude mask of the initial kernel.
      pack_tile: metadata packing tile (see :func:`pallas_kernels.nm.pack_nm`).
      impl, interpret: passed to :func:`~pallas_kernels.nm.nm_matmul`.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init, rngs: as :class:`flax.nnx.Linear`.

    Example:
      >>> from flax import nnx
      >>> layer = NMLinear(16, 4, n=2, m=4, rngs=nnx.Rngs(0))
      >>> layer.kernel_values.shape, int((nnx.jit(lambda l: l.todense())(layer) != 0).sum())
      ((2, 4, 4), 32)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        n: int = 2,
        m: int = 4,
        mask: Bool[ArrayLike, "K N"] | None = None,
        pack_tile: int | None = None,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
        impl: str = "auto",
        interpret: str | None = None,
        rngs: nnx.Rngs,
    ):
        check_nm(n, m, k=in_features)
        kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        w = _core.init_nm(kernel, n, m, mask, pack_tile)
        self.kernel_values = nnx.Param(w.values)
        self.pattern = SparsePattern(NMPattern.of(w))
        self.bias = _bias(use_bias, bias_init, rngs, out_features, param_dtype)
        self.in_features, self.out_features, self.use_bias = in_features, out_features, use_bias
        self.n, self.m, self.pack_tile = n, m, w.pack_tile
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self.impl, self.interpret = impl, interpret

    @property
    def weight(self) -> NMWeight:
        """The kernel as a :class:`~pallas_kernels.nm.NMWeight`."""
        return self.pattern.get_value().weight(self.kernel_values[...])

    def __call__(self, inputs: Float[Array, "... K"]) -> Float[Array, "... N"]:
        """``inputs @ W + bias`` on :func:`~pallas_kernels.nm.nm_matmul`."""
        return _core.sparse_apply(
            inputs,
            self.kernel_values[...],
            self.pattern.get_value(),
            self.bias[...] if self.bias is not None else None,
            dtype=self.dtype,
            precision=self.precision,
            impl=self.impl,
            interpret=self.interpret,
        )

    def todense(self) -> Float[Array, "K N"]:
        """The dense ``(in_features, out_features)`` kernel (zeros at dropped positions)."""
        return unpack_nm(self.weight)
