"""Pytree helpers shared by every module: the one path model, ``None``-aware mapping of masks trees.

**Paths.** A leaf is named by its key path joined with ``/``: dict keys, attribute names and sequence indices
(``{"layers": [{"kernel": w}]}`` names ``w`` ``'layers/0/kernel'``). An NNX ``Variable`` is a wrapper, not a
level: ``nnx.state(model)``, ``nnx.split`` states and pure dicts of the same model all name the kernel
``'layers/0/kernel'`` (never ``'.../kernel/value'``). Every path-taking API (``include=``, ``exclude=``,
``custom=``, ``where=``, conversion, checkpoints) matches these names; :func:`leaf_paths` lists them.

**Trees.** Functions that build a tree from ``params`` (masks, budgets, updates) first :func:`unwrap` NNX
Variables to their arrays, so the trees they return are the same whether they were given ``nnx.state(model)``
(Variables) or ``nnx.as_pure``/``nnx.Optimizer``'s arrays. Masks trees carry ``None`` for dense leaves and are
mapped with ``None`` as a leaf.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["leaf_paths"]


def is_none(x: Any) -> bool:
    return x is None


def is_variable(x: Any) -> bool:
    """Whether ``x`` is an NNX ``Variable`` (``flax.nnx`` is only consulted once something imported it)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def unwrap(tree: Any) -> Any:
    """``tree`` with every NNX ``Variable`` replaced by its value (other nodes and leaves unchanged)."""
    if "flax.nnx" not in sys.modules:
        return tree
    return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


def structure(tree: Any) -> Any:
    return jax.tree.structure(unwrap(tree), is_leaf=is_none)


def check_same_structure(name_a: str, a: Any, name_b: str, b: Any) -> None:
    sa, sb = structure(a), structure(b)
    if sa != sb:
        hint = ""
        # masks kept 1 bit per weight (sparse_training(packed_masks=True)) are not masks trees
        if "PackedMask" in f"{sa}{sb}":
            hint = " Packed masks (packed_masks=True): read them with jaxsparse.state_masks(state)."
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same tree structure; got\n  {sa}\nand\n  {sb}.{hint}"
        )


def check_mask(name: str, mask: Any, param: Any) -> None:
    """A mask must be a bool array with exactly its parameter's shape (no broadcasting, no float masks)."""
    dtype = getattr(mask, "dtype", None)
    if dtype is None or jnp.dtype(dtype) != jnp.bool_:
        raise TypeError(
            f"mask of leaf '{name}' must be a bool array; got {type(mask).__name__} of dtype {dtype}."
        )
    if tuple(mask.shape) != tuple(jnp.shape(param)):
        raise ValueError(
            f"mask of leaf '{name}' must have its parameter's shape {tuple(jnp.shape(param))}; got "
            f"{tuple(mask.shape)} (masks never broadcast)."
        )


def map_masked(fn: Callable[[Any, Any], Any], params: Any, masks: Any) -> Any:
    """``fn(param, mask)`` where the mask is an array; the param unchanged where the mask is ``None``.

    Masks must be bool arrays shaped exactly like their parameters. NNX Variables in ``params`` are unwrapped.
    """
    params = unwrap(params)
    masks = unwrap(masks)
    check_same_structure("params", params, "masks", masks)
    flat_m = jax.tree.leaves(masks, is_leaf=is_none)
    for (name, p), m in zip(named_leaves(params, keep_none=True), flat_m):
        if m is not None:
            check_mask(name, m, p)
    return jax.tree.map(lambda m, p: p if m is None else fn(p, m), masks, params, is_leaf=is_none)


def map_live(fn: Callable[..., Any], live: Any, *trees: Any) -> Any:
    """``fn(leaf, *others)`` on the live leaves of ``live`` (a masks or sparsities tree), ``None`` where it is ``None``.

    ``None`` is a leaf of ``live``; ``trees`` are mapped alongside it (same structure, ``live`` as the prefix).
    Unlike :func:`map_masked`, nothing is validated and a dense (``None``) leaf stays ``None``.
    """
    return jax.tree.map(
        lambda x, *rest: None if x is None else fn(x, *rest), live, *trees, is_leaf=is_none
    )


def path_names(path: tuple) -> tuple[str, ...]:
    """The names of a key path; the ``value`` attribute of an NNX Variable is not a level (dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return tuple(parts)


def path_name(path: tuple) -> str:
    """``('layers', 0, 'kernel')``-style key paths as ``'layers/0/kernel'`` (see the module notes)."""
    return "/".join(path_names(path))


def named_leaves(tree: Any, keep_none: bool = False) -> list[tuple[str, Any]]:
    """``[(path name, leaf)]`` of ``unwrap(tree)`` in ``jax.tree`` order (``None`` leaves kept if asked)."""
    flat = jax.tree_util.tree_flatten_with_path(
        unwrap(tree), is_leaf=is_none if keep_none else None
    )[0]
    return [(path_name(p), leaf) for p, leaf in flat]


def leaf_paths(tree: Any, keep_none: bool = False) -> list[str]:
    """The path names every jaxsparse pattern matches, in ``jax.tree`` order (see :mod:`jaxsparse` paths).

    The same model gives the same names as a pure dict, Linen params, ``nnx.state(model)`` or an ``nnx.split``
    state: an NNX Variable's ``value`` is not a path level.

    Args:
      tree: any pytree (params, a training state, masks).
      keep_none: also name ``None`` leaves (dense leaves of a masks tree).

    Returns:
      A list of ``'a/b/kernel'`` strings, one per leaf.

    >>> import jax.numpy as jnp
    >>> leaf_paths({"layers": [{"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}]})
    ['layers/0/bias', 'layers/0/kernel']
    """
    return [name for name, _ in named_leaves(tree, keep_none)]


def natural_key(name: str) -> list:
    """Sort key that orders ``Dense_2`` before ``Dense_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
