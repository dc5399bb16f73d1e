"""Pallas kernels for sparse matmuls (block-sparse and N:M), with an XLA reference for every platform."""
