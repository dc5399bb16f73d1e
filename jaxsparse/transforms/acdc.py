"""AC/DC (Peste et al. 2021): alternating compressed / decompressed training.

Training runs through a static phase table: a dense warm-up, then compressed phases (masks fixed, pruned weights
exactly zero) alternating with decompressed (dense) phases, then a last dense phase and a final compressed phase,
so the trained model ends at the target sparsity. At the start of every compressed phase the masks are recomputed
by **global** magnitude over all sparse leaves (``scope="global"``); at the start of a decompressed phase the mask
is lifted and the pruned weights re-enter at exactly 0.

Checked against the authors' code (``IST-DASLab/ACDC``): the ImageNet ResNet-50 config
(``iht_imagenet_resnet50_insta_cosinelr_s90_ep100.yaml``, 100 epochs: pruner start 10, frequency 10, end 71;
restorer start 15, frequency 10, end 66) gives a dense warm-up of 10%, compressed and decompressed phases of 5% each
until 75%, dense from 75% to 85% and compressed from 85% to the end — the defaults here, as fractions of
``total_steps``. Their run scripts pass ``--reset_momentum_after_recycling``, which zeroes **all** momentum buffers
at the first step of each decompressed phase (``recyclers.py``, ``policies/manager.py``): ``reset_momentum=True``
zeroes every parameter-shaped leaf of the inner optimizer's state on those steps (Adam's ``mu`` and ``nu``, SGD's
trace); counters such as Adam's step count are kept.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, PyTree

from jaxsparse import _validation as v
from jaxsparse._tree import map_live
from jaxsparse.allocation import Budget
from jaxsparse.oneshot import SCOPES, leaf_sparsities, magnitude_masks
from jaxsparse.transforms.common import MaskAlgorithm, MaskContext, sparse_training

__all__ = ["acdc", "acdc_phases"]


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float in [0, 1]; got {value!r}.")
    return v.check_fraction(name, value)


def acdc_phases(
    total_steps: int,
    *,
    warmup: float = 0.1,
    compressed: float = 0.05,
    decompressed: float = 0.05,
    cycles_end: float = 0.75,
    final_compressed: float = 0.15,
) -> tuple[tuple[int, int], ...]:
    """The compressed phases ``((start, stop), ...)`` (half-open step intervals) of AC/DC's schedule.

    Compressed phases of ``compressed * total_steps`` steps start every ``(compressed + decompressed) *
    total_steps`` steps from ``warmup * total_steps`` while before ``cycles_end * total_steps``; the final compressed
    phase covers the last ``final_compressed * total_steps`` steps. All other steps are dense. Lengths are rounded
    to whole steps.

    Args:
      total_steps: training length in steps.
      warmup: dense warm-up, as a fraction of ``total_steps``.
      compressed: length of each compressed phase of the alternating part.
      decompressed: length of each decompressed phase of the alternating part (0: back-to-back compressed phases).
      cycles_end: no alternating compressed phase starts at or after this fraction.
      final_compressed: length of the final compressed phase (at least one step).

    Returns:
      The sorted, disjoint compressed intervals (back-to-back phases merged); the last one ends at
      ``total_steps``.

    Example:
      >>> acdc_phases(100)
      ((10, 15), (20, 25), (30, 35), (40, 45), (50, 55), (60, 65), (70, 75), (85, 100))
    """
    v.check_int("total_steps", total_steps, 1)
    w, c, d, e, f = (
        round(_fraction(n, x) * total_steps)
        for n, x in (
            ("warmup", warmup),
            ("compressed", compressed),
            ("decompressed", decompressed),
            ("cycles_end", cycles_end),
            ("final_compressed", final_compressed),
        )
    )
    f = max(f, 1)
    c = max(c, 1) if compressed > 0 else 0
    final = total_steps - f
    phases = []
    if c > 0:
        t = w
        while t < min(e, final):
            phases.append((t, min(t + c, final)))
            t += c + d
    merged = []
    for a, b in [*phases, (final, total_steps)]:  # back-to-back compressed phases are one phase
        if merged and merged[-1][1] >= a:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return tuple(merged)


class _ResetState(NamedTuple):
    inner: optax.OptState
    count: Array


def _reset_moments_at(
    inner: optax.GradientTransformation | optax.MultiSteps, steps: tuple[int, ...]
) -> optax.GradientTransformationExtraArgs:
    """``inner`` whose parameter-shaped state is zeroed before its update on the given (counted) steps."""
    inner = optax.with_extra_args_support(inner)
    at = np.asarray(steps or (-1,), np.int32)

    def init(params):
        return _ResetState(inner.init(params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra):
        reset = jnp.any(state.count == at)
        inner_state = optax.tree_map_params(
            inner,
            lambda s: jnp.where(reset, jnp.zeros((), s.dtype), s),
            state.inner,
            transform_non_params=lambda x: x,
        )
        updates, inner_state = inner.update(updates, inner_state, params, **extra)
        return updates, _ResetState(inner_state, state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)


def _build(
    sparsity: float | Budget | PyTree,
    total_steps: int,
    *,
    warmup: float = 0.1,
    compressed: float = 0.05,
    decompressed: float = 0.05,
    cycles_end: float = 0.75,
    final_compressed: float = 0.15,
    scope: str = "global",
    reset_momentum: bool = True,
) -> tuple[MaskAlgorithm, tuple[int, ...]]:
    """AC/DC's mask rule and the steps where the inner optimizer's moments are reset (see :func:`acdc`)."""
    if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        v.check_sparsity("sparsity", sparsity)
    v.check_choice("scope", scope, SCOPES)
    phases = acdc_phases(
        total_steps,
        warmup=warmup,
        compressed=compressed,
        decompressed=decompressed,
        cycles_end=cycles_end,
        final_compressed=final_compressed,
    )
    starts = np.asarray([a for a, _ in phases], np.int32)
    stops = np.asarray(
        [b for _, b in phases if b < total_steps and b not in starts] or [-1], np.int32
    )

    def ones(params):
        return map_live(
            lambda s, p: jnp.ones(p.shape, bool), leaf_sparsities(sparsity, params), params
        )

    def init(params, key):
        return ones(params), ()

    def update(ctx: MaskContext):
        compress = jnp.any(ctx.step == starts)
        pruned = magnitude_masks(ctx.params, sparsity, scope)
        masks = map_live(lambda m, d: m | ~compress, pruned, ones(ctx.params))
        return masks, ctx.extra

    def is_update(step):
        step = jnp.asarray(step, jnp.int32)
        return jnp.any(step == starts) | jnp.any(step == stops)

    algo = MaskAlgorithm(init=init, update=update, is_update=is_update, grows=True)
    resets = tuple(int(s) for s in stops if s >= 0) if reset_momentum else ()
    return algo, resets


def acdc(
    inner: optax.GradientTransformation | optax.MultiSteps,
    /,
    *args: Any,
    seed: int = 0,
    packed_masks: bool = False,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """AC/DC around any optax optimizer: dense warm-up, alternating compressed/decompressed phases, compressed end.

    The phase table is :func:`acdc_phases` (the authors' ImageNet schedule by default, in fractions of
    ``total_steps``). Masks are recomputed by magnitude (``scope="global"``, the paper's rule; ``"layer"`` keeps
    each leaf's budget) on the first step of every compressed phase — in the same step, the pruned weights are set to
    exactly 0 — and lifted on the first step of every decompressed phase, where the pruned weights re-enter at 0.
    With ``reset_momentum`` (default, as the authors' runs) the inner optimizer's moments are zeroed on those
    decompression steps; the moments of re-entering weights are zeroed in any case. ``decompressed=0`` and
    ``cycles_end=1`` give one-shot magnitude pruning at the end of the warm-up followed by sparse retraining.
    ``acdc.rule(sparsity, total_steps, ...)`` is the bare :class:`~jaxsparse.MaskAlgorithm` (without the
    momentum reset, which lives in the wrapped optimizer).

    Args:
      inner: the optax optimizer to wrap.
      sparsity: a float, a :func:`jaxsparse.budget` or a per-leaf pytree (``None`` = dense).
      total_steps: training length in steps (sets the phase table).
      warmup, compressed, decompressed, cycles_end, final_compressed: the phase table, see :func:`acdc_phases`.
      scope: ``"global"`` (one magnitude threshold over all sparse leaves) or ``"layer"``.
      reset_momentum: zero the inner optimizer's moments at the start of each decompressed phase.
      seed: unused by the rule (kept for the shared signature).
      packed_masks: store the masks 1 bit per weight instead of 1 byte (bit-identical training; read them
        with :func:`jaxsparse.state_masks`; see :func:`jaxsparse.sparse_training`).

    Returns:
      The optax transformation (``update`` needs ``params``).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jax.random.normal(jax.random.PRNGKey(0), (10, 10))}
      >>> tx = acdc(optax.sgd(0.1, momentum=0.9), 0.9, total_steps=20)
      >>> state, step, nnz = tx.init(params), jax.jit(tx.update), []
      >>> for t in range(20):
      ...     updates, state = step(jax.tree.map(jnp.cos, params), state, params)
      ...     params = optax.apply_updates(params, updates)
      ...     nnz.append(int((params["w"] != 0).sum()))
      >>> nnz[:6], nnz[-4:]  # dense warm-up, then compressed (10) and decompressed (100) phases; ends compressed
      ([100, 100, 10, 100, 10, 100], [100, 10, 10, 10])
    """
    algo, resets = _build(*args, **kwargs)
    if resets:
        inner = _reset_moments_at(inner, resets)
    return sparse_training(inner, algo, seed=seed, packed_masks=packed_masks)


def _bare_rule(*args: Any, **kwargs: Any) -> MaskAlgorithm:
    return _build(*args, **kwargs)[0]


_sig = inspect.signature(_build)
acdc.__signature__ = _sig.replace(
    parameters=[
        inspect.Parameter("inner", inspect.Parameter.POSITIONAL_ONLY),
        *_sig.parameters.values(),
        inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0),
        inspect.Parameter(
            "packed_masks", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool
        ),
    ],
    return_annotation=optax.GradientTransformationExtraArgs,
)
_bare_rule.__signature__ = _sig.replace(return_annotation=MaskAlgorithm)
_bare_rule.__doc__, _bare_rule.__name__, _bare_rule.__qualname__ = acdc.__doc__, "acdc", "acdc"
acdc.rule = _bare_rule
