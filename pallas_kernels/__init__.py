"""Pallas kernels for sparse matmuls (block-sparse and N:M), with an XLA reference for every platform."""

from pallas_kernels import _deprecations

# Block-sparse (BSR/BSC) weights and matmul.
from pallas_kernels.block_sparse import (
    BlockSparseWeight,
    block_mask_from_dense,
    block_sparse_from_dense,
    block_sparse_to_dense,
    bsr_matmul,
)
from pallas_kernels.dispatch import Plan

# N:M weights (groups along the contraction axis) and matmul.
from pallas_kernels.nm import NMWeight, nm_matmul, pack_nm, unpack_nm

__all__ = [
    "BlockSparseWeight",
    "NMWeight",
    "Plan",
    "block_mask_from_dense",
    "block_sparse_from_dense",
    "block_sparse_to_dense",
    "bsr_matmul",
    "nm_matmul",
    "pack_nm",
    "unpack_nm",
]

__getattr__ = _deprecations.module_getattr(__name__, {"nm_mask": _deprecations.nm_mask_abs})
