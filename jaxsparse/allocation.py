"""Which leaves are pruned, and how sparse each one is: prunable-leaf selection and layer-wise budgets.

A *budget* is a function ``params -> per-leaf sparsity`` (a pytree shaped like ``params`` holding a float for each
pruned leaf and ``None`` for each dense one), built once by :func:`budget` with every argument checked eagerly.
Only the leaves' shapes and dtypes are read, so a budget runs at trace time on abstract values too.

Distributions (Evci et al. 2020, RigL; Mocanu et al. 2018, SET):

* ``"uniform"``: every selected leaf gets the same sparsity.
* ``"er"``: density proportional to ``(n_in + n_out) / (n_in * n_out)`` of the last two (channel) dims.
* ``"erk"``: density proportional to ``(sum(shape) / prod(shape)) ** erk_power_scale`` (all dims).

For ER/ERK the scale is solved so that the selected leaves hold exactly the target density overall; a leaf whose
density would exceed 1 is made dense and the rest re-solved (RigL's redistribution). Leaves named in ``custom``
get their own sparsity and are left out of that solve.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from jaxsparse import _validation as v
from jaxsparse._tree import leaf_paths, named_leaves, natural_key, unwrap

__all__ = [
    "prunable",
    "budget",
    "Budget",
    "keep_count",
    "leaf_paths",
    "overall_sparsity",
    "layer_axes",
    "DISTRIBUTIONS",
]

DISTRIBUTIONS = ("uniform", "er", "erk")

Budget = Callable[[PyTree], PyTree]
Predicate = Callable[[str, Any], bool]


def _compile(patterns: str | Iterable[str] | None, name: str) -> list[re.Pattern] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        return [re.compile(p) for p in patterns]
    except (re.error, TypeError) as e:
        raise ValueError(
            f"`{name}` must be regular expression(s) over leaf paths like 'Dense_0/kernel'; got {patterns!r} ({e})."
        ) from None


def _matches(regexes: list[re.Pattern], name: str) -> bool:
    return any(r.search(name) for r in regexes)


def _shape(leaf: Any) -> tuple[int, ...]:
    """Shape of an array, ``jax.ShapeDtypeStruct`` or Python number."""
    return tuple(leaf.shape) if hasattr(leaf, "shape") else ()


def _dtype(leaf: Any) -> Any:
    return leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)


def _default_prunable(name: str, leaf: Any) -> bool:
    shape = _shape(leaf)
    return jnp.issubdtype(_dtype(leaf), jnp.floating) and len(shape) >= 2 and math.prod(shape) > 0


def _describe(leaf: Any) -> str:
    return f"{jnp.dtype(_dtype(leaf))}{list(_shape(leaf))}"


def _nothing_selected(
    what: str, leaves: list[tuple[str, Any]], include: Any, exclude: Any, predicate: Any
) -> ValueError:
    shown = ", ".join(f"'{n}' {_describe(x)}" for n, x in leaves[:40])
    more = f" (+{len(leaves) - 40} more)" if len(leaves) > 40 else ""
    rule = (
        "`predicate`"
        if predicate is not None
        else "the default (floating point, ndim >= 2, size > 0)"
    )
    return ValueError(
        f"{what}: no leaf of `params` is selected for pruning (include={include!r}, exclude={exclude!r}, "
        f"rule: {rule}). Patterns are searched in these leaf paths: {shown}{more}."
    )


def prunable(
    params: PyTree,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    predicate: Predicate | None = None,
    first_layer_dense: bool = False,
    last_layer_dense: bool = False,
) -> PyTree:
    """A pytree of Python bools: which leaves of ``params`` are pruned.

    By default: floating-point leaves with ``ndim >= 2`` (Dense and Conv kernels, embeddings), which leaves biases
    and norm scales dense. ``predicate(path, leaf)`` replaces that default; ``include`` (regexes searched in the
    ``'a/b/kernel'`` path) then restricts the selection and ``exclude`` removes from it. ``first_layer_dense`` and
    ``last_layer_dense`` drop the first / last selected leaf in natural path order (``Dense_2`` before ``Dense_10``).

    Paths are those of :func:`leaf_paths`: ``nnx.state(model)``, an ``nnx.split`` state and the pure dict of the
    same model name a kernel alike (``'layers/0/kernel'``; an NNX Variable's ``value`` is not a level), so
    ``include=r"kernel$"`` works on all of them. The result is a plain tree of bools (Variables unwrapped).
    Selecting nothing is an error that names the patterns and lists the available paths; so is selecting a
    non-float or zero-size leaf.

    Args:
      params: the parameter pytree (arrays, ``jax.ShapeDtypeStruct`` or Python scalars as leaves).
      include, exclude: regular expression(s) searched (``re.search``) in each leaf path.
      predicate: ``(path, leaf) -> bool`` replacing the default rule.
      first_layer_dense, last_layer_dense: keep the first / last selected leaf dense.

    Returns:
      A pytree shaped like ``unwrap(params)`` holding ``True`` for pruned leaves and ``False`` otherwise.

    >>> import jax.numpy as jnp
    >>> p = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
    >>> prunable(p)
    {'Dense_0': {'bias': False, 'kernel': True}}
    """
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    params = unwrap(params)
    leaves = named_leaves(params)
    treedef = jax.tree.structure(params)
    if not leaves:
        raise ValueError("`params` is an empty pytree; expected at least one array leaf.")
    rule = predicate or _default_prunable
    chosen = []
    for name, leaf in leaves:
        pick = bool(rule(name, leaf))
        pick = pick and (inc is None or _matches(inc, name)) and not (exc and _matches(exc, name))
        if pick and not jnp.issubdtype(_dtype(leaf), jnp.floating):
            raise TypeError(
                f"leaf '{name}' with dtype {_dtype(leaf)} was selected for pruning; only real floating-point "
                "leaves can be pruned (exclude it or change `predicate`)."
            )
        if pick and math.prod(_shape(leaf)) == 0:
            raise ValueError(
                f"leaf '{name}' of shape {_shape(leaf)} was selected for pruning but has no "
                "entries (exclude it or change `predicate`)."
            )
        chosen.append(pick)
    order = sorted((i for i, c in enumerate(chosen) if c), key=lambda i: natural_key(leaves[i][0]))
    if first_layer_dense and order:
        chosen[order[0]] = False
    if last_layer_dense and order:
        chosen[order[-1]] = False
    if not any(chosen):
        raise _nothing_selected("prunable", leaves, include, exclude, predicate)
    return jax.tree.unflatten(treedef, chosen)


def _raw_density(shape: tuple[int, ...], distribution: str, power: float) -> float:
    if distribution == "uniform":
        return 1.0
    if distribution == "er":
        n_in, n_out = shape[-2], shape[-1]
        return (n_in + n_out) / (n_in * n_out)
    return (sum(shape) / math.prod(shape)) ** power


def _solve_densities(sizes: list[int], raw: list[float], density: float) -> list[float]:
    """RigL's ERK solve: scale ``raw`` so the total density is exact, moving leaves that overflow to dense."""
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(sizes)) if i not in dense]
        if not free:
            return [1.0] * len(sizes)
        rhs = sum(density * sizes[i] for i in free) - sum((1 - density) * sizes[i] for i in dense)
        eps = rhs / sum(raw[i] * sizes[i] for i in free)
        top = max(raw[i] for i in free)
        if eps * top <= 1.0:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]
        dense.update(i for i in free if raw[i] == top)


