"""Pytree helpers: masks trees carry ``None`` for dense leaves, so they are mapped with ``None`` as a leaf."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax


def is_none(x: Any) -> bool:
    return x is None


def structure(tree: Any) -> Any:
    return jax.tree.structure(tree, is_leaf=is_none)


def check_same_structure(name_a: str, a: Any, name_b: str, b: Any) -> None:
    sa, sb = structure(a), structure(b)
    if sa != sb:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same tree structure; got\n  {sa}\nand\n  {sb}."
        )


def map_masked(fn: Callable[[Any, Any], Any], params: Any, masks: Any) -> Any:
    """``fn(param, mask)`` where the mask is an array; the param unchanged where the mask is ``None``."""
    check_same_structure("params", params, "masks", masks)
    return jax.tree.map(lambda m, p: p if m is None else fn(p, m), masks, params, is_leaf=is_none)


def path_name(path: tuple) -> str:
    """``('layers', 0, 'kernel')``-style key paths as ``'layers/0/kernel'``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def natural_key(name: str) -> list:
    """Sort key that orders ``Dense_2`` before ``Dense_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
