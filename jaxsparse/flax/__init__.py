"""Sparse Flax layers (NNX and Linen) on the ``pallas_kernels`` ops, training with changing masks, conversion.

Layers (drop-in for ``nnx.Linear`` / ``nn.Dense``; forward and backward on ``bsr_matmul`` / ``nm_matmul``):

* NNX: :class:`~jaxsparse.flax.nnx.BlockSparseLinear`, :class:`~jaxsparse.flax.nnx.NMLinear`
* Linen: :class:`~jaxsparse.flax.linen.BlockSparseDense`, :class:`~jaxsparse.flax.linen.NMDense`

How params are stored: the layer holds the *compressed* kernel. The stored values (``kernel_blocks [capacity,
bk, bn]`` or ``kernel_values [n, K // m, N]``) and the bias are the only trainable params; indices are
non-trainable (NNX :class:`~jaxsparse.flax.nnx.SparsePattern` variables, Linen ``sparse_pattern``
collection). So gradients and optimizer state are sparse-sized, both passes run on the sparse ops (dW only
at stored blocks), and a mask change is a re-pack of values + indices at the same static capacity inside the
compiled step (:mod:`jaxsparse.flax.train`), moving optimizer moments with their blocks.

Conversion and checkpoints: :mod:`jaxsparse.flax.convert` (masked dense params <-> compressed params for
Linen trees and whole NNX models; orbax save/restore with a ``layout.json``; see
``docs/compressed_format.md``).

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
  >>> int(pattern["nnz"][...]), step._cache_size()
  (1, 1)
"""

from jaxsparse.flax.convert import compress, decompress, to_dense_nnx, to_sparse_nnx
from jaxsparse.flax.linen import BlockSparseDense, NMDense
from jaxsparse.flax.nnx import BlockSparseLinear, NMLinear, SparsePattern
from jaxsparse.flax.train import (
    block_gmp_step,
    block_magnitude_masks,
    block_masks,
    block_sparse_weights,
    repack,
    repack_blocks,
    take_slots,
)

__all__ = [
    "BlockSparseLinear",
    "NMLinear",
    "SparsePattern",
    "BlockSparseDense",
    "NMDense",
    "block_gmp_step",
    "block_magnitude_masks",
    "block_masks",
    "block_sparse_weights",
    "repack",
    "repack_blocks",
    "take_slots",
    "compress",
    "decompress",
    "to_sparse_nnx",
    "to_dense_nnx",
]
