"""Masks and sparse state follow the parameters' shardings.

Nothing in jaxsparse gathers a parameter: mask rules are elementwise ops plus scalar counts (see
:mod:`jaxsparse.masks`), so under ``jit`` XLA's sharding propagation keeps masks on the params' devices. Outside
``jit`` (``init`` on concrete arrays), :func:`place_like` puts each mask on its parameter's sharding explicitly.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxsparse._tree import is_none

__all__ = ["place_like"]


def place_like(tree: Any, params: Any) -> Any:
    """Puts every array leaf of ``tree`` on the sharding of the matching leaf of ``params`` (``None`` stays).

    Traced leaves are left to sharding propagation.

    >>> import jax, jax.numpy as jnp
    >>> place_like({"w": jnp.ones(2, bool)}, {"w": jnp.zeros(2)})["w"].sharding == jnp.zeros(2).sharding
    True
    """

    def put(x, p):
        if x is None or isinstance(x, jax.core.Tracer) or isinstance(p, jax.core.Tracer):
            return x
        sharding = getattr(p, "sharding", None)
        if sharding is None or getattr(x, "shape", None) != p.shape:
            return x
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree, params, is_leaf=is_none)
