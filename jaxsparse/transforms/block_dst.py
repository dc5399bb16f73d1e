"""Block-structured dynamic sparse training (RigL / SET on blocks) for the block-sparse Flax layers.

Training runs on the block-sparse kernels (:class:`jaxsparse.flax.BlockSparseLinear` / ``BlockSparseDense``:
``bsr_matmul`` forward and backward, dW only at stored blocks). Every ``update_every`` steps, inside the same
compiled step (``lax.cond``), each layer drops its ``floor(n_live * f(t))`` stored blocks of smallest norm and
grows as many blocks among those not kept — by the largest norm of the *dense* gradient ``dL/dW`` (RigL,
``grow="gradient"``) or at random (SET, ``grow="random"``) — then is re-packed at its fixed capacity
(:func:`jaxsparse.flax.train.repack_blocks`; kept blocks keep their values and optimizer moments, grown blocks
start at zero with zero moments). ``f`` is the drop fraction cosine-decayed to 0 at ``end_step``.

The dense gradient is needed only on update steps, so it is a *callable*, evaluated inside the update branch
and nowhere else: ``dense_grads() -> {layer path: (K, N) dL/dW}``. For a layer ``y = x @ W`` it is ``x^T dL/dy``;
the simplest way to get it is the gradient of the same loss with the layers' kernels given as dense arrays
(``block_sparse_to_dense`` of each layer; see the test and the example below).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jaxtyping import Array, ArrayLike, Int, PRNGKeyArray, PyTree

from jaxsparse import _validation as v
from jaxsparse.flax.train import block_sparse_weights, live_block_scores, repack_blocks
from jaxsparse.masks import block_scores, random_scores, topk_mask
from jaxsparse.schedules import drop_fraction_schedule, update_gate
from pallas_kernels.block_sparse import block_mask_of

__all__ = ["BLOCK_GROWTH", "block_dst_step"]

BLOCK_GROWTH = ("gradient", "random")


def block_dst_step(
    params: PyTree,
    pattern: PyTree,
    opt_state: optax.OptState,
    step: Int[ArrayLike, ""],
    *,
    tx: optax.GradientTransformation,
    dense_grads: Callable[[], Mapping[str, Array]] | None = None,
    key: PRNGKeyArray | None = None,
    grow: str = "gradient",
    update_every: int = 100,
    drop_fraction: float = 0.3,
    end_step: int,
    begin_step: int = 0,
    pool: str = "l2",
) -> tuple[PyTree, PyTree, optax.OptState]:
    """One gated block drop-and-grow update of every block-sparse layer (call after ``optax.apply_updates``).

    Args:
      params, pattern: the layers' trees (NNX: ``nnx.split(model, nnx.Param, SparsePattern)``; Linen:
        ``variables["params"], variables["sparse_pattern"]``).
      opt_state, tx: the optax state (its slot-shaped moments move with the blocks) and its transformation.
      step: the step counter (traced); updates at ``begin_step + k * update_every``, ``k >= 1``, up to
        ``end_step``.
      dense_grads: ``() -> {layer path: (K, N) dense dL/dW}``, called only inside the update branch
        (``grow="gradient"``).
      key: PRNG key for ``grow="random"``.
      grow: ``"gradient"`` (block RigL) or ``"random"`` (block SET).
      update_every, drop_fraction, end_step, begin_step: RigL's schedule (cosine-decayed drop fraction).
      pool: block norm for drop and growth scores, ``"l2"``, ``"l1"`` or ``"max"``.

    Returns:
      ``(params, pattern, opt_state)``, same structures and shapes (one compilation for every mask).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxsparse.flax.linen import BlockSparseDense
      >>> from pallas_kernels.block_sparse import bsr_matmul, block_sparse_to_dense
      >>> from jaxsparse.flax.train import block_sparse_weights
      >>> v = BlockSparseDense(8, block=(2, 2), capacity=4, use_bias=False).init(jax.random.key(0), jnp.ones((1, 8)))
      >>> params, pattern = v["params"], v["sparse_pattern"]
      >>> x, y = jnp.ones((4, 8)), jnp.ones((4, 8))
      >>> tx = optax.sgd(0.1)
      >>> def loss(params):
      ...     w = block_sparse_weights(params, pattern)[""]
      ...     return jnp.mean((bsr_matmul(x, w) - y) ** 2)
      >>> def dense(params):
      ...     kernel = block_sparse_to_dense(block_sparse_weights(params, pattern)[""])
      ...     return {"": jax.grad(lambda k: jnp.mean((x @ k - y) ** 2))(kernel)}
      >>> state = tx.init(params)
      >>> u, state = tx.update(jax.grad(loss)(params), state)
      >>> params = optax.apply_updates(params, u)
      >>> params, pattern, state = block_dst_step(params, pattern, state, 100, tx=tx,
      ...     dense_grads=lambda: dense(params), end_step=1000, drop_fraction=0.5)
      >>> int(pattern["pattern"].nnz), params["kernel_blocks"].shape
      (4, (4, 2, 2))
    """
    v.check_choice("grow", grow, BLOCK_GROWTH)
    if grow == "gradient" and dense_grads is None:
        raise ValueError("block_dst_step(grow='gradient') needs `dense_grads` (a callable).")
    if grow == "random" and key is None:
        raise ValueError("block_dst_step(grow='random') needs `key`.")
    gate = update_gate(update_every, begin_step, end_step, include_begin=False)
    fraction = drop_fraction_schedule(drop_fraction, end_step, "cosine")

    def update(trees):
        p, s, o = trees
        weights = block_sparse_weights(p, s)
        grads = dense_grads() if grow == "gradient" else None
        masks = {}
        for i, (layer, w) in enumerate(sorted(weights.items())):
            live = block_mask_of(w)
            n_live = jnp.sum(live, dtype=jnp.int32)
            n_drop = jnp.floor(n_live.astype(jnp.float32) * fraction(step)).astype(jnp.int32)
            kept = topk_mask(live_block_scores(w, pool), n_live - n_drop) & live
            if grow == "gradient":
                g = block_scores(grads[layer], w.block, pool)
            else:
                g = random_scores(jax.random.fold_in(key, i), {"g": kept})["g"]
            grown = topk_mask(jnp.where(kept, -jnp.inf, g), n_drop)
            masks[layer] = kept | (grown & ~kept)
        return repack_blocks(p, s, masks, opt_state=o, tx=tx)

    return lax.cond(gate(step), update, lambda trees: trees, (params, pattern, opt_state))
