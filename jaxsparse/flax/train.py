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

A layer is found by its pattern object (:class:`~jaxsparse.flax.BlockSparsePattern`) and named by its path
(``"mlp/fc1"``; ``""`` for a root layer); its values are the ``kernel_blocks`` leaf at the same path in
``params``. :func:`block_gmp_step` is gradual magnitude pruning on blocks (Zhu & Gupta's schedule over
blocks, gated with ``lax.cond``); :func:`block_magnitude_masks` + :func:`repack_blocks` are the pieces for any
other block rule.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> from jaxsparse.flax.linen import BlockSparseDense
  >>> v = BlockSparseDense(4, block=(2, 2), capacity=4).init(jax.random.key(0), jnp.ones((1, 8)))
  >>> params, pattern = v["params"], v["sparse_pattern"]
  >>> tx = optax.adam(1e-3)
  >>> opt_state = tx.init(params)
  >>> masks = block_magnitude_masks(params, pattern, sparsity=0.75)   # keep 2 of the 8 blocks
  >>> params, pattern, opt_state = repack_blocks(params, pattern, masks, opt_state=opt_state, tx=tx)
  >>> int(pattern["pattern"].nnz), params["kernel_blocks"].shape
  (2, (4, 2, 2))
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from jaxsparse._deprecations import module_getattr
from jaxsparse.allocation import keep_count
from jaxsparse.flax import _core
from jaxsparse.flax._core import (
    BlockSparsePattern,
    live_block_scores,
    repack,
    slot_sources,
    take_slots,
)
from jaxsparse.masks import topk_mask
from jaxsparse.schedules import polynomial_sparsity, update_gate
from pallas_kernels.block_sparse import BlockSparseWeight, block_mask_of

__all__ = [
    "block_sparse_weights",
    "stored_block_masks",
    "block_magnitude_masks",
    "repack_blocks",
    "block_gmp_step",
    "repack",
    "slot_sources",
    "take_slots",
    "live_block_scores",
]


def block_sparse_weights(params: PyTree, pattern: PyTree) -> dict[str, BlockSparseWeight]:
    """Every block-sparse layer in ``(params, pattern)`` as a weight.

    Args:
      params: the trainable tree (holds each layer's ``kernel_blocks``).
      pattern: the tree of pattern objects (NNX ``SparsePattern`` state or Linen ``sparse_pattern``).

    Returns:
      ``{layer path: BlockSparseWeight}``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsparse.flax.linen import BlockSparseDense
      >>> v = BlockSparseDense(4, block=(2, 2), capacity=3).init(jax.random.key(0), jnp.ones((1, 8)))
      >>> {k: (w.shape, w.capacity) for k, w in block_sparse_weights(v["params"], v["sparse_pattern"]).items()}
      {'': ((8, 4), 3)}
    """
    patterns = {
        k: p for k, p in _core.patterns_of(pattern).items() if isinstance(p, BlockSparsePattern)
    }
    data = _core.leaves_named(params, _core.BLOCK_PARAM)
    for layer in sorted(set(data) ^ set(patterns)):
        has, lacks = ("params", "pattern") if layer in data else ("pattern", "params")
        raise ValueError(
            f"layer '{layer}' is block-sparse in the {has} tree but the {lacks} tree has no "
            f"{'BlockSparsePattern' if layer in data else repr(_core.BLOCK_PARAM)} at that path; pass "
            f"matching params and sparse_pattern / SparsePattern trees."
        )
    return {layer: patterns[layer].weight(data[layer]) for layer in data}


def stored_block_masks(params: PyTree, pattern: PyTree) -> dict[str, Bool[Array, "Kb Nb"]]:
    """The block mask each layer stores now (reads it; :func:`jaxsparse.block_mask` builds one from scores).

    Args:
      params, pattern: the layers' trees (see the module docstring).

    Returns:
      ``{layer path: (Kb, Nb) bool mask of its live blocks}``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsparse.flax.linen import BlockSparseDense
      >>> mask = jnp.array([[True, False], [False, False]])
      >>> v = BlockSparseDense(4, block=(2, 2), block_mask=mask).init(jax.random.key(0), jnp.ones((1, 4)))
      >>> stored_block_masks(v["params"], v["sparse_pattern"])[""].tolist()
      [[True, False], [False, False]]
    """
    return {k: block_mask_of(w) for k, w in block_sparse_weights(params, pattern).items()}


