"""Compressed N:M weight format: kept values plus bit-packed positions.

A weight ``W: (K, N)`` (Flax ``Dense`` kernel layout ``(in, out)``) is N:M sparse when every group of ``m``
consecutive rows along the contraction axis ``K`` (axis 0) holds at most ``n`` non-zeros in each column.
This is NVIDIA's 2:4 convention: the sparse operand is sparse along the reduction axis.

:class:`NMWeight` stores

* ``values``: ``(n, G, N)`` with ``G = K // m``, the kept values "slot-major" (slot ``s`` of group ``g`` of
  column ``j`` is ``values[s, g, j]``). This is the trainable leaf.
* ``meta``: ``(n, Gp // F, N)`` int32, the position (``0 <= p < m``) of each kept value inside its group,
  ``bits = index_bits(m)`` bits per kept value (1 bit for ``m = 2``, 2 bits for ``m <= 4``, 4 bits for
  ``m <= 16``), ``F = 32 // bits`` positions per int32 word. For 2:4 that is 4 bits per group of 4, the same
  density as NVIDIA's metadata, so a bf16 2:4 weight takes ``1.125 / 2 = 0.5625`` of the dense bytes.

Packing is *chunk-strided inside each tile of* ``pack_tile`` *groups*: inside tile ``t``, bit field ``c`` of
word ``r`` holds group ``t * pack_tile + c * (pack_tile // F) + r``. A kernel that walks ``K`` in tiles of a
multiple of ``pack_tile`` groups therefore unpacks each field into a *contiguous* block of rows with static
slices (no in-kernel reshapes or lane shuffles). ``G`` is padded up to a multiple of ``pack_tile`` in
``meta`` only (padding codes are 0).

Positions of one group are distinct. A group with fewer than ``n`` kept entries is padded with the lowest
unused positions holding the value 0, so :func:`unpack_nm` is an exact round trip to ``w * mask``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from pallas_kernels.nm.masks import MAX_M, nm_mask

__all__ = [
    "NMWeight",
    "index_bits",
    "default_pack_tile",
    "check_nm",
    "pack_nm",
    "unpack_nm",
    "unpack_indices",
    "is_nm_mask",
    "nm_nbytes",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NMWeight:
    """An N:M-sparse ``(K, N)`` weight: kept ``values (n, K//m, N)`` + packed positions ``meta``.

    Only ``values`` is meant to be trained; ``meta`` is an int32 leaf (its cotangent is ``None``/float0) and
    ``n``, ``m``, ``shape``, ``pack_tile`` are static pytree metadata.

    Example::

      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import pack_nm, unpack_nm
      >>> w = jnp.arange(32.0).reshape(8, 4)
      >>> w_nm = pack_nm(w, n=2, m=4)          # keeps the 2 largest |w| of every 4 rows
      >>> w_nm.values.shape, w_nm.n, w_nm.m, w_nm.shape
      ((2, 2, 4), 2, 4, (8, 4))
      >>> bool((unpack_nm(w_nm) == jnp.where(jnp.arange(8)[:, None] % 4 >= 2, w, 0)).all())
      True
    """

    values: Float[Array, "n G N"]
    meta: Int[Array, "n W N"]
    n: int = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    pack_tile: int = dataclasses.field(metadata=dict(static=True))

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def groups(self) -> int:
        return self.shape[0] // self.m

    @property
    def bits(self) -> int:
        return index_bits(self.m)

    def replace(self, **kwargs) -> NMWeight:
        return dataclasses.replace(self, **kwargs)

    def todense(self) -> Float[Array, "K N"]:
        return unpack_nm(self)


# ----------------------------------------------------------------------------------------------------------
# validation


def check_nm(n, m, *, k: int | None = None) -> None:
    """Raises ``TypeError``/``ValueError`` unless ``1 <= n <= m <= 16`` (ints) and ``k % m == 0``."""
    for name, val in (("n", n), ("m", m)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise TypeError(
                f"{name} must be a Python int, got {name}={val!r} of type {type(val).__name__}"
            )
    if not 1 <= m <= MAX_M:
        raise ValueError(f"m={m} is not supported: the group size m must satisfy 1 <= m <= {MAX_M}")
    if not 1 <= n <= m:
        raise ValueError(
            f"n={n} is not allowed for m={m}: the kept count n must satisfy 1 <= n <= m"
        )
    if k is not None and k % m:
        raise ValueError(
            f"contraction length K={k} (w.shape[0]) is not divisible by m={m}: groups of m run along axis 0 of "
            f"the (K, N) weight, so K must be a multiple of m"
        )


def index_bits(m: int) -> int:
    """Bits stored per kept position: 1 for m <= 2, 2 for m <= 4, 4 for m <= 16 (a divisor of 32)."""
    need = max(1, math.ceil(math.log2(m))) if m > 1 else 1
    for b in (1, 2, 4):
        if need <= b:
            return b
    raise ValueError(f"m={m} is not supported: the group size m must satisfy 1 <= m <= {MAX_M}")


def default_pack_tile(groups: int, m: int) -> int:
    """Groups per packing tile: 64 (a multiple of every ``F``; the Mosaic-GPU K tile), or all groups if fewer.

    Kernels walk ``K`` in multiples of it: the TPU kernel in tiles of 128+ groups, the Mosaic-GPU one in 64.
    """
    f = 32 // index_bits(m)
    return min(64, -(-groups // f) * f)


def _check_pack_tile(pack_tile, m):
    f = 32 // index_bits(m)
    if (
        isinstance(pack_tile, bool)
        or not isinstance(pack_tile, (int, np.integer))
        or pack_tile <= 0
        or pack_tile % f
    ):
        raise ValueError(
            f"pack_tile={pack_tile!r} is not allowed for m={m}: it must be a positive multiple of {f} "
            f"(positions per int32 word at {32 // f} bits each)"
        )


# ----------------------------------------------------------------------------------------------------------
# masks


def is_nm_mask(mask: Bool[ArrayLike, "K N"], n: int, m: int) -> Bool[Array, ""]:
    """True iff every group of ``m`` rows (per column) has at most ``n`` ``True`` entries."""
    mask = jnp.asarray(mask)
    check_nm(n, m, k=mask.shape[0])
    counts = mask.reshape(mask.shape[0] // m, m, *mask.shape[1:]).sum(axis=1)
    return jnp.all(counts <= n)


def _top_positions(score, n, m):
    """Sorted positions (n, G, N) of the n largest scores per group (lax.top_k: ties -> lower index)."""
    k, cols = score.shape
    g = score.reshape(k // m, m, cols).transpose(0, 2, 1)  # (G, N, m)
    _, pos = jax.lax.top_k(g, n)  # (G, N, n)
    pos = jnp.sort(pos, axis=-1)
    return pos.transpose(2, 0, 1).astype(jnp.int32)  # (n, G, N)


# ----------------------------------------------------------------------------------------------------------
# metadata packing


def _pack_indices(idx, m, pack_tile):
    """(n, G, N) int positions -> (n, Gp // F, N) int32 words, chunk-strided within each tile."""
    bits = index_bits(m)
    f = 32 // bits
    n, g, cols = idx.shape
    gp = -(-g // pack_tile) * pack_tile
    idx = jnp.pad(idx.astype(jnp.uint32), ((0, 0), (0, gp - g), (0, 0)))
    idx = idx.reshape(n, gp // pack_tile, f, pack_tile // f, cols)  # (n, T, field c, row r, N)
    shifts = (jnp.arange(f, dtype=jnp.uint32) * bits)[None, None, :, None, None]
    words = jnp.sum(idx << shifts, axis=2, dtype=jnp.uint32)  # fields are disjoint: sum == or
    return jax.lax.bitcast_convert_type(words, jnp.int32).reshape(n, gp // f, cols)


def unpack_indices(w: NMWeight) -> Int[Array, "n G N"]:
    """Positions ``(n, G, N)`` int32 (``0 <= p < m``, increasing along the slot axis) of the kept values."""
    bits = index_bits(w.m)
    f = 32 // bits
    n, nwords, cols = w.meta.shape
    t = nwords * f // w.pack_tile
    words = jax.lax.bitcast_convert_type(w.meta, jnp.uint32).reshape(
        n, t, 1, w.pack_tile // f, cols
    )
    shifts = (jnp.arange(f, dtype=jnp.uint32) * bits)[None, None, :, None, None]
    idx = (words >> shifts) & jnp.uint32((1 << bits) - 1)  # (n, T, F, R, N)
    return idx.reshape(n, t * w.pack_tile, cols)[:, : w.groups].astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# public converters


def pack_nm(
    w: Float[ArrayLike, "K N"],
    mask: Bool[ArrayLike, "K N"] | None = None,
    *,
    n: int = 2,
    m: int = 4,
    pack_tile: int | None = None,
) -> NMWeight:
    """Compresses a dense ``(K, N)`` weight into an :class:`NMWeight` (works inside ``jit``).

    Args:
      w: dense weight, contraction axis first (Flax ``Dense`` kernel layout ``(in, out)``).
      mask: optional bool ``(K, N)`` N:M mask (at most ``n`` ``True`` per group of ``m`` rows per column).
        When omitted, the ``n`` largest ``|w|`` of every group are kept
        (``nm_mask(jnp.abs(w), n, m, axis=0)``). Outside ``jit`` a
        mask that is not N:M raises ``ValueError``; under ``jit`` it cannot be checked and the first ``n``
        masked positions of an over-full group are kept.
      n, m: keep ``n`` of every ``m`` (``1 <= n <= m <= 16``); ``K`` must be divisible by ``m``.
      pack_tile: groups per metadata packing tile (multiple of ``32 // index_bits(m)``); default
        :func:`default_pack_tile`. Kernels walk ``K`` in multiples of it.

    Returns:
      ``NMWeight`` with ``unpack_nm(result) == where(mask, w, 0)`` exactly. A group with fewer than ``n``
      masked entries gets padding slots (value 0 at the lowest unmasked positions); like every stored value
      they receive gradients from :func:`pallas_kernels.nm.nm_matmul`, so training can make them non-zero
      (the result stays N:M). Zero their updates if the mask must stay fixed.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> w = jax.random.normal(jax.random.key(0), (64, 8))
      >>> w_nm = jax.jit(lambda w: pack_nm(w, n=2, m=4))(w)
      >>> from pallas_kernels.nm.masks import nm_mask
      >>> keep = nm_mask(jnp.abs(w), 2, 4, axis=0)
      >>> bool((unpack_nm(w_nm) == jnp.where(keep, w, 0)).all())
      True
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D (K, N) weight, got w.shape={w.shape}")
    check_nm(n, m, k=w.shape[0])
    k, cols = w.shape
    groups = k // m
    if pack_tile is None:
        pack_tile = default_pack_tile(groups, m)
    _check_pack_tile(pack_tile, m)

    if mask is None:  # the one N:M rule: nm_mask on |w| along K
        keep = nm_mask(jnp.abs(w), n, m, axis=0)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != w.shape:
            raise ValueError(f"mask.shape={mask.shape} must equal w.shape={w.shape}")
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be a bool array, got mask.dtype={mask.dtype}")
        if not isinstance(mask, jax.core.Tracer):
            # NumPy when this process holds all of the mask; else jnp, whose reductions to scalars are
            # replicated and so readable on every process (a mask sharded over several processes)
            xp = np if mask.is_fully_addressable else jnp
            counts = xp.asarray(mask).reshape(groups, m, cols).sum(axis=1)
            over = (counts > n).ravel()
            first = int(xp.argmax(over))
            if bool(over[first]):
                g, j = divmod(first, cols)
                raise ValueError(
                    f"the mask is not {n}:{m}: group {g} (rows {g * m}..{g * m + m - 1}) of column "
                    f"{j} keeps {int(counts[g, j])} > n={n} entries; allowed: at most n={n} True per group "
                    f"of m={m} rows along K"
                )
        keep = mask
    # masked positions first, then the lowest unmasked ones (top_k ties -> lower index) as zero padding
    idx = _top_positions(keep.astype(jnp.float32), n, m)  # (n, G, N)
    grouped = w.reshape(groups, m, cols)
    vals = jnp.take_along_axis(grouped, idx.transpose(1, 0, 2), axis=1).transpose(
        1, 0, 2
    )  # (n, G, N)
    kept = jnp.take_along_axis(keep.reshape(groups, m, cols), idx.transpose(1, 0, 2), axis=1)
    vals = jnp.where(kept.transpose(1, 0, 2), vals, jnp.zeros((), vals.dtype))
    meta = _pack_indices(idx, m, pack_tile)
    return NMWeight(values=vals, meta=meta, n=n, m=m, shape=(k, cols), pack_tile=pack_tile)


def unpack_nm(w: NMWeight) -> Float[Array, "K N"]:
    """Dense ``(K, N)`` weight with zeros at dropped positions (exact; differentiable w.r.t. ``w.values``).

    Args:
      w: an :class:`NMWeight` (from :func:`pack_nm`).

    Returns:
      The ``(K, N)`` array in ``w.values``' dtype.

    Example:

      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1.], [-4.], [3.], [2.]])
      >>> unpack_nm(pack_nm(w, n=2, m=4))[:, 0].tolist()
      [0.0, -4.0, 3.0, 0.0]
    """
    idx = unpack_indices(w)  # (n, G, N)
    pos = jnp.arange(w.m, dtype=jnp.int32)[None, None, :, None]
    hit = idx[:, :, None, :] == pos  # (n, G, m, N)
    zero = jnp.zeros((), w.values.dtype)
    dense = jnp.where(hit[0], w.values[0][:, None, :], zero)
    for s in range(1, w.n):  # positions within a group are distinct: at most one slot hits each row
        dense = jnp.where(hit[s], w.values[s][:, None, :], dense)
    return dense.reshape(w.shape)


def nm_nbytes(w: NMWeight) -> int:
    """Bytes held by ``values`` + ``meta``."""
    return int(w.values.size * w.values.dtype.itemsize + w.meta.size * w.meta.dtype.itemsize)
