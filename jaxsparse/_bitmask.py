"""Bool masks stored 1 bit per entry (``sparse_training(..., packed_masks=True)``).

**Layout.** A mask of shape ``(*lead, n)`` is stored as ``uint8`` bits of shape ``(*lead, ceil(n / 8))``: entry
``j`` of the last axis is bit ``j % 8`` (least significant first) of word ``j // 8``, and the padding bits of the
last word are zero (with NumPy: ``np.unpackbits(bits, axis=-1, count=n, bitorder="little")``). The leading axes
are kept, so a stacked ``(layers, d_in, d_out)`` mask keeps its layer axis. A 0-d mask is one word of shape
``(1,)``.

**Sharding.** The bits take their parameter's sharding. When the parameter's last axis is split over ``k``
devices and a device's share ``n / k`` is not a multiple of 8, the last axis is packed per share instead
(``parts = k``): each share's entries start a new word, giving ``k * ceil(n / (8 * k))`` words, so that every
device unpacks its own entries from its own words (no data moves on ordinary steps, and the mask rule's output
comes back with the same sharding, so the step compiles once). With ``parts = 1`` (the parameter unsharded on
its last axis, shares of whole words, or ``init`` under a trace) the two layouts coincide. A last axis that does
not split evenly keeps ``parts = 1`` and its bits are replicated along it. ``parts`` is static (part of the
state's tree structure): a checkpoint restores into a state initialised with the same split
(``jaxsparse.checkpoint`` compares the shapes and names the leaf otherwise).

**Unpacking** is a shift, an ``and`` and reshapes that merge or split axes: elementwise, so XLA fuses it into the
masked update that reads it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxsparse._tree import is_none

BITS = 8  # entries per stored word (uint8)
_SHIFTS = np.arange(BITS, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class PackedMask:
    """A bool mask of shape ``shape`` stored 1 bit per entry in ``uint8`` ``bits`` (see the module notes).

    ``bits`` is the only array leaf; ``shape`` and ``parts`` are static. Read it with
    :func:`jaxsparse.state_masks`.
    """

    bits: Any
    shape: tuple[int, ...]
    parts: int = 1


jax.tree_util.register_dataclass(PackedMask, data_fields=["bits"], meta_fields=["shape", "parts"])


def is_packed(x: Any) -> bool:
    return isinstance(x, PackedMask)


def is_mask_leaf(x: Any) -> bool:
    """Leaves of a masks tree whose entries may be packed: ``None`` or a :class:`PackedMask`."""
    return x is None or isinstance(x, PackedMask)


def words(n: int) -> int:
    return -(-n // BITS)


def bits_shape(shape: tuple[int, ...], parts: int = 1) -> tuple[int, ...]:
    n = shape[-1] if shape else 1
    return (*shape[:-1], parts * words(n // parts))


def pack(mask: Any, parts: int = 1) -> PackedMask:
    """The bits of a bool ``mask`` (any shape), its last axis packed in ``parts`` equal shares."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"pack: expected a bool mask; got dtype {mask.dtype}.")
    shape = tuple(mask.shape)
    m = mask.reshape(shape or (1,))
    n = m.shape[-1]
    if n % parts:
        raise ValueError(f"pack: {parts} parts do not split a last axis of {n} entries.")
    share = n // parts
    m = m.reshape(*m.shape[:-1], parts, share)
    pad = words(share) * BITS - share
    if pad:
        m = jnp.pad(m, [(0, 0)] * (m.ndim - 1) + [(0, pad)])
    m = m.reshape(*m.shape[:-1], words(share), BITS).astype(jnp.uint8)
    bits = jnp.sum(
        m << _SHIFTS, axis=-1, dtype=jnp.uint8
    )  # distinct powers of two: the sum is the bit-or
    return PackedMask(bits.reshape(bits_shape(shape, parts)), shape, parts)


def unpack(packed: PackedMask) -> Any:
    """The bool mask of ``packed``; leading batch axes of ``bits`` (``vmap``-ed states) are kept in front."""
    shape, bits, parts = packed.shape, packed.bits, packed.parts
    n = shape[-1] if shape else 1
    core = max(len(shape), 1)  # axes of bits belonging to one mask; any before them are batch axes
    batch = bits.shape[: bits.ndim - core]
    if bits.ndim < core or bits.shape[bits.ndim - core :] != bits_shape(shape, parts):
        raise ValueError(
            f"packed mask bits of shape {bits.shape} do not hold a mask of shape {shape} "
            f"(expected (..., {bits_shape(shape, parts)}))."
        )
    share = n // parts
    w = words(share)
    entries = bits.reshape(*bits.shape[:-1], parts, w)
    entries = (entries[..., None] >> _SHIFTS) & np.uint8(1)  # (..., parts, words, 8)
    entries = entries.reshape(*entries.shape[:-2], w * BITS)
    if w * BITS != share:
        entries = entries[..., :share]
    return (entries != 0).reshape(*batch, *shape)


