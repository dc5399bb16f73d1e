"""SRigL (Lasby et al. 2024, "Dynamic Sparse Training with Structured Sparsity"): RigL with constant fan-in
and neuron ablation, plus the compact gather format a constant fan-in layer converts to.

Neurons are the **columns** (last axis) of a Flax kernel; a neuron's fan-in is the rest of the leaf, viewed as the
rows of ``(prod(shape[:-1]), shape[-1])`` (the im2col layout of an ``HWIO`` conv kernel). A leaf of ``N`` weights at
sparsity ``s`` has the budget ``n_target = keep_count(s, N)``; with ``n_active`` live neurons every live neuron keeps
exactly ``k = n_target // n_active`` weights (``k * n_active <= n_target``).

Checked against the authors' code (``calgaryml/condensed-sparsity``: ``rigl_constant_fan.py``,
``utils/rigl_utils.py``, ``configs/config.yaml``), per update and per sparse leaf:

1. ``n_prune = floor(n_ones * f(t))`` with RigL's cosine drop fraction (0.3, ending at 75% of training),
   ``n_keep = n_ones - n_prune``.
2. Neuron ablation (``ablation = gamma > 0``; the authors' default ``min_salient_weights_per_neuron = 0.3`` with
   ``use_sparse_const_fan_in_for_ablation = True``): the salient set is the layer-wide top-``n_keep`` ``|w|`` union
   the top-``n_prune`` ``|dL/dw|``; a neuron with fewer than ``max(1, int(gamma * k0))`` salient weights is ablated,
   ``k0 = n_target // n_out`` being the fan-in with no neuron ablated. The threshold is lowered to the salient
   count of the ``(min_neurons + 1)``-th most salient neuron when needed, so at least ``min_neurons + 1``
   neurons stay live, ``min_neurons = n_target // fan_in`` (hence ``k <= fan_in``). The last layer is never
   ablated (here: the last sparse leaf in natural path order unless ``no_ablation`` names others). Ablation is
   recomputed at every update, so a neuron may come back.
3. Drop: keep the layer-wide top-``n_keep`` ``|w|`` outside ablated neurons, then truncate each neuron to its top
   ``k``.
4. Grow: fill every live neuron up to exactly ``k`` with the largest ``|dL/dw|`` among its positions not kept;
   grown weights start at 0 with zeroed optimizer moments (the shared wrapper), no optimizer step on update steps.

Deviations from the authors' code: the initial mask is uniformly random with constant fan-in (their default
``grad_flow_init`` also rescales the initial weights — do that in the model's initialiser if wanted); the budget
is ``keep_count(s, N)`` (the library's one count rule) rather than ``int(N * (1 - s))``; inactive weights rank below
every active one in the magnitude saliency (the authors rank them as ``|w| = 0``).

A constant fan-in layer converts to :class:`ConstantFanIn` (values and row indices ``(k, n_live)``, the live
columns), multiplied by :func:`fan_in_matmul`: one gather of ``x`` and a batched dot — ``k / fan_in`` of the dense
FLOPs and bytes of weight, with ablated neurons skipped entirely. This is an N:M layout with a single group
spanning the whole fan-in; the Pallas N:M kernel (``pallas_kernels.nm``) needs groups of at most 16 along the
contraction axis and does not take it, so ``fan_in_matmul`` runs on XLA's gather + dot (no Pallas kernel here).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from jaxsparse import _validation as v
from jaxsparse._tree import is_none, map_live, natural_key, path_name
from jaxsparse.allocation import Budget, keep_count
from jaxsparse.masks import random_scores, topk_mask
from jaxsparse.oneshot import leaf_sparsities
from jaxsparse.schedules import drop_fraction_schedule, update_gate
from jaxsparse.transforms._factory import sparse_transform
from jaxsparse.transforms.common import MaskAlgorithm, MaskContext
from jaxsparse.transforms.growth import drop_scores

__all__ = ["SRigLState", "srigl", "ConstantFanIn", "constant_fan_in", "fan_in_matmul"]

END_FRACTION = 0.75


class SRigLState(NamedTuple):
    """SRigL's own state: per sparse leaf, the ``(n_out,)`` bool vector of ablated neurons (``None`` if dense)."""

    ablated: PyTree