def budget(
    sparsity: float,
    distribution: str = "uniform",
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    predicate: Predicate | None = None,
    first_layer_dense: bool = False,
    last_layer_dense: bool = False,
    erk_power_scale: float = 1.0,
    custom: Mapping[str, float] | None = None,
    layer_axis: Mapping[str, int] | None = None,
) -> Budget:
    """Builds a per-leaf sparsity budget: ``budget(0.9, "erk")(params) -> {..: 0.83, ..: None}``.

    ``layer_axis`` marks stacked (scanned) leaves: it maps path regexes to the layer axis of matching leaves
    (``{"layers/": 0}`` for ``nn.scan`` / ``nnx.scan`` params of shape ``(layers, d_in, d_out)``). Each layer
    slice is then treated as its own leaf: ER/ERK densities come from the slice's shape, and the training
    transforms and :func:`jaxsparse.magnitude_masks` / :func:`jaxsparse.random_masks` keep
    ``keep_count(s, slice size)`` weights in *every* slice (per-layer top-k). The budget exposes the axes as
    ``budget(...).layer_axes(params)`` (a pytree of ``int`` / ``None``).

    ``sparsity`` is the target fraction of zeros over the selected leaves (those :func:`prunable` picks with the same
    keyword arguments), in ``[0, 1)``; with ``"uniform"`` it may be a traced scalar (e.g. under ``vmap``).
    ``custom`` maps path regexes to a fixed sparsity for matching leaves, which are then left out of the ER/ERK
    solve (a pattern that matches no selected leaf is an error). Leaves whose sparsity comes out as 0 are dense
    (``None``). Every pattern (``include``, ``exclude``, ``custom``, ``layer_axis``) is searched in the names
    :func:`leaf_paths` prints: ``nnx.state(model)``, ``nnx.split`` states and pure dicts give the same names.

    Args:
      sparsity: the target fraction of zeros over the selected leaves, in ``[0, 1)`` (traced only with
        ``"uniform"``).
      distribution: ``"uniform"``, ``"er"`` or ``"erk"`` (see the module notes).
      include, exclude: regular expression(s) selecting leaves by path, as in :func:`prunable`.
      predicate: ``(path, leaf) -> bool`` replacing the default selection, as in :func:`prunable`.
      first_layer_dense, last_layer_dense: keep the first / last selected leaf dense.
      erk_power_scale: the exponent of the ERK density (>= 0).
      custom: path regex -> fixed sparsity in ``[0, 1)`` for matching leaves.
      layer_axis: path regex -> the layer axis of matching stacked leaves (ndim >= 3).

    Returns:
      A :data:`Budget`: ``params -> per-leaf sparsity pytree`` (a float per pruned leaf, ``None`` per dense one),
      with a ``layer_axes(params)`` method.

    Raises:
      ValueError: a sparsity out of range, a traced ``sparsity`` with ER/ERK, an unknown ``distribution``, a
        negative ``erk_power_scale`` or a bad regex; when the budget is applied, a ``custom`` or ``layer_axis``
        pattern that matches no leaf, a bad layer axis, or a selection that picks nothing.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"a": jnp.ones((100, 100)), "b": jnp.ones((100, 10)), "bias": jnp.ones(10)}
      >>> s = budget(0.9, "erk")(p)
      >>> round(s["a"], 3), round(s["b"], 3), s["bias"]
      (0.929, 0.61, None)
    """
    traced = isinstance(sparsity, jax.core.Tracer)
    if not traced:
        sparsity = v.check_sparsity("sparsity", sparsity)
    v.check_choice("distribution", distribution, DISTRIBUTIONS)
    if traced and distribution != "uniform":
        raise ValueError(
            f"`sparsity` must be a concrete float for distribution={distribution!r}; only 'uniform' accepts a traced one."
        )
    if erk_power_scale < 0:
        raise ValueError(f"`erk_power_scale` must be >= 0; got {erk_power_scale}.")
    custom = dict(custom or {})
    for pattern, s in custom.items():
        _compile(pattern, "custom")
        v.check_sparsity(f"custom[{pattern!r}]", s)
    custom_res = [(re.compile(p), s) for p, s in custom.items()]
    selection = dict(
        include=include,
        exclude=exclude,
        predicate=predicate,
        first_layer_dense=first_layer_dense,
        last_layer_dense=last_layer_dense,
    )
    _compile(include, "include"), _compile(exclude, "exclude")

    layer_res = _layer_axis_patterns(layer_axis)
    if (
        layer_res and predicate is None
    ):  # a stacked leaf is pruned by default when its *slice* would be

        def stacked_default(name: str, leaf: Any) -> bool:
            nd = jnp.ndim(leaf) - any(r.search(name) for r, _ in layer_res)
            return _default_prunable(name, leaf) and nd >= 2

        selection["predicate"] = stacked_default

    def axes_of(params: PyTree) -> PyTree:
        params = unwrap(params)
        chosen = jax.tree.leaves(prunable(params, **selection))
        names = [name for name, _ in named_leaves(params)]
        for r, _ in layer_res:
            if not any(r.search(n) for n in names):
                raise ValueError(
                    f"`layer_axis` pattern {r.pattern!r} matches no leaf; the leaf paths are {names[:40]}."
                )
        out = []
        for (name, leaf), pick in zip(named_leaves(params), chosen):
            ax = next((a for r, a in layer_res if r.search(name)), None) if pick else None
            if ax is not None:
                nd = len(_shape(leaf))
                if nd < 3 or not -nd <= ax < nd:
                    raise ValueError(
                        f"`layer_axis` gives leaf '{name}' of shape {_shape(leaf)} layer axis {ax}; a stacked "
                        f"leaf needs ndim >= 3 (layers plus a 2-D or larger layer) and an axis in [{-nd}, {nd})."
                    )
                ax %= nd
            out.append(ax)
        return jax.tree.unflatten(jax.tree.structure(params), out)

    def plan(params: PyTree) -> PyTree:
        params = unwrap(params)
        axes = jax.tree.leaves(axes_of(params), is_leaf=lambda x: x is None)
        chosen = prunable(params, **selection)
        leaves = named_leaves(params)
        treedef = jax.tree.structure(params)
        picks = jax.tree.leaves(chosen)
        out: list[Any] = [None] * len(leaves)
        solve = []
        for i, ((name, _leaf), pick) in enumerate(zip(leaves, picks)):
            if not pick:
                continue
            fixed = next((s for r, s in custom_res if r.search(name)), None)
            if fixed is not None:
                out[i] = fixed
            else:
                solve.append(i)
        selected = [name for (name, _), pick in zip(leaves, picks) if pick]
        for r, _ in custom_res:
            if not any(r.search(name) for name in selected):
                raise ValueError(
                    f"`custom` pattern {r.pattern!r} matches no selected leaf; the selected leaf paths are "
                    f"{selected}."
                )
        shapes = [_shape(leaves[i][1]) for i in solve]
        units = [  # the shape a density is computed from: one layer slice of a stacked leaf
            s if axes[i] is None else s[: axes[i]] + s[axes[i] + 1 :] for s, i in zip(shapes, solve)
        ]
        if distribution == "uniform":
            for i in solve:
                out[i] = sparsity
        elif solve:
            sizes = [math.prod(s) for s in shapes]
            raw = [_raw_density(s, distribution, erk_power_scale) for s in units]
            for i, d in zip(solve, _solve_densities(sizes, raw, 1.0 - sparsity)):
                out[i] = max(0.0, 1.0 - d)
        out = [None if (isinstance(s, float) and s == 0.0) else s for s in out]
        return jax.tree.unflatten(treedef, out)

    plan.layer_axes = axes_of
    return plan


