"""Training block-sparse layers on the kernels while their masks change: re-pack inside the compiled step.

The layers' trainable leaves are the stored blocks, so an ordinary ``jax.grad`` + optax step already runs
:func:`~pallas_kernels.block_sparse.bsr_matmul` in both passes (dW only at stored blocks). A mask update
re-packs every layer to its new block mask at the *same capacity* — all shapes unchanged, so one compiled
step serves every mask — and moves the optimizer's slot-shaped state (Adam moments...) with the blocks
(:func:`repack_blocks`; new blocks start with zero value and zero moments).

Everything works on the pair ``(params, pattern)`` of trees, identical for both frameworks:

* NNX: ``graphdef, params, pattern = nnx.split(model, nnx.Param, SparsePattern)`` (``nnx.State`` trees);
  rebuild with ``nnx.merge(graphdef, params, pattern)``.
* Linen: ``params, pattern = variables["params"], variables["sparse_pattern"]``.

Layers are named by their path (``"mlp/fc1"``). :func:`block_gmp_step` is gradual magnitude pruning on blocks
(Zhu & Gupta's schedule over blocks, gated with ``lax.cond``); :func:`block_magnitude_masks` +
:func:`repack_blocks` are the pieces for any other block rule.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from jaxsparse.flax.linen import BlockSparseDense
  >>> v = BlockSparseDense(4, block=(2, 2), capacity=4).init(jax.random.key(0), jnp.ones((1, 8)))
  >>> params, pattern = v["params"], v["sparse_pattern"]
  >>> tx = optax.adam(1e-3)
  >>> opt_state = tx.init(params)
  >>> masks = block_magnitude_masks(params, pattern, sparsity=0.75)   # keep 2 of the 8 blocks
  >>> params, pattern, opt_state = repack_blocks(params, pattern, masks, opt_state=opt_state, tx=tx)
  >>> int(pattern["nnz"]), params["kernel_blocks"].shape
  (2, (4, 2, 2))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from jaxsparse.flax import _core
from jaxsparse.flax._core import live_block_scores, repack, slot_sources, take_slots
from jaxsparse.masks import topk_mask
from jaxsparse.schedules import polynomial_sparsity, update_gate
from pallas_kernels.block_sparse import BlockSparseWeight, block_mask_of

__all__ = [
    "block_sparse_weights",
    "block_masks",
    "block_magnitude_masks",
    "repack_blocks",
    "block_gmp_step",
    "repack",
    "slot_sources",
    "take_slots",
    "live_block_scores",
]


def _names(path: tuple) -> tuple[str, ...]:
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value":
            continue  # the value of an NNX Variable
        names.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return tuple(names)


def _split(path: tuple) -> tuple[str, str]:
    names = _names(path)
    return "/".join(names[:-1]), names[-1]


def block_sparse_weights(params: PyTree, pattern: PyTree) -> dict[str, BlockSparseWeight]:
    """Every block-sparse layer in ``(params, pattern)`` as ``{layer path: BlockSparseWeight}``."""
    data = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        layer, name = _split(path)
        if name == _core.BLOCK_PARAM:
            data[layer] = leaf
    fields: dict[str, dict[str, Array]] = {layer: {} for layer in data}
    for path, leaf in jax.tree_util.tree_flatten_with_path(pattern)[0]:
        layer, name = _split(path)
        if layer in fields and name in _core.BLOCK_PATTERN_FIELDS:
            fields[layer][name] = leaf
    out = {}
    for layer, d in data.items():
        missing = [f for f in _core.BLOCK_PATTERN_FIELDS if f not in fields[layer]]
        if missing:
            raise ValueError(
                f"layer '{layer}' has '{_core.BLOCK_PARAM}' in params but the pattern tree lacks "
                f"{missing}; pass the matching sparse_pattern / SparsePattern state."
            )
        out[layer] = _core.block_weight(d, fields[layer])
    return out


def block_masks(params: PyTree, pattern: PyTree) -> dict[str, Bool[Array, "Kb Nb"]]:
    """``{layer path: (Kb, Nb) bool mask of its stored blocks}``."""
    return {k: block_mask_of(w) for k, w in block_sparse_weights(params, pattern).items()}


def block_magnitude_masks(
    params: PyTree, pattern: PyTree, sparsity: Float[ArrayLike, ""], pool: str = "l2"
) -> dict[str, Bool[Array, "Kb Nb"]]:
    """Per layer, keep the ``round((1 - sparsity) * Kb * Nb)`` stored blocks of largest norm (never grows).

    ``sparsity`` may be traced; at least one block is kept. Blocks not stored are never selected.
    """
    out = {}
    for layer, w in block_sparse_weights(params, pattern).items():
        scores = live_block_scores(w, pool)
        total = scores.size
        k = jnp.clip(
            jnp.round((1.0 - jnp.asarray(sparsity, jnp.float32)) * total), 1, total
        ).astype(jnp.int32)
        out[layer] = topk_mask(scores, k) & jnp.isfinite(scores)
    return out


def repack_blocks(
    params: PyTree,
    pattern: PyTree,
    masks: Mapping[str, Bool[ArrayLike, "Kb Nb"]],
    *,
    opt_state: optax.OptState | None = None,
    tx: Any = None,
) -> tuple[PyTree, PyTree, optax.OptState | None]:
    """Re-packs the named layers to new block masks at fixed capacity; moves optimizer state with the blocks.

    Args:
      params, pattern: the layers' trees (see the module docstring).
      masks: ``{layer path: (Kb, Nb) bool mask}``; layers not named are unchanged. A mask with more blocks
        than the layer's capacity raises when concrete; traced, the layer's data becomes NaN (see
        :func:`~pallas_kernels.block_sparse.block_sparse_from_dense`).
      opt_state, tx: optional optax state and its transformation: every param-shaped copy inside
        ``opt_state`` (moments...) is permuted like the blocks, new blocks get zeros.

    Returns:
      ``(params, pattern, opt_state)`` with the same tree structures, shapes and dtypes.
    """
    weights = block_sparse_weights(params, pattern)
    unknown = sorted(set(masks) - set(weights))
    if unknown:
        raise ValueError(
            f"masks name layers that are not block-sparse layers: {unknown}; known: {sorted(weights)}."
        )
    new_w, sources = {}, {}
    for layer, mask in masks.items():
        w = weights[layer]
        mask = _core.check_block_mask(mask, w.grid_shape, w.capacity, f"layer '{layer}'")
        new_w[layer], sources[layer] = repack(w, mask)

    def put_params(path, leaf):
        layer, name = _split(path)
        return new_w[layer].data if (layer in new_w and name == _core.BLOCK_PARAM) else leaf

    def put_pattern(path, leaf):
        layer, name = _split(path)
        return (
            getattr(new_w[layer], name)
            if (layer in new_w and name in _core.BLOCK_PATTERN_FIELDS)
            else leaf
        )

    new_params = jax.tree_util.tree_map_with_path(put_params, params)
    new_pattern = jax.tree_util.tree_map_with_path(put_pattern, pattern)
    if opt_state is not None:
        if tx is None:
            raise ValueError(
                "repack_blocks: pass tx= (the optax transformation) together with opt_state=."
            )
        none = jnp.zeros((0,), jnp.int32)

        def src_of(path, leaf):
            layer, name = _split(path)
            return sources[layer] if (layer in sources and name == _core.BLOCK_PARAM) else none

        src_tree = jax.tree_util.tree_map_with_path(src_of, params)

        def move(leaf, src):
            if (
                src.shape[0] == 0
                or not hasattr(leaf, "shape")
                or leaf.ndim == 0
                or leaf.shape[0] != src.shape[0]
            ):
                return leaf
            return take_slots(leaf, src)

        opt_state = optax.tree_map_params(tx, move, opt_state, src_tree)
    return new_params, new_pattern, opt_state


def block_gmp_step(
    params: PyTree,
    pattern: PyTree,
    opt_state: optax.OptState,
    step: Int[ArrayLike, ""],
    *,
    tx: Any,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int,
    initial_sparsity: float = 0.0,
    pool: str = "l2",
) -> tuple[PyTree, PyTree, optax.OptState]:
    """Gradual magnitude pruning over blocks, for use inside a jitted step (``lax.cond`` on the update grid).

    On update steps (:func:`jaxsparse.schedules.update_gate`) each layer keeps its largest-norm stored blocks
    down to ``polynomial_sparsity(...)(step)`` of its block grid and is re-packed in place of capacity; other
    steps pass the trees through. Call it after ``optax.apply_updates``.
    """
    gate = update_gate(frequency, begin_step, end_step)
    schedule = polynomial_sparsity(
        final_sparsity, begin_step, end_step, frequency, initial_sparsity
    )

    def update(trees):
        p, s, o = trees
        masks = block_magnitude_masks(p, s, schedule(step), pool)
        return repack_blocks(p, s, masks, opt_state=o, tx=tx)

    return lax.cond(gate(step), update, lambda trees: trees, (params, pattern, opt_state))