# per-column top-k with a per-column (traced) k: score (F, n), ks (n,)
_column_topk = jax.vmap(topk_mask, in_axes=(1, 0), out_axes=1)


def _columns(x: Array) -> Array:
    return x.reshape(-1, x.shape[-1])


def _leaf_update(
    mask: Array,
    drop: Array,
    grad: Array,
    fraction: Array,
    n_target: int,
    gamma: float,
    ablate: bool,
) -> tuple[Array, Array]:
    """One SRigL update of one leaf; returns ``(new_mask, ablated)`` (see the module notes for the rule)."""
    shape = mask.shape
    m, drop, g = _columns(mask), _columns(drop), _columns(jnp.abs(grad).astype(jnp.float32))
    fan_in, n_out = m.shape
    n_ones = jnp.sum(m, dtype=jnp.int32)
    n_prune = jnp.floor(n_ones.astype(jnp.float32) * fraction).astype(jnp.int32)
    n_keep = n_ones - n_prune
    min_neurons = n_target // fan_in
    if ablate and gamma > 0 and min_neurons < n_out:
        salient = topk_mask(drop, n_keep) | topk_mask(g, n_prune)
        counts = jnp.sum(salient, axis=0, dtype=jnp.int32)
        threshold = max(1, int(gamma * (n_target // n_out)))
        floor = -jnp.sort(-counts)[min_neurons]  # salient count of the (min_neurons + 1)-th neuron
        ablated = counts < jnp.minimum(threshold, floor)
    else:
        ablated = jnp.zeros((n_out,), bool)
    n_live = n_out - jnp.sum(ablated, dtype=jnp.int32)
    k = jnp.minimum(n_target // n_live, fan_in)
    drop = jnp.where(ablated[None], -jnp.inf, drop)
    kept = topk_mask(drop, n_keep) & m & ~ablated[None]
    kept = _column_topk(jnp.where(kept, drop, -jnp.inf), jnp.full((n_out,), k)) & kept
    need = jnp.where(ablated, 0, k - jnp.sum(kept, axis=0, dtype=jnp.int32))
    grown = _column_topk(jnp.where(kept, -jnp.inf, g), need)
    return (kept | grown).reshape(shape), ablated


def _no_ablation_flags(masks: PyTree, names: Sequence[str] | None) -> PyTree:
    """Per sparse leaf: True where neurons may be ablated."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_none)
    live = [path_name(p) for p, m in flat if m is not None]
    if names is None:
        frozen = {max(live, key=natural_key)} if live else set()
    else:
        unknown = sorted(set(names) - set(live))
        if unknown:
            raise ValueError(
                f"`no_ablation` names {unknown}, which are not sparse leaves; sparse leaves are {live}."
            )
        frozen = set(names)
    return jax.tree.unflatten(
        treedef, [None if m is None else path_name(p) not in frozen for p, m in flat]
    )


@sparse_transform
def srigl(
    sparsity: float | Budget | PyTree,
    *,
    total_steps: int | None = None,
    end_step: int | None = None,
    update_every: int = 100,
    drop_fraction: float = 0.3,
    begin_step: int = 0,
    ablation: float = 0.3,
    no_ablation: Sequence[str] | None = None,
    drop_noise: float = 1e-5,
    skip_step_on_update: bool = True,
) -> MaskAlgorithm:
    """SRigL: RigL with a constant fan-in per output neuron and dynamic neuron ablation.

    ``srigl(inner, sparsity, ...)`` wraps any optax optimizer ``inner`` (``seed=`` seeds the initial masks);
    ``srigl.rule(sparsity, ...)`` is the bare :class:`~jaxsparse.MaskAlgorithm`. The rule is described in the
    module notes; the defaults are the authors' (``update_every=100``, ``drop_fraction=0.3`` cosine-decayed to 0
    at ``end_step`` = 75% of ``total_steps``, ``ablation=0.3``). ``ablation=0`` turns neuron ablation off: then it
    is RigL restricted to masks with exactly ``n_target // n_out`` weights in every column.

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      sparsity: a float (uniform over the default prunable leaves), a :func:`jaxsparse.budget` (e.g. ERK) or a
        per-leaf pytree (``None`` = dense). Every sparse leaf needs ``ndim >= 2`` and at least one weight per
        column.
      total_steps: training length; mask updates stop at ``0.75 * total_steps`` unless ``end_step`` is given.
      end_step: last step that may update masks.
      update_every: steps between mask updates (first update at ``begin_step + update_every``).
      drop_fraction: initial fraction of each leaf's active weights dropped and regrown (cosine-decayed).
      begin_step: first step of the update window.
      ablation: ``gamma``: a neuron with fewer than ``max(1, int(gamma * k0))`` salient weights is ablated;
        0 disables ablation.
      no_ablation: path names (``"Dense_3/kernel"``) of leaves whose neurons are never ablated; default: the last
        sparse leaf in natural path order (the output layer).
      drop_noise: std of the Gaussian tie-breaking noise on drop scores (RigL's ``1e-5``).
      skip_step_on_update: no optimizer step on update steps (RigL's behaviour).
      seed: seeds the PRNG key kept in the state (an int; may be traced under ``vmap``).

    Returns:
      The optax transformation (``srigl.rule``: the :class:`~jaxsparse.MaskAlgorithm`); its state's ``extra`` is
      a :class:`SRigLState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxsparse
      >>> params = {"Dense_0": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (16, 8))},
      ...           "Dense_1": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (8, 4))}}
      >>> tx = srigl(optax.sgd(0.1), 0.75, total_steps=40, update_every=4)
      >>> state, step = tx.init(params), jax.jit(tx.update)
      >>> for t in range(12):
      ...     grads = jax.tree.map(lambda p: jnp.cos(p + t), params)
      ...     updates, state = step(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> fan_in = state.masks["Dense_0"]["kernel"].sum(0)
      >>> live = ~state.extra.ablated["Dense_0"]["kernel"]
      >>> bool((fan_in[live] == 32 // int(live.sum())).all()), state.masks["Dense_1"]["kernel"].sum(0).tolist()
      (True, [2, 2, 2, 2])
    """
    if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        v.check_sparsity("sparsity", sparsity)
    v.check_int("update_every", update_every, 1)
    v.check_int("begin_step", begin_step, 0)
    if end_step is None:
        if total_steps is None:
            raise ValueError(
                "srigl needs `total_steps` (updates stop at 75% of it) or `end_step`; got neither."
            )
        v.check_int("total_steps", total_steps, 1)
        end_step = int(END_FRACTION * total_steps)
    v.check_int("end_step", end_step, 0)
    v.check_schedule_window("begin_step", begin_step, "end_step", end_step)
    if isinstance(ablation, bool) or not isinstance(ablation, (int, float)):
        raise TypeError(f"`ablation` must be a float in [0, 1]; got {ablation!r}.")
    gamma = v.check_fraction("ablation", ablation)
    if isinstance(drop_noise, bool) or not isinstance(drop_noise, (int, float)) or drop_noise < 0:
        raise ValueError(f"`drop_noise` must be a float >= 0; got {drop_noise!r}.")
    if no_ablation is not None and (
        isinstance(no_ablation, str) or not all(isinstance(n, str) for n in no_ablation)
    ):
        raise TypeError(f"`no_ablation` must be a sequence of path names; got {no_ablation!r}.")
    schedule = drop_fraction_schedule(drop_fraction, end_step, "cosine")
    first = begin_step + update_every
    gate = (
        update_gate(update_every, first, end_step)
        if first <= end_step
        else lambda step: jnp.zeros((), bool)
    )

    def targets(params):
        sparsities = leaf_sparsities(sparsity, params)
        flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
        flat_s = jax.tree.flatten(sparsities, is_leaf=is_none)[0]
        out = []
        for (path, p), s in zip(flat_p, flat_s):
            if s is None:
                out.append(None)
                continue
            if p.ndim < 2:
                raise ValueError(
                    f"srigl: sparse leaf '{path_name(path)}' has shape {tuple(p.shape)}; constant fan-in needs "
                    "ndim >= 2 (mark it dense in `sparsity`)."
                )
            n_target = keep_count(s, p.size)
            if n_target // p.shape[-1] < 1:
                raise ValueError(
                    f"srigl: sparsity {float(s)!r} leaves leaf '{path_name(path)}' (shape {tuple(p.shape)}) fewer "
                    f"weights ({n_target}) than neurons ({p.shape[-1]}); lower the sparsity."
                )
            out.append(n_target)
        return jax.tree.unflatten(jax.tree.structure(sparsities, is_leaf=is_none), out)

    def init(params, key):
        n_targets = targets(params)
        scores = random_scores(key, params)

        def leaf(n_target, p, u):
            if n_target is None:
                return None
            n_out = p.shape[-1]
            k0 = jnp.full((n_out,), n_target // n_out, jnp.int32)
            return _column_topk(_columns(u), k0).reshape(p.shape)

        masks = jax.tree.map(leaf, n_targets, params, scores, is_leaf=is_none)
        ablated = map_live(lambda m: jnp.zeros(m.shape[-1:], bool), masks)
        _no_ablation_flags(masks, no_ablation)  # validates the names eagerly
        return masks, SRigLState(ablated)

    def update(ctx: MaskContext):
        n_targets = targets(ctx.params)
        flags = _no_ablation_flags(ctx.masks, no_ablation)
        k_drop, _ = jax.random.split(ctx.key)
        drops = drop_scores(ctx.params, ctx.masks, k_drop, drop_noise)
        fraction = schedule(ctx.step)
        pairs = map_live(
            lambda m, d, g, n, a: _leaf_update(m, d, g, fraction, n, gamma, a),
            ctx.masks,
            drops,
            ctx.grads,
            n_targets,
            flags,
        )
        is_pair = lambda x: x is None or isinstance(x, tuple)
        masks = jax.tree.map(lambda x: None if x is None else x[0], pairs, is_leaf=is_pair)
        ablated = jax.tree.map(lambda x: None if x is None else x[1], pairs, is_leaf=is_pair)
        return masks, SRigLState(ablated)

    return MaskAlgorithm(
        init=init,
        update=update,
        is_update=gate,
        grows=True,
        skip_step_on_update=bool(skip_step_on_update),
    )


# ------------------------------------------------------------------------------------------------ compact format
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ConstantFanIn:
    """A constant fan-in kernel ``(..., n_out)`` in gather form.

    ``values[j, c]`` is the ``j``-th kept weight of live neuron ``columns[c]``, at row ``rows[j, c]`` of the
    ``(fan_in, n_out)`` view; ablated (all-zero) neurons are not stored. ``shape`` is the dense kernel's shape.
    """

    values: Float[Array, "k c"]
    rows: Int[Array, "k c"]
    columns: Int[Array, " c"]
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    def todense(self) -> Array:
        """The masked dense kernel (exact round trip of :func:`constant_fan_in`)."""
        fan_in, n_out = math.prod(self.shape[:-1]), self.shape[-1]
        dense = jnp.zeros((fan_in, n_out), self.values.dtype)
        dense = dense.at[self.rows, jnp.broadcast_to(self.columns, self.rows.shape)].set(
            self.values
        )
        return dense.reshape(self.shape)


def constant_fan_in(
    kernel: Float[ArrayLike, "*fan n_out"], mask: Bool[ArrayLike, "*fan n_out"]
) -> ConstantFanIn:
    """Converts a masked kernel whose live columns all keep the same number of weights to :class:`ConstantFanIn`.

    Runs eagerly (the fan-in ``k`` and the number of live neurons set the shapes). Columns with no kept weight are
    ablated neurons and are dropped.

    Args:
      kernel: the dense kernel ``(..., n_out)`` (Flax layout; fan-in = all axes but the last).
      mask: its bool mask (e.g. ``state.masks[...]`` of :func:`srigl`).

    Returns:
      The gather form; ``.todense()`` gives back ``kernel * mask`` exactly.

    Raises:
      ValueError: if the live columns keep different counts, or shapes differ.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.arange(12.0).reshape(4, 3)
      >>> m = jnp.array([[1, 0, 0], [1, 0, 1], [0, 0, 1], [0, 0, 0]], bool)
      >>> c = constant_fan_in(w, m)
      >>> c.values.tolist(), c.rows.tolist(), c.columns.tolist()
      ([[0.0, 5.0], [3.0, 8.0]], [[0, 1], [1, 2]], [0, 2])
      >>> bool((c.todense() == jnp.where(m, w, 0)).all())
      True
    """
    w = jnp.asarray(kernel)
    m = np.asarray(mask, bool)
    v.check_float_array("kernel", w)
    if w.shape != m.shape or w.ndim < 2:
        raise ValueError(
            f"`kernel` and `mask` must have one shape with ndim >= 2; got {w.shape} and {m.shape}."
        )
    cols_mask = m.reshape(-1, m.shape[-1])
    counts = cols_mask.sum(0)
    columns = np.flatnonzero(counts)
    if len(set(counts[columns].tolist())) > 1:
        raise ValueError(
            f"`mask` does not have a constant fan-in: live columns keep {sorted(set(counts[columns].tolist()))} "
            "weights."
        )
    k = int(counts[columns[0]]) if len(columns) else 0
    # rows of the kept entries of each live column, in increasing row order
    order = np.argsort(~cols_mask[:, columns], axis=0, kind="stable")[:k]
    rows = jnp.asarray(order, jnp.int32)
    values = _columns(w)[rows, jnp.asarray(columns)[None]]
    return ConstantFanIn(values, rows, jnp.asarray(columns, jnp.int32), tuple(w.shape))


def fan_in_matmul(
    x: Float[Array, "*batch fan_in"], weight: ConstantFanIn
) -> Float[Array, "*batch n_out"]:
    """``x @ kernel`` for a :class:`ConstantFanIn` kernel: a gather of ``x`` and a batched dot (XLA).

    Ablated neurons output 0 (add the bias outside). Differentiable in ``x`` and ``weight.values``.

    Args:
      x: inputs ``(..., fan_in)`` (flatten conv patches first).
      weight: the gather form from :func:`constant_fan_in`.

    Returns:
      ``(..., n_out)``, equal to ``x @ weight.todense().reshape(fan_in, n_out)``.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.arange(12.0).reshape(4, 3)
      >>> m = jnp.array([[1, 0, 0], [1, 0, 1], [0, 0, 1], [0, 0, 0]], bool)
      >>> fan_in_matmul(jnp.ones((1, 4)), constant_fan_in(w, m)).tolist()
      [[3.0, 0.0, 13.0]]
    """
    fan_in, n_out = math.prod(weight.shape[:-1]), weight.shape[-1]
    if x.shape[-1] != fan_in:
        raise ValueError(f"`x` has last dimension {x.shape[-1]}; the kernel's fan-in is {fan_in}.")
    live = jnp.einsum("...kc,kc->...c", x[..., weight.rows], weight.values)
    out = jnp.zeros(x.shape[:-1] + (n_out,), live.dtype)
    return out.at[..., weight.columns].set(live)
