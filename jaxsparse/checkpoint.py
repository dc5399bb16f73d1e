"""Saving and restoring sparse training state with orbax-checkpoint, sharded state included.

The state of every jaxsparse transform is a plain pytree (NamedTuples of arrays; ``None`` for dense leaves' masks),
so orbax's standard handler stores it as is. :func:`restore` takes a *target* — the state itself or its
``jax.eval_shape`` — and restores each array with the target's dtype, shape and sharding, bit-exactly.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["save", "restore"]


def save(directory: str | os.PathLike, tree: Any) -> None:
    """Writes ``tree`` (params, optimizer state, masks...) to ``directory`` (must not exist yet).

    >>> import tempfile, jax.numpy as jnp
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> save(d, {"w": jnp.arange(3.0)})
    >>> restore(d, {"w": jnp.zeros(3)})["w"].tolist()
    [0.0, 1.0, 2.0]
    """
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(directory), tree)
        ckptr.wait_until_finished()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def restore(directory: str | os.PathLike, target: Any) -> Any:
    """Reads a tree saved by :func:`save`, laid out (shapes, dtypes, shardings) like ``target``."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(directory), jax.tree.map(_abstract, target))
