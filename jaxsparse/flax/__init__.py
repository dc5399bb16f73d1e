"""Sparse Flax layers (NNX and Linen) on the ``pallas_kernels`` ops, training with changing masks, conversion.

Layers (drop-in for ``nnx.Linear`` / ``nn.Dense``; forward and backward on ``bsr_matmul`` / ``nm_matmul``):

* NNX: :class:`~jaxsparse.flax.nnx.BlockSparseLinear`, :class:`~jaxsparse.flax.nnx.NMLinear`
* Linen: :class:`~jaxsparse.flax.linen.BlockSparseDense`, :class:`~jaxsparse.flax.linen.NMDense`

How params are stored: the layer holds the *compressed* kernel. The stored values (``kernel_blocks [capacity,
bk, bn]`` or ``kernel_values [n, K // m, N]``) and the bias are the only trainable params; the indices are
one pattern object per layer, :class:`BlockSparsePattern` or :class:`NMPattern` (index arrays as leaves,
the static config — shape, block, n, m, pack_tile — as pytree metadata), held in an NNX
:class:`~jaxsparse.flax.nnx.SparsePattern` variable or the Linen ``sparse_pattern`` collection. So
gradients and optimizer state are sparse-sized, both passes run on the sparse ops (dW only at stored
blocks), every layer method runs under ``jit``, and a mask change is a re-pack of values + indices at the
same static capacity inside the compiled step (:mod:`jaxsparse.flax.train`), moving optimizer moments with
their blocks.

Conversion and checkpoints: :mod:`jaxsparse.flax.convert` (masked dense params <-> compressed params for
Linen trees and whole NNX models; orbax save/restore with a ``layout.json``; the on-disk format is
described in ``docs/compressed_format.md``).

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from flax import nnx
  >>> from jaxsparse.flax import BlockSparseLinear, SparsePattern, block_gmp_step
  >>> model = BlockSparseLinear(8, 8, block=(4, 4), capacity=3, rngs=nnx.Rngs(0))
  >>> graphdef, params, pattern = nnx.split(model, nnx.Param, SparsePattern)
  >>> tx = optax.sgd(0.1)
  >>> @jax.jit
  ... def step(params, pattern, opt_state, i, x):
  ...   loss = lambda p: jnp.sum(nnx.merge(graphdef, p, pattern)(x) ** 2)
  ...   updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
  ...   params = optax.apply_updates(params, updates)
  ...   return block_gmp_step(params, pattern, opt_state, i, tx=tx, final_sparsity=0.75,
  ...                         initial_sparsity=0.25, begin_step=0, end_step=2, frequency=1)
  >>> opt_state = tx.init(params)
  >>> for i in range(3):
  ...   params, pattern, opt_state = step(params, pattern, opt_state, i, jnp.ones((2, 8)))
  >>> int(pattern["pattern"].get_value().nnz), step._cache_size()
  (1, 1)
"""

from jaxsparse._deprecations import module_getattr as _module_getattr
from jaxsparse.flax._core import BlockSparsePattern, NMPattern, upgrade_patterns
from jaxsparse.flax.convert import compress, decompress, to_dense_nnx, to_sparse_nnx
from jaxsparse.flax.linen import BlockSparseDense, NMDense
from jaxsparse.flax.nnx import BlockSparseLinear, NMLinear, SparsePattern
from jaxsparse.flax.train import (
    block_gmp_step,
    block_magnitude_masks,
    block_sparse_weights,
    live_block_scores,
    repack,
    repack_blocks,
    slot_sources,
    stored_block_masks,
    take_slots,
)

__all__ = [
    # layers and their pattern objects
    "BlockSparseLinear",
    "NMLinear",
    "SparsePattern",
    "BlockSparseDense",
    "NMDense",
    "BlockSparsePattern",
    "NMPattern",
    # training with changing block masks
    "block_gmp_step",
    "block_magnitude_masks",
    "block_sparse_weights",
    "live_block_scores",
    "repack",
    "repack_blocks",
    "slot_sources",
    "stored_block_masks",
    "take_slots",
    # conversion
    "compress",
    "decompress",
    "to_sparse_nnx",
    "to_dense_nnx",
    "upgrade_patterns",
]

__getattr__ = _module_getattr(
    __name__, {"block_masks": ("jaxsparse.flax.stored_block_masks", stored_block_masks)}
)
