"""N:M structured sparsity along the contraction axis: compressed format and ``nm_matmul``.

Example::

  >>> import jax, jax.numpy as jnp
  >>> from pallas_kernels.nm import pack_nm, nm_matmul
  >>> w_nm = pack_nm(jax.random.normal(jax.random.key(0), (128, 64)), n=2, m=4)
  >>> nm_matmul(jnp.ones((1, 128)), w_nm).shape
  (1, 64)
"""

from pallas_kernels.nm.api import (
    nm_cost_model,
    nm_matmul,
    nm_problem,
    plan,
    use_nm_kernel,
    validate_nm_weight,
)
from pallas_kernels.nm.format import (
    NMWeight,
    check_nm,
    default_pack_tile,
    index_bits,
    is_nm_mask,
    nm_mask,
    nm_nbytes,
    pack_nm,
    unpack_indices,
    unpack_nm,
)

__all__ = [
    "NMWeight",
    "check_nm",
    "default_pack_tile",
    "index_bits",
    "is_nm_mask",
    "nm_cost_model",
    "nm_mask",
    "nm_matmul",
    "nm_nbytes",
    "nm_problem",
    "plan",
    "pack_nm",
    "unpack_indices",
    "unpack_nm",
    "use_nm_kernel",
    "validate_nm_weight",
]
