"""Leaves batched by shape: the mask rules run once per group of equally shaped *units*, not once per leaf.

A unit is what one mask rule acts on: a whole leaf, or one slice of a stacked (scanned) leaf along its layer axis.
Units of the same shape are stacked along a new leading axis (a stacked leaf contributes all its slices at once),
so a rule's HLO holds one computation per distinct unit shape, whatever the number of leaves. Per-unit vectors
(counts, thresholds, seeds) are laid out in *group order*: group 0's units, then group 1's, ...; within a group,
leaves in the order given and, for a stacked leaf, its slices in layer order. Everything here is static Python
(shapes only) except :func:`stack` / :func:`unstack`, which emit one concatenate per group and one slice per leaf.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax


class Grouping(NamedTuple):
    """Static plan: which leaves (positions in a list) are stacked together, and how."""

    shapes: tuple[tuple[int, ...], ...]  # per group: the unit shape
    members: tuple[tuple[int, ...], ...]  # per group: leaf positions, in the order given
    axes: tuple[int | None, ...]  # per leaf: its layer axis (None: the whole leaf is one unit)
    units: tuple[int, ...]  # per leaf: number of units (1, or the size of the layer axis)

    @property
    def n_units(self) -> int:
        return sum(self.units)

    def group_sizes(self) -> list[int]:
        return [sum(self.units[i] for i in ms) for ms in self.members]

    def unit_sizes(self) -> np.ndarray:
        """Elements per unit, in group order."""
        return np.concatenate(
            [np.full(n, math.prod(s), np.int64) for s, n in zip(self.shapes, self.group_sizes())]
        )

    def leaf_of_unit(self) -> np.ndarray:
        """Leaf position of every unit, in group order."""
        return np.concatenate(
            [np.repeat(np.array(ms, np.int64), [self.units[i] for i in ms]) for ms in self.members]
        )

    def slice_of_unit(self) -> np.ndarray:
        """Index of every unit along its leaf's layer axis (0 for whole leaves), in group order."""
        return np.concatenate(
            [np.concatenate([np.arange(self.units[i]) for i in ms]) for ms in self.members]
        )

    def tree_order(self) -> np.ndarray:
        """Group-order positions of the units listed leaf by leaf (then slice by slice)."""
        leaf, sl = self.leaf_of_unit(), self.slice_of_unit()
        return np.lexsort((sl, leaf))


def grouping(
    shapes: Sequence[tuple[int, ...]], axes: Sequence[int | None] | None = None
) -> Grouping:
    """Groups leaves of ``shapes`` by unit shape (first appearance order)."""
    axes = list(axes) if axes is not None else [None] * len(shapes)
    order: dict[tuple[int, ...], list[int]] = {}
    units = []
    norm_axes: list[int | None] = []
    for i, (shape, ax) in enumerate(zip(shapes, axes)):
        shape = tuple(int(d) for d in shape)
        if ax is None:
            unit, n = shape, 1
        else:
            ax = ax % len(shape)
            unit, n = shape[:ax] + shape[ax + 1 :], shape[ax]
        norm_axes.append(ax)
        units.append(n)
        order.setdefault(unit, []).append(i)
    return Grouping(
        tuple(order), tuple(tuple(v) for v in order.values()), tuple(norm_axes), tuple(units)
    )


def _as_units(x: Array, axis: int | None) -> Array:
    return x[None] if axis is None else jnp.moveaxis(x, axis, 0)


def stack(g: Grouping, leaves: Sequence[Array]) -> list[Array]:
    """One ``(units, *unit_shape)`` array per group."""
    out = []
    for ms in g.members:
        parts = [_as_units(leaves[i], g.axes[i]) for i in ms]
        out.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0))
    return out


def _leaf_of(part: Array, axis: int | None) -> Array:
    return part.reshape(part.shape[1:]) if axis is None else jnp.moveaxis(part, 0, axis)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _cut(x: Array, start: Array, n: int, axis: int | None) -> Array:
    return _leaf_of(lax.dynamic_slice_in_dim(x, start, n), axis)


