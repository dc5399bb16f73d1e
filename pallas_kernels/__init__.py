"""Pallas kernels for sparse matmuls (block-sparse and N:M), with an XLA reference for every platform."""

# Block-sparse (BSR/BSC) weights and matmul.
from pallas_kernels.block_sparse import (  # noqa: E402
    BlockSparseWeight,
    block_mask_from_dense,
    block_sparse_from_dense,
    block_sparse_to_dense,
    bsr_matmul,
)

# N:M weights (groups along the contraction axis) and matmul.
from pallas_kernels.nm import NMWeight, nm_mask, nm_matmul, pack_nm, unpack_nm  # noqa: E402
