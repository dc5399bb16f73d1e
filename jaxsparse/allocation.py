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
from jaxsparse._tree import natural_key, path_name

__all__ = ["prunable", "budget", "Budget", "keep_count", "DISTRIBUTIONS"]

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


def _default_prunable(name: str, leaf: Any) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.floating) and len(leaf.shape) >= 2


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

    >>> import jax.numpy as jnp
    >>> p = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
    >>> prunable(p)
    {'Dense_0': {'bias': False, 'kernel': True}}
    """
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not leaves:
        raise ValueError("`params` is an empty pytree; expected at least one array leaf.")
    rule = predicate or _default_prunable
    chosen = []
    for path, leaf in leaves:
        name = path_name(path)
        pick = bool(rule(name, leaf))
        pick = pick and (inc is None or _matches(inc, name)) and not (exc and _matches(exc, name))
        if pick and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"leaf '{name}' with dtype {jnp.result_type(leaf)} was selected for pruning; only real floating-point "
                "leaves can be pruned (exclude it or change `predicate`)."
            )
        chosen.append(pick)
    order = sorted(
        (i for i, c in enumerate(chosen) if c), key=lambda i: natural_key(path_name(leaves[i][0]))
    )
    if first_layer_dense and order:
        chosen[order[0]] = False
    if last_layer_dense and order:
        chosen[order[-1]] = False
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
) -> Budget:
    """Builds a per-leaf sparsity budget: ``budget(0.9, "erk")(params) -> {..: 0.83, ..: None}``.

    ``sparsity`` is the target fraction of zeros over the selected leaves (those :func:`prunable` picks with the same
    keyword arguments), in ``[0, 1)``; with ``"uniform"`` it may be a traced scalar (e.g. under ``vmap``).
    ``custom`` maps path regexes to a fixed sparsity for matching leaves, which are then left out of the ER/ERK
    solve. Leaves whose sparsity comes out as 0 are dense (``None``).

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

    def plan(params: PyTree) -> PyTree:
        chosen = prunable(params, **selection)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        picks = jax.tree.leaves(chosen)
        out: list[Any] = [None] * len(leaves)
        solve = []
        for i, ((path, _leaf), pick) in enumerate(zip(leaves, picks)):
            if not pick:
                continue
            name = path_name(path)
            fixed = next((s for r, s in custom_res if r.search(name)), None)
            if fixed is not None:
                out[i] = fixed
            else:
                solve.append(i)
        if not solve and all(o is None for o in out):
            raise ValueError(
                "no leaf of `params` is selected for pruning; check `include`, `exclude` and `predicate`."
            )
        shapes = [tuple(leaves[i][1].shape) for i in solve]
        if distribution == "uniform":
            for i in solve:
                out[i] = sparsity
        elif solve:
            sizes = [math.prod(s) for s in shapes]
            raw = [_raw_density(s, distribution, erk_power_scale) for s in shapes]
            for i, d in zip(solve, _solve_densities(sizes, raw, 1.0 - sparsity)):
                out[i] = max(0.0, 1.0 - d)
        out = [None if (isinstance(s, float) and s == 0.0) else s for s in out]
        return jax.tree.unflatten(treedef, out)

    return plan


def as_budget(sparsity: float | Budget) -> Budget:
    """A float means a uniform budget over the default prunable leaves."""
    return sparsity if callable(sparsity) else budget(sparsity)


def keep_count(sparsity: Any, size: int) -> Any:
    """Weights kept in a leaf of ``size`` at ``sparsity``: ``size - floor(sparsity * size)``.

    Concrete sparsities use Python doubles (the exact count); traced ones use float32 arithmetic.

    >>> keep_count(0.7, 10)
    3
    """
    if isinstance(sparsity, jax.core.Tracer) or isinstance(sparsity, jax.Array):
        return size - jnp.floor(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)
    return size - math.floor(float(sparsity) * size)
