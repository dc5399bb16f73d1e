"""Masked dense params <-> compressed layer params (block-sparse, N:M), whole models, orbax checkpoints.

Tree level (Linen variables, NNX pure dicts/States; any nesting):

* :func:`compress` turns every layer node ``{"kernel": (K, N), ...}`` whose mask (from any jaxsparse
  algorithm: ``SparseState.masks``, ``None`` for dense leaves) is given into the layer layout of
  :mod:`jaxsparse.flax` — ``kernel_blocks`` / ``kernel_values`` in ``params`` plus one pattern object
  per layer (``<layer>/pattern``) in a ``pattern`` tree — and :func:`decompress` inverts it:
  ``decompress(*compress(p, masks))[0]`` equals ``apply_masks(p, masks)`` bit for bit.
* :func:`to_sparse_nnx` / :func:`to_dense_nnx` swap ``nnx.Linear`` <-> :class:`~jaxsparse.flax.nnx.BlockSparseLinear`
  / :class:`~jaxsparse.flax.nnx.NMLinear` in a whole NNX model (returns a new model).

Checkpoints of compressed models and training states: :func:`jaxsparse.checkpoint.save` /
:func:`jaxsparse.checkpoint.restore` (``<dir>/arrays`` + ``<dir>/layout.json`` with the format metadata of every
compressed layer; readable without JAX). ``convert.save``, ``convert.restore`` and ``convert.layout`` are
deprecated names for them.

On-disk layout of one compressed layer (paths are ``/``-joined tree paths, the index arrays below
``<layer>/pattern/``; ``docs/compressed_format.md`` has a PyTorch loader):

* block-sparse, ``W: (K, N)`` used as ``x @ W`` (PyTorch ``weight = W.T``): ``kernel_blocks
  [capacity, bk, bn]`` (entries ``0 .. nnz-1`` live, sorted by output block column then input block row;
  padding is zero), ``row_idx``/``col_idx [capacity]`` int32 block coordinates, ``col_ptr [N/bn + 1]``
  (CSR over output block columns: exactly PyTorch BSR ``crow_indices`` of ``W.T``), ``row_ptr``, ``t_*``
  (transposed order for dX), ``nnz``, ``num_dropped`` (0 in a valid checkpoint).
* N:M, groups of ``m`` along ``K``: ``kernel_values [n, K/m, N]`` and ``meta [n, ceil(G/pack_tile) *
  pack_tile / F, N]`` int32 (``F = 32 / bits`` positions per word, ``bits`` = 1, 2 or 4); position of slot
  ``s``, group ``g``, column ``j``: tile ``t = g // pack_tile``, ``c, r = divmod(g % pack_tile, pack_tile // F)``,
  word ``meta[s, t * pack_tile // F + r, j]``, bits ``[c * bits, (c + 1) * bits)``; ``n``, ``m`` and
  ``pack_tile`` are static (in ``layout.json``, not arrays).

Example:
  >>> import jax.numpy as jnp
  >>> params = {"fc": {"kernel": jnp.arange(16.0).reshape(4, 4), "bias": jnp.zeros(4)}}
  >>> masks = {"fc": {"kernel": jnp.kron(jnp.eye(2), jnp.ones((2, 2))).astype(bool), "bias": None}}
  >>> cparams, pattern = compress(params, masks, format="block", block=(2, 2))
  >>> cparams["fc"]["kernel_blocks"].shape, int(pattern["fc"]["pattern"].nnz)
  ((2, 2, 2), 2)
  >>> dense, dmasks = decompress(cparams, pattern)
  >>> bool((dense["fc"]["kernel"] == jnp.where(masks["fc"]["kernel"], params["fc"]["kernel"], 0)).all())
  True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import PyTree

from jaxsparse import _deprecations
from jaxsparse import checkpoint as _ckpt
from jaxsparse._bitmask import check_not_packed
from jaxsparse._tree import check_mask, leaf_paths, named_leaves
from jaxsparse.flax import _core
from jaxsparse.flax.nnx import BlockSparseLinear, NMLinear
from jaxsparse.nm_compression import compress_nm
from pallas_kernels.block_sparse import (
    block_mask_of,
    block_sparse_from_dense,
    block_sparse_to_dense,
)
from pallas_kernels.nm import unpack_indices, unpack_nm

__all__ = [
    "compress",
    "decompress",
    "to_sparse_nnx",
    "to_dense_nnx",
]


# ----------------------------------------------------------------------------------------- tree helpers
def _flat(tree: PyTree, keep_none: bool = False) -> dict[str, Any]:
    return dict(named_leaves(tree, keep_none))


def _set(d: dict, path: list[str], value: Any) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def _block_mask_of_elementwise(name: str, mask: Any, block: tuple[int, int]) -> Any:
    mask = jnp.asarray(mask)
    k, n = mask.shape
    bk, bn = block
    if k % bk or n % bn:
        raise ValueError(f"'{name}': block={block} does not divide the kernel shape {mask.shape}.")
    # NumPy when this process holds all of the mask; else jnp, whose reductions to scalars are replicated and
    # so readable on every process (a mask sharded over several processes)
    xp = np if mask.is_fully_addressable else jnp
    tiles = xp.asarray(mask).reshape(k // bk, bk, n // bn, bn)
    any_, all_ = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))
    partly = (any_ != all_).ravel()
    first = int(xp.argmax(partly))
    if bool(partly[first]):
        i, j = divmod(first, n // bn)
        raise ValueError(
            f"'{name}': the mask is not block-structured for block={block}: block ({i}, {j}) "
            f"(rows {i * bk}..{i * bk + bk - 1}, cols {j * bn}..{j * bn + bn - 1}) is partly kept."
        )
    return all_


# ----------------------------------------------------------------------------------------- compress
def compress(
    params: PyTree,
    masks: PyTree,
    *,
    format: str,
    block: tuple[int, int] | None = None,
    capacity: int | Mapping[str, int] | None = None,
    n: int = 2,
    m: int = 4,
    pack_tile: int | None = None,
) -> tuple[dict, dict]:
    """Masked dense params -> ``(params, pattern)`` in the layers' compressed layout (eager; masks concrete).

    ``format="nm"`` packs each kernel exactly as :func:`jaxsparse.compress_nm` does (same function, same
    checks and errors); the difference is the tree: :func:`jaxsparse.compress_nm` puts one kernel object
    (``NMWeight``/``NMLeaf``) per leaf in place of the leaf, this writes the Flax layer layout
    (``kernel_values`` + an ``NMPattern`` per layer) that :class:`~jaxsparse.flax.nnx.NMLinear` and its Linen
    twin hold. Params and masks may be sharded, also over several processes (nothing is read on the host but
    replicated scalars).

    Args:
      params: a params tree whose layers are nodes ``{"kernel": (K, N), "bias": ...}`` (Linen ``params``,
        ``nnx.state(model, nnx.Param)``, plain dicts).
      masks: same paths as ``params`` (bool arrays; ``None`` or absent for dense leaves), e.g. the
        ``masks`` of a jaxsparse ``SparseState``. Only ``kernel`` leaves with a mask are compressed.
      format: ``"block"`` or ``"nm"``.
      block: ``(bk, bn)`` for ``"block"``; the mask must be constant on every block.
      capacity: block slots per layer (int, or ``{layer path: int}``); default the mask's block count.
      n, m, pack_tile: for ``"nm"``; the mask must keep at most ``n`` of every ``m`` rows per column.

    Returns:
      ``(params, pattern)`` as nested dicts: compressed layers hold ``kernel_blocks``/``kernel_values``
      instead of ``kernel``; ``pattern`` holds their pattern objects (``BlockSparsePattern`` /
      ``NMPattern``) at ``<layer path>/pattern``, exactly the layers' ``sparse_pattern`` collection.

    Raises:
      ValueError: an unknown ``format``, masks naming leaves not in ``params``, a masked leaf that is not a 2-D
        ``kernel``, a mask not of the kernel's shape, a block mask not constant on blocks, no ``block`` or a
        ``capacity`` below the block count (``"block"``), or a mask that is not N:M or a ``K`` not divisible by
        ``m`` (``"nm"``). Errors name the leaf.
      TypeError: a mask that is not bool, or (``"nm"``) a kernel that is not floating-point.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"fc": {"kernel": jnp.arange(8.0).reshape(4, 2)}}
      >>> mask = jnp.array([[True, False], [False, True], [True, True], [False, False]])
      >>> cparams, pattern = compress(params, {"fc": {"kernel": mask}}, format="nm", n=2, m=4)
      >>> sorted(cparams["fc"]), cparams["fc"]["kernel_values"].shape, type(pattern["fc"]["pattern"]).__name__
      (['kernel_values'], (2, 1, 2), 'NMPattern')
    """
    check_not_packed("masks", masks)
    if format not in ("block", "nm"):
        raise ValueError(f"format must be 'block' or 'nm'; got {format!r}.")
    flat_p, flat_m = (
        _flat(params),
        {k: v for k, v in _flat(masks, keep_none=True).items() if v is not None},
    )
    unknown = sorted(set(flat_m) - set(flat_p))
    if unknown:
        raise ValueError(f"masks name leaves that are not in params: {unknown}.")
    out_p: dict = {}
    pattern: dict = {}
    for name, leaf in flat_p.items():
        path = name.split("/")
        if name not in flat_m:
            _set(out_p, path, leaf)
            continue
        if path[-1] != "kernel" or jnp.ndim(leaf) != 2:
            raise ValueError(
                f"'{name}': only 2-D 'kernel' leaves of linear layers can be compressed; got "
                f"shape {jnp.shape(leaf)}. Give it a None mask to keep it dense."
            )
        mask = flat_m[name]
        layer = "/".join(path[:-1])
        if format == "nm":  # the packing of jaxsparse.compress_nm, errors naming the leaf
            w = compress_nm({name: leaf}, n, m, axis=0, masks={name: mask}, pack_tile=pack_tile)
            _set(out_p, path[:-1] + [_core.NM_PARAM], w[name].values)
            _set(pattern, path[:-1] + [_core.PATTERN], _core.NMPattern.of(w[name]))
            continue
        check_mask(name, mask, leaf)
        if block is None:
            raise ValueError("format='block' needs block=(bk, bn).")
        bmask = _block_mask_of_elementwise(name, mask, tuple(block))
        cap = capacity.get(layer) if isinstance(capacity, Mapping) else capacity
        count = int(bmask.sum())
        cap = max(1, count) if cap is None else cap
        if cap < count:
            raise ValueError(f"'{name}': capacity={cap} is below the mask's block count {count}.")
        w = block_sparse_from_dense(leaf, jnp.asarray(bmask), block=tuple(block), capacity=cap)
        _set(out_p, path[:-1] + [_core.BLOCK_PARAM], w.data)
        _set(pattern, path[:-1] + [_core.PATTERN], _core.BlockSparsePattern.of(w))
    return out_p, pattern


def decompress(params: PyTree, pattern: PyTree) -> tuple[dict, dict]:
    """Inverse of :func:`compress`: ``(dense params, masks)`` with ``kernel`` back in every compressed layer.

    Jittable: the N:M config and block shapes are static metadata of the pattern objects.

    Args:
      params: compressed params (``kernel_blocks`` / ``kernel_values`` leaves).
      pattern: the matching pattern tree (Linen ``sparse_pattern``, NNX ``SparsePattern`` state, or
        :func:`compress` output).

    Returns:
      ``(params, masks)``: ``masks`` holds the stored positions (bool ``(K, N)``; for N:M, positions padded
      into under-full groups are included) and ``None`` for every other leaf, ready for jaxsparse's
      ``fixed_masks``.

    Raises:
      ValueError: a compressed leaf without the matching pattern object in ``pattern``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"fc": {"kernel": jnp.arange(8.0).reshape(4, 2)}}
      >>> mask = jnp.array([[True, False], [False, True], [True, True], [False, False]])
      >>> dense, masks = decompress(*compress(params, {"fc": {"kernel": mask}}, format="nm", n=2, m=4))
      >>> dense["fc"]["kernel"].tolist()
      [[0.0, 0.0], [0.0, 3.0], [4.0, 5.0], [0.0, 0.0]]
      >>> bool((masks["fc"]["kernel"] == mask).all())
      True
    """
    patterns = _core.patterns_of(pattern)
    out_p: dict = {}
    masks: dict = {}
    for name, leaf in _flat(params).items():
        path = name.split("/")
        layer = "/".join(path[:-1])
        if path[-1] not in (_core.BLOCK_PARAM, _core.NM_PARAM):
            _set(out_p, path, leaf)
            _set(masks, path, None)
            continue
        kind = _core.BlockSparsePattern if path[-1] == _core.BLOCK_PARAM else _core.NMPattern
        if not isinstance(patterns.get(layer), kind):
            raise ValueError(
                f"'{name}': the pattern tree has no {kind.__name__} at '{layer}/{_core.PATTERN}'."
            )
        w = patterns[layer].weight(leaf)
        if kind is _core.BlockSparsePattern:
            kernel = block_sparse_to_dense(w)
            bk, bn = w.block
            mask = jnp.repeat(jnp.repeat(block_mask_of(w), bk, 0), bn, 1)
        else:
            kernel = unpack_nm(w)
            idx = unpack_indices(w)
            hit = idx[:, :, None, :] == jnp.arange(w.m, dtype=jnp.int32)[None, None, :, None]
            mask = hit.any(0).reshape(w.shape)
        _set(out_p, path[:-1] + ["kernel"], kernel)
        _set(masks, path[:-1] + ["kernel"], mask)
    return out_p, masks


# ----------------------------------------------------------------------------------------- NNX models
def _swap(model: nnx.Module, make) -> nnx.Module:
    model = nnx.clone(model)
    todo = [
        (path, node)
        for path, node in nnx.iter_graph(model)
        if path and make(path, node) is not None
    ]
    for path, node in todo:
        parent = model
        for k in path[:-1]:
            parent = parent[k] if isinstance(k, int) else getattr(parent, k)
        new = make(path, node)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return model


def to_sparse_nnx(
    model: nnx.Module,
    masks: PyTree,
    *,
    format: str,
    block: tuple[int, int] | None = None,
    capacity: int | Mapping[str, int] | None = None,
    n: int = 2,
    m: int = 4,
    impl: str = "auto",
) -> nnx.Module:
    """A copy of ``model`` with every ``nnx.Linear`` whose ``kernel`` has a mask replaced by a sparse layer.

    ``masks`` follows ``nnx.state(model, nnx.Param)`` (e.g. a jaxsparse ``SparseState.masks`` over it).
    Values, bias, dtype, param_dtype and precision carry over; errors name the offending leaf.

    Args:
      model: the NNX model (not modified).
      masks: bool masks at the paths of ``nnx.state(model, nnx.Param)`` (``None`` or absent = dense).
      format: ``"block"`` (:class:`~jaxsparse.flax.nnx.BlockSparseLinear`) or ``"nm"``
        (:class:`~jaxsparse.flax.nnx.NMLinear`).
      block: ``(bk, bn)`` for ``"block"``.
      capacity: block slots per layer (int, or ``{layer path: int}``), as in :func:`compress`.
      n, m: the N:M pattern for ``"nm"``.
      impl: the new layers' kernel implementation (their ``impl`` argument; ``"auto"`` lets the op dispatch).

    Returns:
      A new model in which the masked ``nnx.Linear`` layers are sparse layers holding the masked values.

    Raises:
      ValueError: no ``nnx.Linear`` kernel has a mask, or any error of :func:`compress`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
      >>> mask = jnp.tile(jnp.array([[True], [True], [False], [False]]), (2, 4))
      >>> sparse = to_sparse_nnx(model, {"layers": {0: {"kernel": mask}}}, format="nm", n=2, m=4)
      >>> w = jnp.where(mask, model.layers[0].kernel[...], 0)
      >>> x = jnp.ones((3, 8))
      >>> type(sparse.layers[0]).__name__, bool(jnp.allclose(sparse(x), x @ w + model.layers[0].bias[...]))
      ('NMLinear', True)
    """
    params = nnx.state(model, nnx.Param)
    cparams, pattern = compress(
        params, masks, format=format, block=block, capacity=capacity, n=n, m=m
    )
    flat_c, patterns = _flat(cparams), _core.patterns_of(pattern)
    linear = {
        "/".join(str(k) for k in path)
        for path, node in nnx.iter_graph(model)
        if path and isinstance(node, nnx.Linear)
    }
    param = _core.BLOCK_PARAM if format == "block" else _core.NM_PARAM
    if not any(f"{layer}/{param}" in flat_c for layer in linear):
        masked = [k for k, v in _flat(masks, keep_none=True).items() if v is not None]
        raise ValueError(
            "to_sparse_nnx converts no layer: no nnx.Linear kernel has a mask. Masked leaves: "
            f"{masked}; nnx.Linear kernels: {sorted(f'{layer}/kernel' for layer in linear)}; "
            f"model paths (jaxsparse.leaf_paths): {leaf_paths(params)}."
        )

    def make(path, node):
        layer = "/".join(str(k) for k in path)
        key = f"{layer}/{_core.BLOCK_PARAM if format == 'block' else _core.NM_PARAM}"
        if not isinstance(node, nnx.Linear) or key not in flat_c:
            return None
        common = dict(
            use_bias=node.bias is not None,
            dtype=node.dtype,
            param_dtype=node.param_dtype,
            precision=node.precision,
            impl=impl,
            rngs=nnx.Rngs(0),
        )
        w = patterns[layer].weight(flat_c[key])
        if format == "block":
            new = BlockSparseLinear(
                node.in_features,
                node.out_features,
                block=w.block,
                capacity=w.capacity,
                block_mask=block_mask_of(w),
                **common,
            )
            new.kernel_blocks[...] = w.data
        else:
            new = NMLinear(
                node.in_features,
                node.out_features,
                n=w.n,
                m=w.m,
                pack_tile=w.pack_tile,
                **common,
            )
            new.kernel_values[...] = w.values
        new.pattern.set_value(patterns[layer])
        if node.bias is not None:
            new.bias[...] = node.bias[...]
        return new

    return _swap(model, make)


def to_dense_nnx(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every sparse layer replaced by an ``nnx.Linear`` holding its dense kernel.

    Args:
      model: an NNX model with :class:`~jaxsparse.flax.nnx.BlockSparseLinear` /
        :class:`~jaxsparse.flax.nnx.NMLinear` layers (not modified; other modules are copied as they are).

    Returns:
      A new model whose sparse layers are ``nnx.Linear`` layers (pruned entries 0; bias, dtypes and precision
      kept).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
      >>> mask = jnp.tile(jnp.array([[True], [True], [False], [False]]), (2, 4))
      >>> dense = to_dense_nnx(to_sparse_nnx(model, {"layers": {0: {"kernel": mask}}}, format="nm"))
      >>> w = jnp.where(mask, model.layers[0].kernel[...], 0)
      >>> type(dense.layers[0]).__name__, bool((dense.layers[0].kernel[...] == w).all())
      ('Linear', True)
    """

    def make(path, node):
        if not isinstance(node, (BlockSparseLinear, NMLinear)):
            return None
        new = nnx.Linear(
            node.in_features,
            node.out_features,
            use_bias=node.use_bias,
            dtype=node.dtype,
            param_dtype=node.param_dtype,
            precision=node.precision,
            rngs=nnx.Rngs(0),
        )
        new.kernel[...] = node.todense()
        if node.use_bias:
            new.bias[...] = node.bias[...]
        return new

    return _swap(model, make)


# ----------------------------------------------------------------------------------------- deprecated
__getattr__ = _deprecations.module_getattr(
    __name__,
    {
        "save": ("jaxsparse.checkpoint.save", _ckpt.save),
        "restore": ("jaxsparse.checkpoint.restore", _ckpt.restore),
        "layout": ("jaxsparse.checkpoint.layout", _ckpt.layout),
        "LAYOUT_VERSION": ("jaxsparse.checkpoint.LAYOUT_VERSION", _ckpt.LAYOUT_VERSION),
    },
)
