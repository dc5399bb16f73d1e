"""Rules shared by the Pallas-Triton kernels (block-sparse and N:M): dtypes, tile sizes, interpret flag.

Triton tensors have power-of-two sizes and ``tt.dot`` needs every dim >= 16, so every tile is a power of two
of at least :data:`MIN_DIM`. The kernels run compiled for a GPU or in the Pallas HLO interpreter.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

__all__ = [
    "MIN_DIM",
    "SUPPORTED_DTYPES",
    "dtype_reason",
    "interpret_flag",
    "is_pow2",
    "is_tile",
    "tile_covering",
]

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_DIM = 16  # tt.dot needs M, N, K >= 16


def is_pow2(v: Any) -> bool:
    """``True`` for a positive Python int that is a power of two."""
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and v & (v - 1) == 0


def is_tile(v: Any) -> bool:
    """``True`` for a valid Triton tile size: a power of two >= :data:`MIN_DIM`."""
    return is_pow2(v) and v >= MIN_DIM


def tile_covering(size: int, *, cap: int) -> int:
    """The smallest tile covering ``size`` (at least :data:`MIN_DIM`), at most ``cap``."""
    return min(cap, max(MIN_DIM, 1 << max(size - 1, 0).bit_length()))


def dtype_reason(dtype, what: str) -> str | None:
    """Why ``what`` cannot run ``dtype`` (``None`` for float32, bfloat16, float16)."""
    if jnp.dtype(dtype) in SUPPORTED_DTYPES:
        return None
    return f"dtype {jnp.dtype(dtype)} is not supported by {what} (float32, bfloat16, float16)"


def interpret_flag(interpret: Any) -> bool:
    """``False`` (compile for the GPU) for ``None``/``False``, ``True`` (HLO interpreter) for ``True``."""
    if interpret is None or interpret is False:
        return False
    if interpret is True:
        return True
    raise ValueError(
        "interpret must be None/False (compile) or True (Pallas HLO interpreter) for the Triton "
        f"kernels; got {interpret!r}."
    )