def _layer_axis_patterns(layer_axis: Mapping[str, int] | None) -> list[tuple[re.Pattern, int]]:
    if layer_axis is None:
        return []
    if not isinstance(layer_axis, Mapping):
        raise TypeError(
            f"`layer_axis` must map path regexes to an int axis, e.g. {{'layers/': 0}}; got {layer_axis!r}."
        )
    out = []
    for pattern, ax in layer_axis.items():
        (regex,) = _compile(pattern, "layer_axis")
        if isinstance(ax, bool) or not isinstance(ax, int):
            raise TypeError(f"`layer_axis[{pattern!r}]` must be an int axis; got {ax!r}.")
        out.append((regex, ax))
    return out


def layer_axes(sparsity: Any, params: PyTree) -> PyTree | None:
    """The layer axis of every leaf under ``sparsity`` (a budget built with ``layer_axis``), else ``None``.

    Args:
      sparsity: a float, a per-leaf pytree or a :func:`budget`; only a budget carries layer axes.
      params: the parameter pytree (shapes only).

    Returns:
      A pytree like ``params`` of ``int`` (stacked leaf) / ``None``, or ``None`` when no leaf is stacked.

    >>> import jax.numpy as jnp
    >>> p = {"layers": {"kernel": jnp.ones((3, 4, 4))}, "head": jnp.ones((4, 2))}
    >>> layer_axes(budget(0.5, layer_axis={"layers/": 0}), p)
    {'head': None, 'layers': {'kernel': 0}}
    """
    fn = getattr(sparsity, "layer_axes", None)
    if fn is None:
        return None
    axes = fn(params)
    return axes if any(a is not None for a in jax.tree.leaves(axes)) else None


