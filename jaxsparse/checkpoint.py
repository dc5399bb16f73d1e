"""Checkpoints of any jaxsparse tree (params, masks, a whole training state, compressed layers), bit-exact.

One pair, :func:`save` and :func:`restore`, for every tree: pure dicts, Linen variables, ``nnx.state(model)``
(Variables), training states (``SparseState``, optax states, ``None`` masks of dense leaves). On disk::

    directory/
      arrays/        orbax-checkpoint: every leaf, as nested dicts keyed by its path (jaxsparse.leaf_paths)
      layout.json    every leaf's shape and dtype, and the format of every compressed layer (plain JSON)

Leaves are stored under the same ``/``-joined path names everywhere (``layout.json``, the orbax tree, the
patterns of :func:`jaxsparse.prunable`); an NNX Variable's ``value`` is not a level, so a tree saved from
``nnx.state(model)`` reads back with plain NumPy (``docs/compressed_format.md`` has the loaders).

:func:`restore` is strict: it compares ``layout.json`` with the target before reading any array and raises
``ValueError`` naming the first leaf or layer whose path, shape, dtype or format differs — it never casts. Each
array comes back with the target's placement: a committed array's or a ``jax.ShapeDtypeStruct``'s sharding (e.g.
a ``NamedSharding`` on a mesh), and for an uncommitted array (an eager ``tx.init`` scalar, say) or a
``ShapeDtypeStruct`` without one, an uncommitted array that ``jit`` places with the rest of the step's inputs.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree

from jaxsparse._tree import named_leaves, unwrap

__all__ = ["save", "restore", "layout", "LAYOUT_VERSION"]

LAYOUT_VERSION = 1
_ARRAYS, _LAYOUT = "arrays", "layout.json"
_SCALARS = (bool, int, float, complex)


def _dtype(x: Any) -> np.dtype:
    return jnp.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _named(tree: PyTree, what: str) -> dict[str, Any]:
    named: dict[str, Any] = {}
    for name, leaf in named_leaves(tree):
        if name == "":
            raise ValueError(
                f"`{what}` must be a container (dict, list, state...), not a bare array."
            )
        if name in named:
            raise ValueError(
                f"`{what}` has two leaves named '{name}'; checkpoint paths must be unique."
            )
        if not isinstance(
            leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct, *_SCALARS)
        ):
            raise TypeError(
                f"`{what}` leaf '{name}' is a {type(leaf).__name__}; only arrays, jax.ShapeDtypeStruct and "
                "Python numbers can be checkpointed."
            )
        named[name] = leaf
    if not named:
        raise ValueError(f"`{what}` has no array leaves.")
    return named


def _nested(named: dict[str, Any]) -> dict:
    out: dict = {}
    for name, leaf in named.items():
        *parents, last = name.split("/")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"leaf path '{name}' runs through another leaf.")
        if last in node:
            raise ValueError(f"leaf path '{name}' is also a node of other leaves.")
        node[last] = leaf
    return out


def _get(nested: dict, name: str) -> Any:
    for k in name.split("/"):
        nested = nested[k]
    return nested


def layout(tree: PyTree) -> dict:
    """The JSON-able description of ``tree`` that :func:`save` writes as ``layout.json``.

    Args:
      tree: any tree :func:`save` accepts (leaves may be ``jax.ShapeDtypeStruct``).

    Returns:
      ``{"version": 1, "leaves": {path: {"shape", "dtype"}}, "layers": {layer path: format metadata}}``;
      ``layers`` describes every compressed layer of :mod:`jaxsparse.flax` (found by its pattern object; see
      ``docs/compressed_format.md``).

    >>> import jax.numpy as jnp
    >>> layout({"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3, jnp.bfloat16)}})["leaves"]
    {'fc/bias': {'shape': [3], 'dtype': 'bfloat16'}, 'fc/kernel': {'shape': [2, 3], 'dtype': 'float32'}}
    """
    flat = _named(tree, "tree")
    leaves = {k: {"shape": list(np.shape(v)), "dtype": str(_dtype(v))} for k, v in flat.items()}
    layers: dict = {}
    if (
        "jaxsparse.flax._core" in sys.modules
    ):  # pattern objects exist only once the layers are imported
        layers = sys.modules["jaxsparse.flax._core"].layer_layouts(unwrap(tree))
    return {"version": LAYOUT_VERSION, "layers": layers, "leaves": leaves}


def save(directory: str | os.PathLike, tree: PyTree) -> None:
    """Writes ``tree`` to ``directory`` (which must not exist yet): ``arrays/`` (orbax) and ``layout.json``.

    Args:
      directory: a new directory.
      tree: params, masks, an optimizer or training state, ``nnx.state(model)``, Linen variables... Leaves
        are arrays (sharded ones included) or Python numbers; ``None`` leaves (dense leaves' masks) are
        structure and need no storage.

    Returns:
      None.

    >>> import tempfile, jax.numpy as jnp
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> save(d, {"w": jnp.arange(3.0), "mask": None})
    >>> restore(d, {"w": jnp.zeros(3), "mask": None})["w"].tolist()
    [0.0, 1.0, 2.0]
    """
    directory = os.path.abspath(directory)
    exists = os.path.exists(directory)
    # every process has looked before any creates it (else a fast process 0 makes the others fail here)
    _sync_processes("jaxsparse.checkpoint.save: checked")
    if exists:
        raise ValueError(f"checkpoint directory {directory} already exists.")
    named = _named(tree, "tree")
    desc = layout(tree)
    arrays = _nested(
        {k: (np.asarray(v) if isinstance(v, _SCALARS) else v) for k, v in named.items()}
    )
    os.makedirs(directory, exist_ok=jax.process_count() > 1)
    with ocp.StandardCheckpointer() as ckptr:  # each process writes its own shards
        ckptr.save(os.path.join(directory, _ARRAYS), arrays)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, _LAYOUT), "w") as f:
            json.dump(desc, f, indent=1, sort_keys=True)
    # layout.json exists for every process when save returns
    _sync_processes("jaxsparse.checkpoint.save: written")


def _sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-process JAX run (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _check_layout(stored: dict, want: dict) -> None:
    missing = sorted(set(want["leaves"]) - set(stored["leaves"]))
    extra = sorted(set(stored["leaves"]) - set(want["leaves"]))
    if missing or extra:
        raise ValueError(
            "the checkpoint's tree structure differs from the target's: leaves only in the target "
            f"{missing[:20]}, only in the checkpoint {extra[:20]}."
        )
    for layer in sorted(set(stored["layers"]) | set(want["layers"])):
        a, b = stored["layers"].get(layer), want["layers"].get(layer)
        if a is None or b is None:
            raise ValueError(
                f"layer '{layer}' is compressed in the {'target' if a is None else 'checkpoint'} "
                f"but not in the {'checkpoint' if a is None else 'target'}."
            )
        for key in sorted(set(a) & set(b) - {"arrays"}):
            if a[key] != b[key]:
                raise ValueError(
                    f"layer '{layer}': checkpoint has {key}={a[key]}, the target layer has {key}={b[key]}."
                )
    for name in sorted(stored["leaves"]):
        a, b = stored["leaves"][name], want["leaves"][name]
        if a != b:
            raise ValueError(
                f"leaf '{name}': checkpoint has {a}, target has {b} (restore never casts; build the "
                "target with the saved dtypes and shapes)."
            )


def _read_as(leaf: Any) -> Any:
    """What orbax should produce for ``leaf``: a sharded array where the target is placed, NumPy otherwise."""
    sharding = None
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
    elif isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.committed:
        sharding = leaf.sharding
    if sharding is not None:
        return jax.ShapeDtypeStruct(np.shape(leaf), _dtype(leaf), sharding=sharding)
    return np.zeros(np.shape(leaf), _dtype(leaf))


def _as_target(read: Any, leaf: Any) -> Any:
    if isinstance(leaf, _SCALARS):
        return type(leaf)(np.asarray(read).item())
    if isinstance(leaf, (np.ndarray, np.generic)):
        return np.asarray(read)
    if isinstance(read, jax.Array):
        return read
    return jnp.asarray(read)  # uncommitted, like the target


def restore(directory: str | os.PathLike, target: PyTree) -> PyTree:
    """Reads a tree written by :func:`save` into the structure, dtypes and placement of ``target``.

    Args:
      directory: a directory written by :func:`save`.
      target: a tree like the saved one: concrete arrays (e.g. the state of an eager ``tx.init``) or
        ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of it), with shardings where the arrays should live on a
        mesh. Its NNX Variables, NamedTuples and ``None`` leaves are kept; ``target`` is not modified.

    Returns:
      The restored tree, structured like ``target``.

    Raises:
      ValueError: a leaf's path, shape or dtype, or a compressed layer's format, differs from the target's
        (checked before any array is read).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> d = tempfile.mkdtemp() + "/ckpt"
      >>> state = {"w": jnp.arange(4.0), "step": jnp.int32(7), "mask": None}
      >>> save(d, state)
      >>> out = restore(d, jax.eval_shape(lambda: state))
      >>> out["w"].tolist(), int(out["step"]), out["mask"]
      ([0.0, 1.0, 2.0, 3.0], 7, None)
    """
    directory = os.path.abspath(directory)
    path = os.path.join(directory, _LAYOUT)
    if not os.path.exists(path):
        raise ValueError(
            f"{directory} is not a jaxsparse checkpoint (no {_LAYOUT}); write it with "
            "jaxsparse.checkpoint.save."
        )
    with open(path) as f:
        stored = json.load(f)
    named = _named(target, "target")
    _check_layout(stored, layout(target))
    with ocp.StandardCheckpointer() as ckptr:
        read = ckptr.restore(
            os.path.join(directory, _ARRAYS), _nested({k: _read_as(v) for k, v in named.items()})
        )
    values = [_as_target(_get(read, k), leaf) for k, leaf in named.items()]
    leaves, treedef = jax.tree.flatten(target)
    if len(leaves) != len(values):  # pragma: no cover - named_leaves and flatten walk the same tree
        raise ValueError("internal error: target leaves and names disagree.")
    return jax.tree.unflatten(treedef, values)
