"""Chase (Yin et al. 2023, "Dynamic Sparsity Is Channel-Level Sparsity Learner"): unstructured dynamic sparse
training that gradually removes whole channels, then exports a physically smaller dense-channel model.

The model is a chain of layers (``layers``: paths of the params sub-trees holding ``"kernel"`` and optionally
``"bias"``, in forward order, e.g. ``["Dense_0", "Dense_1", "Dense_2"]``); channel ``j`` of layer ``l`` (all but
the last) is column ``j`` of its kernel (the Flax output axis), entry ``j`` of its bias and row ``j`` of the next
kernel's input axis (``-2``; the ``I`` axis of an ``HWIO`` conv kernel). Two rules share one update:

* **parameter exploration** (MEST/RigL-style, global): every ``update_every`` steps, over all sparse kernels
  together, drop the ``floor(n_active * f(t))`` smallest ``|w|`` (``f``: ``drop_fraction`` cosine-decayed to 0 at
  ``end_step``) and regrow by the largest dense-gradient magnitude, outside removed channels, up to the *target*
  total count — so the weights freed by channel removal are redistributed and the overall density is constant;
* **channel removal**: every ``channel_every`` steps in ``[channel_begin, channel_end]`` the number of live
  channels follows the cubic schedule from all to ``(1 - channel_sparsity)`` of them; the live channels with the
  smallest score are removed globally, each layer keeping at least ``int(n_out * (1 - channel_sparsity) *
  min_ratio)``. Scores: ``"umm"`` (default; the paper's unmasked mean magnitude: mean ``|w|`` over the channel's
  active weights) or ``"mean"`` (over the whole fan-in, zeros included — the authors' run scripts'
  ``--mag_wise``).

Checked against the authors' code (``luuyin/chase``, ``Cifar/sparselearning/core_dst_chase.py``: ``del_layer``,
``gradual_pruning_rate``, ``minimum_layer``, the README's run scripts). Differences: exact global top-k instead of
their iterative threshold with random sub-sampling; the freed weights are regrown in the same update; BatchNorm (or
any other per-channel leaf) is not in the chain: zero its removed channels yourself, or put the normalisation into
the layer's bias. :func:`chase_compact` drops removed channels physically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree

from jaxsparse import _validation as v
from jaxsparse._tree import is_none, map_live
from jaxsparse.allocation import Budget, keep_count
from jaxsparse.masks import global_topk_masks, topk_mask
from jaxsparse.oneshot import leaf_sparsities, random_masks
from jaxsparse.schedules import drop_fraction_schedule, polynomial_sparsity, update_gate
from jaxsparse.transforms._factory import sparse_transform
from jaxsparse.transforms.common import MaskAlgorithm, MaskContext

__all__ = ["ChaseState", "chase", "chase_compact", "CHANNEL_SCORES"]

CHANNEL_SCORES = ("umm", "mean")


class ChaseState(NamedTuple):
    """Chase's own state: per layer of the chain but the last, the ``(n_out,)`` bool vector of live channels."""

    channels: tuple[Array, ...]


def _get(tree: PyTree, path: str) -> PyTree:
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _set(tree: PyTree, path: str, key: str, value) -> PyTree:
    parts = path.split("/")

    def go(node, i):
        node = dict(node)
        if i == len(parts):
            node[key] = value
        else:
            node[parts[i]] = go(node[parts[i]], i + 1)
        return node

    return go(tree, 0)


def _channel_scores(w: Array, m: Array, kind: str) -> Array:
    a = jnp.abs(w.reshape(-1, w.shape[-1])).astype(jnp.float32)
    if kind == "mean":
        return jnp.mean(a, axis=0)
    mm = m.reshape(-1, m.shape[-1])
    return jnp.sum(jnp.where(mm, a, 0.0), 0) / jnp.maximum(jnp.sum(mm, 0), 1)


def _allowed(
    channels: tuple[Array, ...], layers: Sequence[str], params: PyTree
) -> dict[str, Array]:
    """Per chain kernel: the positions not in a removed channel (column of its own, row of the previous)."""
    out = {}
    for i, name in enumerate(layers):
        shape = _get(params, name)["kernel"].shape
        ok = jnp.ones(shape, bool)
        if i < len(channels):
            ok = ok & channels[i]
        if i > 0:
            ok = ok & jnp.expand_dims(channels[i - 1], -1)
        out[name] = ok
    return out


