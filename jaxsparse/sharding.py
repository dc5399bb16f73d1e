"""Masks and sparse state follow the parameters' shardings.

Nothing in jaxsparse gathers a parameter: mask rules are elementwise ops plus scalar counts (see
:mod:`jaxsparse.masks`), so under ``jit`` XLA's sharding propagation keeps masks on the params' devices. Outside
``jit`` (``init`` on concrete arrays), :func:`place_like` puts each mask on its parameter's sharding explicitly
when that parameter is *committed* to its devices; masks of uncommitted parameters stay uncommitted too, so the
inputs of the training step keep one placement kind and the step compiles once.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxsparse._tree import is_none

__all__ = ["place_like"]


def place_like(tree: Any, params: Any) -> Any:
    """Puts every array leaf of ``tree`` on the sharding of the matching leaf of ``params`` (``None`` stays).

    Traced leaves are left to sharding propagation, and so are leaves of uncommitted parameters (an eagerly
    created array that ``jit`` may place anywhere): committing the mask alone would change the step's input
    placement and compile it a second time.

    >>> import jax, jax.numpy as jnp
    >>> place_like({"w": jnp.ones(2, bool)}, {"w": jnp.zeros(2)})["w"].sharding == jnp.zeros(2).sharding
    True
    """

    def put(x, p):
        if x is None or isinstance(x, jax.core.Tracer) or isinstance(p, jax.core.Tracer):
            return x
        sharding = getattr(p, "sharding", None)
        if not getattr(p, "committed", True):
            return x
        if sharding is None or getattr(x, "shape", None) != p.shape:
            return x
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree, params, is_leaf=is_none)
