"""Sparse Flax layers (NNX and Linen) on the ``pallas_kernels`` ops, training helpers, model conversion."""