def as_budget(sparsity: float | Budget) -> Budget:
    """A float means a uniform budget over the default prunable leaves."""
    return sparsity if callable(sparsity) else budget(sparsity)


def keep_count(sparsity: Any, size: int) -> Any:
    """Weights kept in a leaf of ``size`` at ``sparsity``: ``size - floor(sparsity * size)``.

    Concrete sparsities use Python doubles (the exact count); traced ones use float32 arithmetic.

    The one count rule of every jaxsparse API (training transforms, one-shot masks, post-training, Flax layers).

    Args:
      sparsity: the fraction of zeros: a Python or NumPy float, or a (possibly traced) JAX scalar.
      size: the number of weights in the leaf (or layer slice).

    Returns:
      ``size - floor(sparsity * size)``: a Python int for a concrete float ``sparsity``, an int32 array for a JAX
      array or tracer.

    Example:
      >>> keep_count(0.7, 10)
      3
      >>> keep_count(0.29, 100)
      72
    """
    if isinstance(sparsity, jax.core.Tracer) or isinstance(sparsity, jax.Array):
        return size - jnp.floor(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)
    return size - math.floor(float(sparsity) * size)


def overall_sparsity(sparsities: PyTree, params: PyTree) -> float:
    """The fraction of zeros over the pruned leaves of ``params`` at per-leaf ``sparsities`` (``None`` = dense).

    Exactly the common value when every pruned leaf has the same sparsity (no round-off from the weighted mean).

    Args:
      sparsities: a per-leaf sparsity pytree shaped like ``params`` (``None`` for dense leaves).
      params: the parameter pytree (only shapes are read).

    Returns:
      ``sum(s_l * n_l) / sum(n_l)`` over the pruned leaves, a Python float.

    >>> import jax.numpy as jnp
    >>> overall_sparsity({"a": 0.5, "b": None, "c": 0.9}, {"a": jnp.ones(10), "b": jnp.ones(3), "c": jnp.ones(30)})
    0.8
    """
    flat_s = jax.tree.leaves(sparsities, is_leaf=lambda x: x is None)
    flat_p = jax.tree.leaves(params)
    pairs = [(s, math.prod(jnp.shape(p))) for s, p in zip(flat_s, flat_p) if s is not None]
    if not pairs:
        raise ValueError("`sparsities` marks no leaf of `params` as pruned; expected at least one.")
    first = pairs[0][0]
    traced = any(isinstance(s, jax.core.Tracer) for s, _ in pairs)
    if all(s is first for s, _ in pairs) or (not traced and all(s == first for s, _ in pairs)):
        return first
    if traced:  # a traced sparsity (optax.inject_hyperparams): the same weighted mean, traced
        return sum(s * n for s, n in pairs) / sum(n for _, n in pairs)
    return math.fsum(s * n for s, n in pairs) / sum(n for _, n in pairs)