def block_magnitude_masks(
    params: PyTree, pattern: PyTree, sparsity: Float[ArrayLike, ""], pool: str = "l2"
) -> dict[str, Bool[Array, "Kb Nb"]]:
    """Per layer, keep its ``keep_count(sparsity, Kb * Nb)`` stored blocks of largest norm (never grows).

    The count is :func:`jaxsparse.keep_count`, the rule of every jaxsparse API, on the layer's block grid
    (at least one block is kept, which only matters at ``sparsity == 1``). Blocks not stored are never
    selected, so a layer holding fewer blocks keeps all of them.

    Args:
      params, pattern: the layers' trees (see the module docstring).
      sparsity: fraction of each layer's block grid to prune; may be traced.
      pool: block norm, ``"l2"``, ``"l1"`` or ``"max"``.

    Returns:
      ``{layer path: (Kb, Nb) bool mask}`` for :func:`repack_blocks`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsparse.flax.linen import BlockSparseDense
      >>> v = BlockSparseDense(4, block=(2, 2), capacity=8).init(jax.random.key(0), jnp.ones((1, 8)))
      >>> int(block_magnitude_masks(v["params"], v["sparse_pattern"], 0.7)[""].sum())  # 8 - floor(5.6)
      3
    """
    out = {}
    for layer, w in block_sparse_weights(params, pattern).items():
        scores = live_block_scores(w, pool)
        k = jnp.clip(keep_count(sparsity, scores.size), 1, scores.size)
        out[layer] = topk_mask(scores, k) & jnp.isfinite(scores)
    return out


def repack_blocks(
    params: PyTree,
    pattern: PyTree,
    masks: Mapping[str, Bool[ArrayLike, "Kb Nb"]],
    *,
    opt_state: optax.OptState | None = None,
    tx: optax.GradientTransformation | None = None,
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

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxsparse.flax.linen import BlockSparseDense
      >>> v = BlockSparseDense(4, block=(2, 2), capacity=2).init(jax.random.key(0), jnp.ones((1, 4)))
      >>> mask = jnp.array([[False, True], [False, False]])
      >>> params, pattern, _ = jax.jit(repack_blocks)(v["params"], v["sparse_pattern"], {"": mask})
      >>> int(pattern["pattern"].nnz), params["kernel_blocks"].shape
      (1, (2, 2, 2))
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

    def by_layer(values, fallback):
        def put(path, leaf):
            names = _core.path_names(path)
            layer = "/".join(names[:-1])
            hit = bool(names) and names[-1] == _core.BLOCK_PARAM and layer in values
            return values[layer] if hit else fallback(leaf)

        return put

    new_params = jax.tree_util.tree_map_with_path(
        by_layer({k: w.data for k, w in new_w.items()}, lambda leaf: leaf), params
    )
    new_pattern = _core.replace_patterns(
        pattern, {k: BlockSparsePattern.of(w) for k, w in new_w.items()}
    )
    if opt_state is not None:
        if tx is None:
            raise ValueError(
                "repack_blocks: pass tx= (the optax transformation) together with opt_state=."
            )
        none = jnp.zeros((0,), jnp.int32)
        src_tree = jax.tree_util.tree_map_with_path(by_layer(sources, lambda leaf: none), params)

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
    tx: optax.GradientTransformation,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int,
    initial_sparsity: float = 0.0,
    pool: str = "l2",
) -> tuple[PyTree, PyTree, optax.OptState]:
    """Gradual magnitude pruning over blocks, for use inside a jitted step (``lax.cond`` on the update grid).

    On update steps (:func:`jaxsparse.update_gate`) each layer keeps its largest-norm stored blocks down to
    ``polynomial_sparsity(...)(step)`` of its block grid (:func:`block_magnitude_masks`) and is re-packed in
    place of capacity; other steps pass the trees through. Call it after ``optax.apply_updates``.

    Args:
      params, pattern: the layers' trees (see the module docstring).
      opt_state, tx: the optax state (its moments move with the blocks) and its transformation.
      step: the step counter (traced).
      final_sparsity, begin_step, end_step, frequency, initial_sparsity: as
        :func:`jaxsparse.polynomial_sparsity` / :func:`jaxsparse.update_gate`.
      pool: block norm, ``"l2"``, ``"l1"`` or ``"max"``.

    Returns:
      ``(params, pattern, opt_state)``, same structures and shapes.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxsparse.flax.linen import BlockSparseDense
      >>> v = BlockSparseDense(4, block=(2, 2), capacity=8).init(jax.random.key(0), jnp.ones((1, 8)))
      >>> tx = optax.sgd(0.1)
      >>> trees = (v["params"], v["sparse_pattern"], tx.init(v["params"]))
      >>> step = jax.jit(lambda trees, i: block_gmp_step(*trees, i, tx=tx, final_sparsity=0.5,
      ...                                                begin_step=0, end_step=2, frequency=1))
      >>> for i in range(3):
      ...     trees = step(trees, i)
      >>> int(trees[1]["pattern"].nnz), step._cache_size()
      (4, 1)
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


__getattr__ = module_getattr(
    __name__,
    {"block_masks": ("jaxsparse.flax.train.stored_block_masks", stored_block_masks)},
)