def unstack(g: Grouping, stacked: Sequence[Array], n_leaves: int | None = None) -> list[Array]:
    """Inverse of :func:`stack`: the list of leaves (positions not in any group stay ``None``).

    Leaves are cut with ``dynamic_slice`` at constant offsets: under ``jit`` XLA folds them to static slices.
    Eagerly (``tx.init``) each cut is one call of a jitted slice-and-reshape taking its offset as an argument, so
    every cut of one group reuses one compiled executable (a static slice would compile per offset) and costs one
    dispatch instead of one per index operation.
    """
    out: list = [None] * (n_leaves if n_leaves is not None else len(g.axes))
    for ms, x in zip(g.members, stacked):
        eager = not isinstance(x, jax.core.Tracer)
        start = 0
        for i in ms:
            n, ax = g.units[i], g.axes[i]
            if len(ms) == 1:
                out[i] = _leaf_of(x, ax)
            elif eager:
                out[i] = _cut(x, np.int32(start), n, ax)
            else:
                out[i] = _leaf_of(lax.dynamic_slice_in_dim(x, start, n), ax)
            start += n
    return out


def split(g: Grouping, vec: Array) -> list[Array]:
    """A per-unit vector (group order) cut into one piece per group."""
    out, start = [], 0
    for n in g.group_sizes():
        out.append(vec[start : start + n])
        start += n
    return out


def per_unit(g: Grouping, values: Sequence) -> Array:
    """Per-leaf values (scalars, or length-``units`` vectors for stacked leaves) as one int32 vector, group order."""
    if not any(isinstance(values[i], (Array, jax.core.Tracer)) for ms in g.members for i in ms):
        return jnp.asarray(
            np.concatenate(
                [
                    np.broadcast_to(np.asarray(values[i], np.int64), (g.units[i],))
                    for ms in g.members
                    for i in ms
                ]
            ).astype(np.int32)
        )
    parts = []
    for ms in g.members:
        for i in ms:
            x = jnp.asarray(values[i], jnp.int32)
            parts.append(jnp.broadcast_to(x, (g.units[i],)))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def bcast(x: Array, ndim: int) -> Array:
    """A per-unit vector shaped to broadcast against a stacked ``ndim``-dimensional group."""
    return x.reshape(x.shape + (1,) * (ndim - 1))


def unit_sum(x: Array) -> Array:
    """Per-unit int32 count of a stacked boolean group."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)), dtype=jnp.int32)


def _shape_and_dtype(x: Array) -> tuple:
    return tuple(jnp.shape(x)), jnp.result_type(x)


def stack_alike(
    leaves: Sequence[Array],
    like: Sequence | None = None,
    kind: Callable[[Any], Hashable] = _shape_and_dtype,
) -> list[Array]:
    """Leaves of one kind (by default: equal shape and dtype) stacked along a new leading axis: one array per
    kind, kinds in order of first appearance, leaves in the order given (a reduction over all leaves is then one
    reduction per kind instead of one per leaf). ``like`` (same length) groups ``leaves`` by the kinds of ``like``
    instead, so that two lists stack alike."""
    kinds: dict = {}
    for x, y in zip(leaves, like if like is not None else leaves):
        kinds.setdefault(kind(y), []).append(x)
    return [xs[0][None] if len(xs) == 1 else jnp.stack(xs) for xs in kinds.values()]


def alike_slots(
    leaves: Sequence, kind: Callable[[Any], Hashable] = _shape_and_dtype
) -> list[tuple[int, int]]:
    """Where :func:`stack_alike` puts every leaf: ``(kind, position in that kind's stack)``."""
    kinds: dict = {}
    slots = []
    for x in leaves:
        counter = kinds.setdefault(kind(x), [len(kinds), 0])
        slots.append((counter[0], counter[1]))
        counter[1] += 1
    return slots