@sparse_transform
def chase(
    sparsity: float | Budget | PyTree,
    *,
    layers: Sequence[str],
    total_steps: int,
    channel_sparsity: float = 0.3,
    min_ratio: float = 0.5,
    update_every: int = 1000,
    drop_fraction: float = 0.05,
    end_step: int | None = None,
    channel_every: int = 1000,
    channel_begin: int = 0,
    channel_end: int | None = None,
    score: str = "umm",
    skip_step_on_update: bool = False,
) -> MaskAlgorithm:
    """Chase: global drop-and-grow DST plus gradual removal of the lowest-scored channels of a layer chain.

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      sparsity: a float, a :func:`jaxsparse.budget` (the authors use ERK) or a per-leaf pytree; the chain's
        kernels must be sparse leaves.
      layers: paths (``"a/b"``) of the chain's layers in forward order; each holds ``"kernel"`` (``(..., in,
        out)``) and optionally ``"bias"``. The last layer's outputs are never removed.
      total_steps: training length (sets the default windows).
      channel_sparsity: ``S_c``, the final fraction of the chain's channels removed.
      min_ratio: ``beta``: every layer keeps at least ``int(n_out * (1 - S_c) * beta)`` channels.
      update_every: steps between parameter-exploration updates (``Delta T_p``, the authors' 1000).
      drop_fraction: the initial drop fraction (the authors' death rate 0.05), cosine-decayed to 0 at ``end_step``.
      end_step: last exploration update (default ``total_steps``).
      channel_every: steps between channel removals (``Delta T``, ``--layer_interval``).
      channel_begin, channel_end: the channel-removal window (default ``channel_end = 130/160 * total_steps``,
        the authors' ``stop_gmp_epochs``).
      score: ``"umm"`` (the paper's unmasked mean magnitude) or ``"mean"`` (the authors' run scripts).
      skip_step_on_update: no optimizer step on update steps.
      seed: seeds the PRNG key kept in the state (an int; may be traced under ``vmap``).

    Returns:
      The optax transformation (``chase.rule``: the :class:`~jaxsparse.MaskAlgorithm`); its state's ``extra`` is a
      :class:`ChaseState`. The chain's biases carry masks too (their removed channels are zero).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> ks = jax.random.split(jax.random.PRNGKey(0), 2)
      >>> params = {"l0": {"kernel": jax.random.normal(ks[0], (6, 10)), "bias": jnp.zeros(10)},
      ...           "l1": {"kernel": jax.random.normal(ks[1], (10, 3)), "bias": jnp.zeros(3)}}
      >>> tx = chase(optax.sgd(0.1), {"l0": {"kernel": 0.5, "bias": None}, "l1": {"kernel": 0.5, "bias": None}},
      ...            layers=["l0", "l1"], total_steps=40, channel_sparsity=0.4, update_every=4, channel_every=4)
      >>> state, step = tx.init(params), jax.jit(tx.update)
      >>> for t in range(40):
      ...     updates, state = step(jax.tree.map(jnp.cos, params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> int(state.extra.channels[0].sum()), int(state.masks["l0"]["kernel"].sum() + state.masks["l1"]["kernel"].sum())
      (6, 45)
      >>> small = chase_compact(params, state.extra.channels, ["l0", "l1"])
      >>> small["l0"]["kernel"].shape, small["l1"]["kernel"].shape
      ((6, 6), (6, 3))
    """
    if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        v.check_sparsity("sparsity", sparsity)
    if isinstance(layers, str) or len(layers) < 2 or not all(isinstance(n, str) for n in layers):
        raise ValueError(
            f"`layers` must list at least two layer paths in forward order; got {layers!r}."
        )
    v.check_int("total_steps", total_steps, 1)
    v.check_sparsity("channel_sparsity", channel_sparsity)
    v.check_fraction("min_ratio", min_ratio)
    v.check_choice("score", score, CHANNEL_SCORES)
    v.check_int("update_every", update_every, 1)
    v.check_int("channel_every", channel_every, 1)
    end_step = total_steps if end_step is None else end_step
    channel_end = int(130 / 160 * total_steps) if channel_end is None else channel_end
    v.check_int("channel_begin", channel_begin, 0)
    v.check_int("channel_end", channel_end, 0)
    v.check_schedule_window("channel_begin", channel_begin, "channel_end", channel_end)
    fraction_at = drop_fraction_schedule(drop_fraction, end_step, "cosine")
    # the schedule reaches S_c on the last removal step of the window
    last = channel_begin + (channel_end - channel_begin) // channel_every * channel_every
    channel_target = polynomial_sparsity(channel_sparsity, channel_begin, last, channel_every)
    dst_gate = update_gate(update_every, 0, end_step, include_begin=False)
    channel_gate = update_gate(channel_every, channel_begin, channel_end, include_begin=False)

    def budget(params):
        sparsities = leaf_sparsities(sparsity, params)
        for name in layers:
            s = _get(sparsities, name)
            if not isinstance(s, dict) or s.get("kernel") is None:
                raise ValueError(
                    f"chase: layer '{name}' needs a sparse 'kernel' leaf in `sparsity`."
                )
        target = sum(
            keep_count(s, p.size)
            for s, p in zip(
                jax.tree.leaves(sparsities),
                jax.tree.leaves(map_live(lambda s, p: p, sparsities, params)),
            )
        )
        return sparsities, target

    def with_chain(masks, channels, params):
        """Kernel masks restricted to live channels, chain biases masked by their channels."""
        allowed = _allowed(channels, layers, params)
        for i, name in enumerate(layers):
            layer = _get(masks, name)
            masks = _set(masks, name, "kernel", layer["kernel"] & allowed[name])
            if i < len(channels) and "bias" in _get(params, name):
                masks = _set(masks, name, "bias", channels[i])
        return masks, allowed

    def init(params, key):
        sparsities, _ = budget(params)
        masks = random_masks(key, params, sparsities)
        channels = tuple(jnp.ones(_get(params, n)["kernel"].shape[-1], bool) for n in layers[:-1])
        masks, _ = with_chain(masks, channels, params)
        return masks, ChaseState(channels)

    def remove_channels(ctx: MaskContext, channels):
        kernels = [_get(ctx.params, n)["kernel"] for n in layers[:-1]]
        kmasks = [_get(ctx.masks, n)["kernel"] for n in layers[:-1]]
        scores = [
            jnp.where(c, _channel_scores(w, m, score), -jnp.inf)
            for w, m, c in zip(kernels, kmasks, channels)
        ]
        floors = [int(w.shape[-1] * (1 - channel_sparsity) * min_ratio) for w in kernels]
        protected = [topk_mask(s, f) & c for s, f, c in zip(scores, floors, channels)]
        baseline = sum(w.shape[-1] for w in kernels)
        keep = jnp.ceil(baseline * (1.0 - channel_target(ctx.step))).astype(jnp.int32)
        ranked = [jnp.where(p, jnp.inf, s) for p, s in zip(protected, scores)]
        kept = global_topk_masks(list(ranked), keep)
        return tuple((k & c) | p for k, c, p in zip(kept, channels, protected))

    def update(ctx: MaskContext):
        sparsities, target = budget(ctx.params)
        channels = ctx.extra.channels
        channels = tuple(
            jnp.where(channel_gate(ctx.step), new, old)
            for new, old in zip(remove_channels(ctx, channels), channels)
        )
        masks, allowed = with_chain(ctx.masks, channels, ctx.params)
        fraction = jnp.where(dst_gate(ctx.step), fraction_at(ctx.step), 0.0)
        # global drop-and-grow over the sparse kernels, back up to the target count
        live = map_live(lambda s, m: m, sparsities, masks)
        grads = map_live(lambda m, g: g, live, ctx.grads)
        params = map_live(lambda m, p: p, live, ctx.params)
        ok = map_live(lambda m: jnp.ones(m.shape, bool), live)
        for name in layers:
            ok = _set(ok, name, "kernel", allowed[name])
        n_active = sum(jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(live))
        n_keep = n_active - jnp.floor(n_active.astype(jnp.float32) * fraction).astype(jnp.int32)
        drop = map_live(
            lambda m, p: jnp.where(m, jnp.abs(p).astype(jnp.float32), -jnp.inf), live, params
        )
        kept = global_topk_masks(drop, n_keep)
        kept = map_live(lambda m, k: k & m, live, kept)
        cand = map_live(
            lambda k, o, g: jnp.where(o & ~k, jnp.abs(g).astype(jnp.float32), -jnp.inf),
            kept,
            ok,
            grads,
        )
        grown = global_topk_masks(cand, target - n_keep)
        new = map_live(lambda k, g, o: k | (g & o & ~k), kept, grown, ok)
        out = jax.tree.map(lambda n, m: m if n is None else n, new, masks, is_leaf=is_none)
        return out, ChaseState(channels)

    return MaskAlgorithm(
        init=init,
        update=update,
        is_update=lambda step: dst_gate(step) | channel_gate(step),
        grows=True,
        skip_step_on_update=bool(skip_step_on_update),
    )


