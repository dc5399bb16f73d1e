"""Block-sparse weight format and the ``bsr_matmul`` op (Pallas TPU / Mosaic GPU kernels, XLA reference)."""

from pallas_kernels.block_sparse.api import bsr_matmul, plan, sparse_problem
from pallas_kernels.block_sparse.format import (
    BlockSparseWeight,
    block_mask_from_dense,
    block_mask_of,
    block_sparse_from_dense,
    block_sparse_to_dense,
    with_data,
)

__all__ = [
    "BlockSparseWeight",
    "block_mask_from_dense",
    "block_mask_of",
    "block_sparse_from_dense",
    "block_sparse_to_dense",
    "bsr_matmul",
    "plan",
    "sparse_problem",
    "with_data",
]
