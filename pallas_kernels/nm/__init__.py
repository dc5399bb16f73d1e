"""N:M structured sparsity along the contraction axis: compressed format and ``nm_matmul``.

Example::

  >>> import jax, jax.numpy as jnp
  >>> from pallas_kernels.nm import pack_nm, nm_matmul
  >>> w_nm = pack_nm(jax.random.normal(jax.random.key(0), (128, 64)), n=2, m=4)
  >>> nm_matmul(jnp.ones((1, 128)), w_nm).shape
  (1, 64)
"""

from pallas_kernels import _deprecations
from pallas_kernels.nm.api import (
    nm_matmul,
    nm_weight_bytes,
    plan,
    sparse_problem,
    validate_nm_weight,
)
from pallas_kernels.nm.format import (
    NMWeight,
    check_nm,
    default_pack_tile,
    index_bits,
    is_nm_mask,
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
    "nm_matmul",
    "nm_nbytes",
    "nm_weight_bytes",
    "pack_nm",
    "plan",
    "sparse_problem",
    "unpack_indices",
    "unpack_nm",
    "validate_nm_weight",
]

__getattr__ = _deprecations.module_getattr(
    __name__,
    {
        "nm_mask": _deprecations.nm_mask_abs,
        "nm_problem": _deprecations.nm_problem,
        "use_nm_kernel": _deprecations.use_nm_kernel,
        "nm_cost_model": _deprecations.nm_cost_model,
    },
)
