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
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxsparse._tree import is_none

__all__ = ["place_like", "commit_like"]


def place_like(tree: Any, params: Any) -> Any:
    """Puts every array leaf of ``tree`` on the sharding of the matching leaf of ``params`` (``None`` stays).

    Traced leaves are left to sharding propagation, and so are leaves of uncommitted parameters (an eagerly
    created array that ``jit`` may place anywhere): committing the mask alone would change the step's input
    placement and compile it a second time. A leaf whose shape differs from its parameter's (or whose parameter
    has no sharding) is returned unchanged.

    Args:
      tree: a pytree shaped like ``params`` (e.g. masks or optimizer moments); ``None`` leaves allowed.
      params: the parameter pytree whose leaves' shardings are copied.

    Returns:
      ``tree`` with each concrete leaf ``jax.device_put`` on its committed parameter's sharding.

    Example:
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


def _replicated(params: Any) -> jax.sharding.Sharding | None:
    """A sharding that replicates over the devices of the first committed leaf of ``params`` (None if none)."""
    for p in jax.tree.leaves(params):
        if isinstance(p, jax.Array) and not isinstance(p, jax.core.Tracer) and p.committed:
            sharding = p.sharding
            if isinstance(sharding, NamedSharding):
                return NamedSharding(sharding.mesh, PartitionSpec())
            if isinstance(sharding, SingleDeviceSharding):
                return sharding
            return None
    return None


def commit_like(tree: Any, params: Any) -> Any:
    """Commits the uncommitted array leaves of ``tree`` (step counters, keys...) next to committed ``params``.

    When the params are committed (``device_put`` to a device or a mesh), a state whose scalars stay
    uncommitted would come back from the first jitted step committed, and the second step would compile again.
    Uncommitted leaves are therefore replicated over the params' devices (their mesh, or their device); with
    uncommitted params nothing changes.

    Args:
      tree: a pytree (e.g. an optimizer state); only its uncommitted concrete ``jax.Array`` leaves move.
      params: the parameter pytree whose placement is followed.

    Returns:
      ``tree`` with those leaves replicated next to ``params`` (unchanged when ``params`` are not committed).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = jax.device_put({"w": jnp.zeros(2)}, jax.devices()[0])
      >>> commit_like({"count": jnp.zeros((), jnp.int32)}, p)["count"].committed
      True
    """
    sharding = _replicated(params)
    if sharding is None:
        return tree

    def put(x):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.committed:
            return jax.device_put(x, sharding)
        return x

    return jax.tree.map(put, tree)
