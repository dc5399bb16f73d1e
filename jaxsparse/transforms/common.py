"""The one optax wrapper every sparse-training algorithm shares.

:func:`sparse_training` wraps any optax optimizer and a :class:`MaskAlgorithm` (how masks start, when they change
and the rule that changes them) and returns an optax ``GradientTransformationExtraArgs`` whose updates keep every
pruned parameter exactly zero after ``optax.apply_updates``:

* gradients are masked before the inner optimizer sees them;
* updates are ``inner_update`` on kept weights and ``-param`` on pruned ones, so weight decay, momentum and
  Adam's moments cannot move a pruned weight (``p + (-p) == 0`` exactly in floating point);
* on mask-update steps (a traced gate, ``lax.cond``) the algorithm's rule runs on the current params and the
  *dense* gradient — pruned weights are zero, so ``jax.grad`` at them is already the dense gradient;
* newly grown connections have their optimizer moments zeroed in any optax state (``optax.tree_map_params``);
* with ``skip_step_on_update`` (RigL), the weights take no optimizer step on update steps (the update is discarded
  by an elementwise select; no branch around the inner optimizer). The optimizer's statistics still absorb that
  step's masked gradient (newly grown weights get none, so their moments stay exactly zero): selecting the whole
  optimizer state back would cost a copy of it on every step, for a difference on one step in ``update_every``.

The whole step, update steps included, is one compiled function.

**Composition contract.** The sparse transform produces the *final* updates: nothing may transform its output.
Gradient processing (clipping, learning-rate scaling, schedules, weight decay, ``optax.chain(...)``) goes
*inside*, as ``inner``. Before it is allowed (``optax.chain(optax.clip_by_global_norm(1.0), sparse(...))``: the
clipping sees dense gradients). Around it, only wrappers that pass whole updates through or zero them:
``optax.MultiSteps(sparse(...), k)`` (the sparse schedules then count optimizer steps, one per ``k`` micro-batches)
and ``optax.apply_if_finite(sparse(...), n)`` (a skipped step does not advance the sparse step counter).
``optax.inject_hyperparams`` may build either the inner optimizer or the sparse transform itself (a traced
``sparsity``). The wrong order is loud: on the second step, on each mask-update step and the step after it, and every
``LEAK_CHECK_EVERY`` (100) steps, ``update`` checks that the weights outside the masks are exactly zero and
otherwise fails the step with an error naming this contract (a ``RuntimeError`` raised in a ``jax.pure_callback``
when the step runs; JAX re-raises it with the message, a ``ValueError`` on CPU with jax 0.10-0.12, from the call or
from the first read of its results) — e.g. ``optax.chain(sparse(...), optax.scale_by_learning_rate(...))`` or
``optax.chain(sparse(...), optax.add_decayed_weights(...))``, or weights changed outside the optimizer.

**Non-finite gradients.** On a step whose gradient has a NaN or an infinity, the masks and the algorithm's state
(e.g. SNFS's gradient EMA) are left unchanged (a mask rule that ran on such a step has its result dropped); the
step counter still advances. The inner
optimizer sees the (masked) gradient as usual: wrap it in ``optax.apply_if_finite`` (either inside or around the
sparse transform) to skip such steps. A weight that is already ``inf``/``NaN`` cannot be zeroed by an additive
update (``p + (-p)`` is NaN); it is reported by the check above when it lies outside the masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import Array, PyTree

from jaxsparse._bitmask import (
    PackedMask,
    is_mask_leaf,
    is_packed,
    is_packed_tree,
    pack,
    pack_tree,
    parts_for,
    place_packed_like,
    unpack_tree,
)
from jaxsparse._groups import alike_slots, stack_alike
from jaxsparse._tree import check_same_structure, is_none, map_live, map_masked, structure, unwrap
from jaxsparse.sharding import commit_like, place_like

__all__ = [
    "AlgorithmState",
    "MaskAlgorithm",
    "MaskContext",
    "SparseState",
    "sparse_training",
    "state_masks",
]

AlgorithmState = PyTree
"""The algorithm's own state (``MaskContext.extra``, ``SparseState.extra``): a NamedTuple per algorithm
(e.g. :class:`~jaxsparse.transforms.srigl.SRigLState`, :class:`~jaxsparse.transforms.dst.SNFSState`), ``()``
when it keeps none."""


class MaskContext(NamedTuple):
    """What a mask rule sees on an update step."""

    masks: PyTree  # current masks (bool arrays; None for dense leaves)
    params: PyTree  # current params (pruned entries exactly zero)
    grads: PyTree  # dense gradient of this step
    step: Array  # int32 step index of this update
    key: Array  # PRNG key for this step (fold_in of the state's key and the step)
    extra: AlgorithmState  # the algorithm's own state


class MaskAlgorithm(NamedTuple):
    """How an algorithm's masks start and change; everything else is shared by :func:`sparse_training`.

    Attributes:
      init: ``(params, key) -> (masks, extra)``: initial masks (``None`` for dense leaves) and algorithm state.
      update: ``MaskContext -> (masks, extra)``: the mask rule, run under ``lax.cond`` on update steps only.
      is_update: ``step -> bool``: the traced gate deciding update steps.
      observe: optional ``(MaskContext) -> extra``, run on every step (e.g. an EMA of dense gradients).
      grows: whether the rule can turn pruned weights back on (then their optimizer moments are zeroed).
      skip_step_on_update: no weight update on update steps (RigL's behaviour; see the module notes).
    """

    init: Callable[[PyTree, Array], tuple[PyTree, AlgorithmState]]
    update: Callable[[MaskContext], tuple[PyTree, AlgorithmState]]
    is_update: Callable[[Array], Array]
    observe: Callable[[MaskContext], AlgorithmState] | None = None
    grows: bool = False
    skip_step_on_update: bool = False


class SparseState(NamedTuple):
    """State of :func:`sparse_training`: the inner optimizer's state, masks, step counter, PRNG key, extras.

    ``masks`` holds bool arrays (``None`` for dense leaves), or with ``packed_masks=True`` their 1-bit packed
    form; :func:`state_masks` returns the bool masks either way. ``mask_slots`` holds one int32 scalar per mask
    array (tree order): its position among the masks of its shape and dtype (and packing), set by ``init`` and
    never changed (the compiled step reads each leaf's new mask at that position, so that its code does not grow
    per leaf).
    """

    inner_state: optax.OptState
    masks: PyTree
    step: Array
    key: Array
    extra: AlgorithmState = ()
    mask_slots: tuple[Array, ...] = ()


def _as_transformation(
    inner: optax.GradientTransformation | optax.MultiSteps,
) -> optax.GradientTransformationExtraArgs:
    if isinstance(inner, optax.MultiSteps):
        inner = inner.gradient_transformation()
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            f"`inner` must be an optax GradientTransformation or optax.MultiSteps; got {type(inner).__name__}."
        )
    return optax.with_extra_args_support(inner)


def _check_params(params: PyTree) -> None:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("`params` is an empty pytree; expected at least one array leaf.")


def _zero_moments(
    inner: optax.GradientTransformation, state: optax.OptState, grown: PyTree, params: PyTree
) -> optax.OptState:
    """Zeroes every param-shaped leaf of ``state`` where ``grown`` is True (any optax optimizer)."""
    full = jax.tree.map(
        lambda g, p: jnp.zeros((), bool) if g is None else g, grown, params, is_leaf=is_none
    )

    def zero(s, g):
        if jnp.ndim(g) and jnp.shape(s) != jnp.shape(g):
            return s  # factored statistics (e.g. Adafactor's row/column moments) cannot be zeroed per entry
        return jnp.where(g, jnp.zeros((), s.dtype), s)

    return optax.tree_map_params(inner, zero, state, full, transform_non_params=lambda x: x)


def _all_finite(grads: PyTree) -> Array:
    """One bool: every floating-point gradient entry is finite (one reduction per group of alike leaves)."""
    leaves = [g for g in jax.tree.leaves(grads) if jnp.issubdtype(jnp.result_type(g), jnp.inexact)]
    checks = [jnp.all(jnp.isfinite(s)) for s in stack_alike(leaves)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.ones((), bool)


def _select(pred: Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    return map_live(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


_CONTRACT = (
    "The sparse transform must produce the final updates: put every other transformation inside it as "
    "`inner` (e.g. rigl(optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3)), ...)), or before it "
    "in optax.chain; only optax.MultiSteps and optax.apply_if_finite may wrap it. Other causes: the weights "
    "were changed outside the optimizer without jaxsparse.apply_masks(params, state.masks), or a pruned weight "
    "is inf/NaN (p + (-p) is NaN)."
)


# steps between checks that the weights outside the masks are still exactly zero
LEAK_CHECK_EVERY = 100
# the name scope of the algorithm's mask rule inside the compiled step
MASK_RULE_SCOPE = "jaxsparse_mask_rule"


def _raise_leak(count: Any, step: Any) -> np.ndarray:
    count, step = np.asarray(count), np.asarray(step)
    bad = (count > 0) & (step > 0)  # re-checked here: under vmap both branches of the cond run
    if bad.any():
        count, step = count[bad].max(), step[bad].max()
        raise RuntimeError(
            f"jaxsparse.sparse_training: {int(count)} weight(s) outside the masks are not exactly zero at step "
            f"{int(step)}, so sparsity is being lost silently. {_CONTRACT}"
        )
    return np.zeros(np.shape(count), np.int32)


def _count_pruned_nonzero(masks: PyTree, params: PyTree) -> Array:
    """How many weights outside the masks are not exactly zero (int32)."""
    ms = jax.tree.leaves(masks)
    ps = jax.tree.leaves(map_live(lambda m, p: p, masks, params))
    counts = [
        jnp.sum(~m & (p != 0), dtype=jnp.int32)
        for m, p in zip(stack_alike(ms, ps), stack_alike(ps))
    ]
    return sum(counts[1:], counts[0]) if counts else jnp.zeros((), jnp.int32)


def _leak_check_step(step: Array, is_update: Callable[[Array], Array]) -> Array:
    """Whether ``step`` counts the weights outside the masks: step 1, the step after each mask update (a transform
    chained after the wrapper shows there) and every ``LEAK_CHECK_EVERY`` steps (mask-update steps count too).
    The full read of params and masks costs a large part of a dense step on small models, so ordinary steps
    skip it."""
    return (step == 1) | is_update(step - 1) | (step % LEAK_CHECK_EVERY == 0)


def _raise_if_pruned_nonzero(count: Array, step: Array) -> Array:
    """From step 1 on, weights outside the masks are exactly zero unless the updates were changed after us.

    Returns an int32 zero that the step's updates must depend on. The error is raised by a ``jax.pure_callback``
    (an effect-free host callback, run only in the branch taken when weights leaked): a program with a
    side-effecting callback (``jax.debug.callback``, even in a branch that never runs) is dispatched by JAX's
    Python path instead of its C++ fast path, which on a model of many small kernels costs more than all the
    masking; a pure callback keeps the fast path, and its result, used by the updates, keeps it in the program.
    On CPU a program holding a host callback still runs synchronously (the call returns once the step has run;
    ``benchmarks/check_overhead.py`` measures both).
    """
    return lax.cond(
        (step > 0) & (count > 0),
        lambda c, t: jax.pure_callback(
            _raise_leak, jax.ShapeDtypeStruct((), jnp.int32), c, t, vmap_method="broadcast_all"
        ),
        lambda c, t: jnp.zeros((), jnp.int32),
        count,
        step,
    )


def _check_packed_masks(packed_masks: Any) -> bool:
    if not isinstance(packed_masks, bool | np.bool_):
        raise TypeError(f"`packed_masks` must be a bool; got {packed_masks!r}.")
    return bool(packed_masks)


def _check_stored_masks(params: PyTree, masks: PyTree, packed_masks: bool, what: str) -> None:
    """``masks`` (the state's) match ``params`` and are stored the way the transformation stores them."""
    if is_packed_tree(masks) != packed_masks and any(
        m is not None for m in jax.tree.leaves(masks, is_leaf=is_mask_leaf)
    ):
        kind = "packed (1 bit per weight)" if not packed_masks else "bool arrays"
        raise ValueError(
            f"`{what}` holds masks stored as {kind}, but this transformation was built with "
            f"packed_masks={packed_masks}: use the state of a transformation built with the same "
            f"packed_masks (a checkpoint restores into the state of the transformation that wrote it)."
        )
    if not packed_masks:
        check_same_structure("params", params, what, masks)
        return
    got = jax.tree.structure(unwrap(masks), is_leaf=is_mask_leaf)
    if structure(params) != got:
        raise ValueError(
            f"`params` and `{what}` must have the same tree structure; got\n  {structure(params)}\n"
            f"and\n  {got} (a packed mask counts as one leaf)."
        )
    for (path, m), p in zip(
        jax.tree_util.tree_flatten_with_path(unwrap(masks), is_leaf=is_mask_leaf)[0],
        jax.tree.leaves(unwrap(params), is_leaf=is_none),
    ):
        if is_packed(m) and m.shape != tuple(jnp.shape(p)):
            raise ValueError(
                f"`{what}` at {jax.tree_util.keystr(path)} packs a mask of shape {m.shape}; its "
                f"parameter has shape {tuple(jnp.shape(p))}."
            )


def _mask_kind(m: Any) -> tuple:
    """Stored masks of one kind stack together: equal shape and dtype, or for packed masks equal packing."""
    if is_packed(m):
        return m.shape, m.parts, m.bits.shape, m.bits.dtype
    return tuple(m.shape), m.dtype


def _stack_stored(masks: list[Array], held: list) -> list[Array]:
    """The bool ``masks`` stacked by the kinds of the stored masks ``held``, each stack in the stored form."""
    stacks = stack_alike(masks, held, kind=_mask_kind)
    firsts: dict[int, Any] = {}
    for (k, _), m in zip(alike_slots(held, _mask_kind), held):
        firsts.setdefault(k, m)
    out = []
    for k, stack in enumerate(stacks):
        like = firsts[k]
        # the last axis packs row by row: packing the stack packs every mask in it
        if is_packed(like):
            n = stack.shape[0]
            bits = pack(stack.reshape(n, *(like.shape or (1,))), like.parts).bits
            stack = bits.reshape(n, *like.bits.shape)
        out.append(stack)
    return out


def _cut_stored(stacks: list[Array], held: list, slots: tuple) -> list:
    """The stored masks like ``held``, each cut out of its kind's stack at its slot."""
    out = []
    for (k, _), slot, like in zip(alike_slots(held, _mask_kind), slots, held):
        mask = lax.dynamic_index_in_dim(stacks[k], slot, keepdims=False)
        out.append(PackedMask(mask, like.shape, like.parts) if is_packed(like) else mask)
    return out


def _stored_array(mask: Any) -> Array:
    """The array of a stored mask: the bool mask, or a packed mask's words."""
    return mask.bits if is_packed(mask) else mask


def _stack_held(held: list) -> list[Array]:
    """The stored masks ``held`` (bool arrays or packed words) stacked by kind, as :func:`_stack_stored` stacks."""
    return stack_alike([_stored_array(m) for m in held], held, kind=_mask_kind)


def _blank_stacks(held: list) -> list[Array]:
    """Empty stored masks stacked like :func:`_stack_held` stacks ``held`` (their shapes only: nothing is read)."""
    return [jnp.zeros(s.shape, s.dtype) for s in jax.eval_shape(_stack_held, held)]


def _held(masks: PyTree) -> list:
    """The stored masks of a masks tree, in tree order (dense leaves left out)."""
    return [m for m in jax.tree.leaves(masks, is_leaf=is_mask_leaf) if m is not None]


def _slots_of(masks: PyTree) -> tuple[Array, ...]:
    """:attr:`SparseState.mask_slots` for stored ``masks``."""
    return tuple(jnp.int32(position) for _, position in alike_slots(_held(masks), _mask_kind))


def _check_mask_slots(slots: Any, stored_leaves: list) -> None:
    if not isinstance(slots, tuple) or len(slots) != len(stored_leaves):
        raise ValueError(
            f"`state.mask_slots` must hold one int32 scalar per mask array ({len(stored_leaves)}); got "
            f"{len(slots) if isinstance(slots, tuple) else type(slots).__name__}: use the state made by this "
            f"transformation's init (a state built by hand or restored from another transformation lacks them)."
        )


def _same(tree: PyTree) -> PyTree:
    return tree


def sparse_training(
    inner: optax.GradientTransformation | optax.MultiSteps,
    algorithm: MaskAlgorithm,
    *,
    seed: int | Array = 0,
    packed_masks: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that training follows ``algorithm``'s masks; ``params`` must be passed to ``update``.

    ``seed`` (an int, possibly traced under ``vmap``) seeds the PRNG key kept in the state; each update step uses
    ``fold_in(key, step)``, so masks are deterministic given the seed.

    Every training algorithm of jaxsparse is this function applied to its rule (``jaxsparse.rigl(inner, ...)`` is
    ``sparse_training(inner, jaxsparse.rigl.rule(...), seed=seed)``); call it directly for a custom
    :class:`MaskAlgorithm`.

    **Packed masks.** By default ``state.masks`` holds one bool (1 byte) per weight. With ``packed_masks=True``
    it holds 1 bit per weight: each mask is a ``PackedMask`` whose one array leaf, ``bits``, is ``uint8`` of
    shape ``(*shape[:-1], ceil(shape[-1] / 8))`` (entry ``j`` of the last axis is bit ``j % 8``, least
    significant first, of word ``j // 8``; with NumPy ``np.unpackbits(bits, axis=-1, count=shape[-1],
    bitorder="little")``), sharded like its parameter. Where a parameter's last axis is split over ``k`` devices
    in shares that are not whole words, each share is packed on its own (``k * ceil(shape[-1] / (8 * k))``
    words; ``jaxsparse/_bitmask.py`` has the details), so every device unpacks its own entries from its own
    words. Training is bit-identical: the algorithm's rule still sees and returns bool masks (unpacked before it
    and packed after it, on update steps only), and ordinary steps unpack the bits inside the fused masked
    update. Read bool masks with :func:`state_masks` (``jaxsparse.apply_masks`` and the other functions taking
    masks need bool masks, and say so when given packed ones). Checkpoints store the bits (restore them
    into a state initialised with the same packing and placement).

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      algorithm: the :class:`MaskAlgorithm` deciding the masks.
      seed: an int seeding the state's PRNG key (may be traced under ``vmap``).
      packed_masks: store the masks 1 bit per weight instead of 1 byte (see above).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`SparseState`; ``update(grads, state,
      params)`` needs ``params``.

    Raises:
      TypeError: ``inner`` is not an optax transformation, ``algorithm`` is not a :class:`MaskAlgorithm`,
        ``seed`` is not an int or ``packed_masks`` not a bool.
      ValueError: in ``update``, missing ``params``, ``grads``/``params``/masks of different structures, or a
        state whose masks are stored otherwise than ``packed_masks`` says.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxsparse import sparse_training, fixed_masks, state_masks
      >>> params = {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]])}
      >>> mask = {"w": jnp.array([[True, False], [True, True]])}
      >>> tx = sparse_training(optax.adam(0.1), fixed_masks.rule(mask))
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
      >>> optax.apply_updates(params, updates)["w"][0, 1].item()
      0.0
      >>> packed = sparse_training(optax.adam(0.1), fixed_masks.rule(mask), packed_masks=True).init(params)
      >>> packed.masks["w"].bits.dtype.name, packed.masks["w"].bits.shape, state_masks(packed)["w"].tolist()
      ('uint8', (2, 1), [[True, False], [True, True]])
    """
    inner = _as_transformation(inner)
    if not isinstance(algorithm, MaskAlgorithm):
        raise TypeError(f"`algorithm` must be a MaskAlgorithm; got {type(algorithm).__name__}.")
    if not isinstance(seed, jax.core.Tracer) and not isinstance(seed, jax.Array):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int; got {seed!r}.")
    packed_masks = _check_packed_masks(packed_masks)
    # stored masks -> bool masks
    read = unpack_tree if packed_masks else _same

    def init_stored(params, key, parts):
        masks, extra = algorithm.init(params, key)
        check_same_structure("params", params, "initial masks", masks)
        return (pack_tree(masks, parts) if packed_masks else masks), extra

    def init_fn(params):
        params = unwrap(params)
        _check_params(params)
        key = jax.random.PRNGKey(seed)
        # how each packed mask splits its last axis: per device share where a share is not whole words
        parts = tuple(parts_for(p) for p in jax.tree.leaves(params)) if packed_masks else None
        # not jitted as a whole: the rules' selections are jitted per group of equally shaped leaves and the rest
        # is a few elementwise ops per leaf, each a cached executable; one program for the whole init would
        # compile for seconds on a model of hundreds of leaves and again for every new transformation
        masks, extra = init_stored(params, jax.random.fold_in(key, -1 & 0x7FFFFFFF), parts)
        masks = place_packed_like(masks, params) if packed_masks else place_like(masks, params)
        state = SparseState(
            inner_state=inner.init(params),
            masks=masks,
            step=jnp.zeros((), jnp.int32),
            key=key,
            extra=extra,
            mask_slots=_slots_of(masks),
        )
        return commit_like(state, params)  # one placement kind for the step's inputs: one compile

    def update_fn(grads, state, params=None, **extra_args):
        if params is None:
            raise ValueError("sparse_training needs `params` in update(grads, state, params).")
        params, grads = unwrap(params), unwrap(grads)
        check_same_structure("grads", grads, "params", params)
        _check_stored_masks(params, state.masks, packed_masks, "state.masks")
        stored = unwrap(
            state.masks
        )  # bool masks, or their packed bits: unpacked where they are read
        ctx = MaskContext(
            stored,
            params,
            grads,
            state.step,
            jax.random.fold_in(state.key, state.step),
            state.extra,
        )

        # The rule's masks are stacked by kind (its own per-leaf cuts of a stacked selection and this restacking
        # cancel in XLA) and each leaf's mask is cut out of its stack at the position held in ``state.mask_slots``:
        # a runtime position makes that cut the same code for every leaf of a kind, so XLA compiles it once, where
        # a cut at a constant position is a kernel of its own per leaf.
        stored_leaves, stored_def = jax.tree.flatten(stored, is_leaf=is_mask_leaf)
        held = _held(stored)
        _check_mask_slots(state.mask_slots, held)

        def run_rule(c):
            """The rule's new masks, stacked by kind in the stored form, and the algorithm's state."""
            with jax.named_scope(MASK_RULE_SCOPE):  # tests find the rule's ops by this name
                masks, extra = algorithm.update(c._replace(masks=read(c.masks)))
                new = [m for m in jax.tree.leaves(masks, is_leaf=is_none) if m is not None]
                return _stack_stored(new, held), extra

        def count(c):
            return _count_pruned_nonzero(read(c.masks), c.params)

        # The stored masks are read by one cond only, which passes them through on ordinary steps, and every read
        # of them on an update step comes before the new masks are written: XLA then keeps them in their (donated)
        # buffers, where a second reader (the pruned-weights count in a cond of its own, or the growth
        # ``new & ~old`` after the cond) or a read after the new masks exist made it copy every mask twice per step
        # (at entry and in the pass-through; ``tests/test_scale.py`` counts them). So the count and the grown
        # connections (stacked by kind, empty on ordinary steps) come out of the cond, and on update steps the new
        # masks are made to depend on both.
        def keep(c):
            leaks = lax.cond(  # in a cond of its own: ordinary steps skip the count
                _leak_check_step(c.step, algorithm.is_update),
                count,
                lambda c: jnp.zeros((), jnp.int32),
                c,
            )
            grown = _blank_stacks(held) if algorithm.grows else []
            return _held(c.masks), c.extra, jnp.zeros((), bool), leaks, grown

        def update(c, finite):
            stacks, extra = run_rule(c)
            old = _held(c.masks)
            leaks = count(c)
            grown = [jnp.zeros((), s.dtype) for s in stacks]  # where the rule grows nothing
            if algorithm.grows:
                olds = _stack_held(old)
                grown = [
                    jnp.where(finite, n & ~o, jnp.zeros((), n.dtype)) for n, o in zip(stacks, olds)
                ]
            # ``after`` is False, but XLA cannot know it: the new masks depend on the count and the growth, so XLA
            # schedules both reads of the old masks before it writes the new masks over them (an optimisation
            # barrier did not keep that order)
            after = leaks < 0
            stacks = [jnp.where(after, g, s) for s, g in zip(stacks, grown)]
            new = _select(finite, _cut_stored(stacks, held, state.mask_slots), old)
            grown = grown if algorithm.grows else []
            return new, _select(finite, extra, c.extra), finite, leaks, grown

        # A non-finite step changes no mask and leaves the algorithm's state as it was. The flag comes back out of
        # the cond: every leaf's select then reads one materialised bool, where XLA would otherwise fuse (and so
        # duplicate) the all-leaves finiteness reduction into each leaf's update.
        if algorithm.observe is not None:  # the state changes every step: check every step
            finite = _all_finite(grads)
            observed = algorithm.observe(ctx._replace(masks=read(stored)))
            ctx = ctx._replace(extra=_select(finite, observed, state.extra))
            update_now = algorithm.is_update(state.step) & finite
            rule_branch = lambda c: update(c, jnp.ones((), bool))  # noqa: E731
        else:  # the finiteness reduction runs on mask-update steps only, next to the rule (its result is dropped)
            update_now = algorithm.is_update(state.step)
            rule_branch = lambda c: update(c, _all_finite(c.grads))  # noqa: E731

        new_held, extra, do_update, leaks, grown_stacks = lax.cond(
            update_now, rule_branch, keep, ctx
        )

        def stored_tree(held_list):
            it = iter(held_list)
            return jax.tree.unflatten(
                stored_def, [None if m is None else next(it) for m in stored_leaves]
            )

        new_stored = stored_tree(new_held)
        checked = _raise_if_pruned_nonzero(leaks, state.step)
        masks = read(new_stored)  # packed: shifts and ands, fused into the elementwise passes below
        inner_state, grad_masks = state.inner_state, masks
        if (
            algorithm.grows
        ):  # elementwise, fused with the inner update; the optimizer state stays out of cond
            grown = read(stored_tree(_cut_stored(grown_stacks, held, state.mask_slots)))
            inner_state = _zero_moments(inner, inner_state, grown, params)
            if algorithm.skip_step_on_update:  # grown weights see no gradient on the skipped step
                grad_masks = map_live(lambda m, g: m & ~g, masks, grown)
        masked_grads = map_masked(
            lambda g, m: jnp.where(m, g, jnp.zeros((), g.dtype)), grads, grad_masks
        )
        updates, new_inner = inner.update(masked_grads, inner_state, params, **extra_args)
        if algorithm.skip_step_on_update:
            updates = jax.tree.map(
                lambda u: jnp.where(do_update, jnp.zeros((), u.dtype), u), updates
            )
        # ``leaks >= checked`` always holds (``checked`` is 0, or the step raised); it makes every masked update
        # depend on the pruned-weights count and its check: XLA reads params for the count before the step's
        # output overwrites them in place (donated params) instead of copying every masked param at entry to keep
        # it alive for a check nothing else would depend on, and the check's callback is not dead code
        counted = leaks >= checked
        updates = jax.tree.map(
            lambda m, u, p: u if m is None else jnp.where(m & counted, u, -p).astype(u.dtype),
            masks,
            updates,
            params,
            is_leaf=is_none,
        )
        return updates, SparseState(
            new_inner, new_stored, state.step + 1, state.key, extra, state.mask_slots
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def state_masks(state: PyTree) -> PyTree:
    """The bool masks of a :func:`sparse_training` state, whether it stores them packed or not.

    Finds the one :class:`SparseState` inside ``state`` (the state itself, or an optax state holding it:
    ``optax.chain``, ``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.inject_hyperparams``, an
    ``nnx.Optimizer``'s ``opt_state``...) and returns its masks as bool arrays shaped like ``params`` (``None``
    for dense leaves), unpacking those stored 1 bit per weight (``packed_masks=True``). Works under ``jit``.

    Args:
      state: a :class:`SparseState` or an optax state containing exactly one.

    Returns:
      The masks pytree (bool arrays; ``None`` for dense leaves); with a ``vmap``-ed state, each mask keeps the
      batch axes in front.

    Raises:
      ValueError: ``state`` contains no :class:`SparseState`, or more than one.

    Example:
      >>> import jax.numpy as jnp, optax, jaxsparse as js
      >>> params = {"w": jnp.array([[1.0, -3.0, 0.5]]), "b": jnp.zeros(3)}
      >>> masks = {"w": jnp.array([[False, True, False]]), "b": None}
      >>> tx = js.fixed_masks(optax.sgd(0.1), masks, packed_masks=True)
      >>> state = optax.chain(optax.clip(1.0), tx).init(params)
      >>> masks = js.state_masks(state)
      >>> masks["w"].tolist(), masks["b"]
      ([[False, True, False]], None)
    """
    is_state = lambda x: isinstance(x, SparseState)  # noqa: E731
    found = [x for x in jax.tree.leaves(state, is_leaf=is_state) if is_state(x)]
    if len(found) != 1:
        raise ValueError(
            f"`state` must contain exactly one jaxsparse SparseState; found {len(found)} in a "
            f"{type(state).__name__} (pass that SparseState itself)."
        )
    return unpack_tree(unwrap(found[0].masks))