_pack_one = jax.jit(
    pack, static_argnums=1
)  # eager callers (tx.init): one cached executable per shape


def pack_tree(masks: Any, parts: tuple[int, ...] | None = None) -> Any:
    """Packs every bool mask of a masks tree (``None`` stays ``None``); ``parts``: one per leaf (1 if omitted)."""
    flat, treedef = jax.tree.flatten(masks, is_leaf=is_none)
    parts = parts or (1,) * len(flat)
    return treedef.unflatten([None if m is None else _pack_one(m, k) for m, k in zip(flat, parts)])


def unpack_tree(masks: Any) -> Any:
    """Unpacks every :class:`PackedMask` of a masks tree (``None`` and bool masks stay as they are)."""
    return jax.tree.map(lambda m: unpack(m) if is_packed(m) else m, masks, is_leaf=is_mask_leaf)


def is_packed_tree(masks: Any) -> bool:
    return any(is_packed(m) for m in jax.tree.leaves(masks, is_leaf=is_mask_leaf))


def check_not_packed(name: str, masks: Any) -> None:
    """Functions that take bool masks refuse a packed masks tree with the way to read it."""
    if is_packed_tree(masks):
        raise ValueError(
            f"`{name}` holds packed masks (a state of packed_masks=True): read them as bool masks with "
            "jaxsparse.state_masks(state)."
        )


def _last_axis_split(sharding: Any, shape: tuple[int, ...]) -> tuple[tuple, int]:
    """The parameter's spec (one entry per axis) and the number of devices its last axis is split over."""
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    last = spec[len(shape) - 1] if shape else None
    axes = () if last is None else (last if isinstance(last, tuple) else (last,))
    return spec[: len(shape)], math.prod(sharding.mesh.shape[a] for a in axes)


def parts_for(param: Any) -> int:
    """How many shares a committed, named-sharded parameter's mask is packed in (1 unless it needs more)."""
    sharding = getattr(param, "sharding", None)
    if isinstance(param, jax.core.Tracer) or not getattr(param, "committed", True):
        return 1
    if not isinstance(sharding, NamedSharding) or not jnp.ndim(param):
        return 1
    shape = tuple(param.shape)
    _, k = _last_axis_split(sharding, shape)
    if k == 1 or shape[-1] % k or (shape[-1] // k) % BITS == 0:
        return 1
    return k


def bits_sharding(param_sharding: Any, shape: tuple[int, ...]) -> Any:
    """The sharding the bits of a mask of ``shape`` take next to a parameter with ``param_sharding``.

    The parameter's own (trailing unsharded axes dropped from the spec, as ``jit`` writes its outputs); with a
    last axis that does not split evenly, that axis replicated. ``None`` for a sharding kind other than named or
    single-device (:func:`jaxsparse.sharding.commit_like` then replicates the bits).
    """
    if isinstance(param_sharding, SingleDeviceSharding):
        return param_sharding
    if not isinstance(param_sharding, NamedSharding):
        return None
    if not shape:
        return NamedSharding(param_sharding.mesh, PartitionSpec())
    spec, k = _last_axis_split(param_sharding, shape)
    kept = spec if shape[-1] % k == 0 else spec[:-1]
    while (
        kept and kept[-1] is None
    ):  # the form jit gives its outputs: the step's inputs keep one sharding
        kept = kept[:-1]
    return NamedSharding(param_sharding.mesh, PartitionSpec(*kept))


def place_packed_like(masks: Any, params: Any) -> Any:
    """Puts the bits of each concrete :class:`PackedMask` next to its committed parameter (see
    :func:`bits_sharding`); like :func:`jaxsparse.place_like`, uncommitted or traced parameters leave them be."""

    def put(m, p):
        if m is None or isinstance(m.bits, jax.core.Tracer) or isinstance(p, jax.core.Tracer):
            return m
        if not getattr(p, "committed", True) or getattr(p, "sharding", None) is None:
            return m
        sharding = bits_sharding(p.sharding, m.shape)
        if sharding is None:
            return m
        return PackedMask(jax.device_put(m.bits, sharding), m.shape, m.parts)

    return jax.tree.map(put, masks, params, is_leaf=is_mask_leaf)
