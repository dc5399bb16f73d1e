"""Tile-level helpers shared by the N:M Pallas kernels (pure jnp on loaded tiles, no backend specifics)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.nm.format import index_bits

__all__ = ["decode_positions", "plane"]


def decode_positions(words, s, *, m, pack_tile, tile_groups, store):
    """Unpacks slot ``s`` of a meta tile into positions, chunk by chunk.

    ``words(s, lo, hi)`` returns the int32 words ``[lo, hi)`` of slot ``s`` (shape ``(hi - lo, bn)``);
    ``store(s, lo, hi, codes)`` receives the int32 positions of groups ``[lo, hi)`` of the tile.
    The loops are static (``tile_groups // pack_tile * F`` stores per slot).
    """
    bits = index_bits(m)
    f = 32 // bits
    rows = pack_tile // f
    field_mask = jnp.int32((1 << bits) - 1)
    for u in range(tile_groups // pack_tile):
        w = words(s, u * rows, (u + 1) * rows)
        for c in range(f):
            code = lax.shift_right_logical(w, jnp.int32(bits * c)) & field_mask
            lo = u * pack_tile + c * rows
            store(s, lo, lo + rows, code)


def plane(idx_tiles, val_tiles, p):
    """Dense rows of position ``p`` of every group: ``sum_s where(idx_s == p, v_s, 0)`` (one slot can hit)."""
    zero = jnp.zeros((), val_tiles[0].dtype)
    d = jnp.where(idx_tiles[0] == p, val_tiles[0], zero)
    for i, v in zip(idx_tiles[1:], val_tiles[1:]):
        d = jnp.where(i == p, v, d)
    return d