def chase_compact(params: PyTree, channels: Sequence[Array], layers: Sequence[str]) -> PyTree:
    """Drops removed channels physically: smaller kernels and biases computing the same function.

    Args:
      params: trained params (weights outside the masks are zero).
      channels: ``state.extra.channels`` of :func:`chase` (concrete bool vectors).
      layers: the chain given to :func:`chase`.

    Returns:
      ``params`` with, for each layer but the last, only the live output columns (and bias entries) kept, and the
      matching input rows of the next kernel. Runs eagerly (the new shapes depend on the values).

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((3, 1))}}
      >>> small = chase_compact(p, [jnp.array([True, False, True])], ["a", "b"])
      >>> small["a"]["kernel"].shape, small["b"]["kernel"].shape
      ((2, 2), (2, 1))
    """
    if len(channels) != len(layers) - 1:
        raise ValueError(
            f"`channels` must have one vector per layer but the last ({len(layers) - 1}); got {len(channels)}."
        )
    out = params
    for i, c in enumerate(channels):
        idx = jnp.asarray(np.flatnonzero(np.asarray(c)))
        layer = _get(out, layers[i])
        out = _set(out, layers[i], "kernel", jnp.take(layer["kernel"], idx, axis=-1))
        if "bias" in layer:
            out = _set(out, layers[i], "bias", jnp.take(layer["bias"], idx, axis=-1))
        nxt = _get(out, layers[i + 1])["kernel"]
        out = _set(out, layers[i + 1], "kernel", jnp.take(nxt, idx, axis=nxt.ndim - 2))
    return out
