"""Leaf selection by ``where`` for the forward-time estimators and N:M compression, and the N:M leaf checks.

``where`` is ``None`` (the default :func:`jaxsparse.prunable` leaves), a pytree of bools shaped like ``params`` (e.g.
``prunable(params, include=...)``), or a callable ``params -> pytree of bools``: the same selection concept as every
other API, applied to one tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jaxtyping import PyTree

from jaxsparse import _validation as v
from jaxsparse._tree import check_same_structure, is_none, path_name
from jaxsparse.allocation import prunable

Where = Any  # None | pytree of bools | Callable[[params], pytree of bools]


def selection(params: PyTree, where: Where) -> list[bool]:
    if where is None:
        chosen = prunable(params)
    elif callable(where):
        chosen = where(params)
    else:
        chosen = where
    check_same_structure("where", chosen, "params", params)
    return [bool(c) for c in jax.tree.leaves(chosen, is_leaf=is_none)]


def map_selected(
    fn: Callable[..., Any], params: PyTree, where: Where, *others: PyTree, others_names=()
) -> PyTree:
    """``fn(name, leaf, *other_leaves)`` on the selected leaves; the rest pass through unchanged."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    picks = selection(params, where)
    other_leaves = []
    for name, o in zip(others_names, others):
        check_same_structure(name, o, "params", params)
        other_leaves.append(jax.tree.leaves(o, is_leaf=is_none))
    out = []
    for i, ((path, leaf), pick) in enumerate(zip(flat, picks)):
        extra = [ol[i] for ol in other_leaves]
        out.append(fn(path_name(path), leaf, *extra) if pick else leaf)
    return jax.tree.unflatten(treedef, out)


def check_nm_leaf(
    name: str, leaf: Any, n: int, m: int, axis: int, transposable: bool = False
) -> int:
    v.check_float_array(f"params leaf '{name}'", leaf)
    ax = v.check_axis("axis", axis, leaf.ndim)
    v.check_divisible(f"params leaf '{name}'", leaf.shape, ax, m)
    if transposable:
        if leaf.ndim < 2 or ax != leaf.ndim - 2:
            raise ValueError(
                f"`transposable=True` needs the N:M axis to be the second-to-last (got axis={axis} for params leaf "
                f"'{name}' of shape {tuple(leaf.shape)}): the mask is N:M along the last two axes."
            )
        v.check_divisible(f"params leaf '{name}'", leaf.shape, leaf.ndim - 1, m)
    return ax


def check_where(where: Where) -> None:
    if where is not None and not callable(where) and not jax.tree.leaves(where, is_leaf=is_none):
        raise ValueError("`where` is an empty pytree; pass None for the default prunable leaves.")


# ------------------------------------------------------------------------------------------------ masks
