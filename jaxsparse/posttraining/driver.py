"""Layer-by-layer post-training pruning of Flax models (NNX and Linen).

The driver finds the model's 2-D Dense kernels (``nnx.Linear`` / ``linen.Dense``) in the order the forward pass
calls them, then for each stage (by default one layer; ``groups`` can put several layers in one stage):

1. runs the model, whose earlier layers are already pruned, on every calibration batch inside one jitted
   function, tapping the stage's layer inputs into running :class:`ActivationStats` (sums, so a batch sharded
   over devices gives the single-device result);
2. prunes each layer of the stage with the chosen method and writes the pruned kernel back,

so every layer is calibrated on the outputs of the already-pruned layers before it, as in the SparseGPT and
Wanda reference code. Each stage costs one forward pass over the calibration batches; group the layers of a
block (e.g. q/k/v and the MLP input, which see the same input) to save passes on large models.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxsparse import _validation as v
from jaxsparse.posttraining._common import check_nm_fits, parse_sparsity
from jaxsparse.posttraining.calibration import (
    ActivationStats,
    activation_mean,
    activation_var,
    hessian_from_stats,
    init_activation_stats,
    update_activation_stats,
    warn_if_ill_conditioned,
)
from jaxsparse.posttraining.dsnot import dsnot_prune
from jaxsparse.posttraining.magnitude import magnitude_prune_layer
from jaxsparse.posttraining.owl import OWL, outlier_ratio, owl_sparsities
from jaxsparse.posttraining.sparsegpt import sparsegpt_prune
from jaxsparse.posttraining.wanda import wanda_prune

__all__ = ["METHODS", "PruneResult", "prune_layer", "prune_nnx", "prune_linen"]

METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")


class PruneResult(NamedTuple):
    """``model``: the pruned NNX model (a new object) or Linen variables; ``masks``: layer name -> keep mask;
    ``report``: layer name -> ``{"shape", "sparsity", "tokens", "seconds"}``."""

    model: Any
    masks: dict[str, jax.Array]
    report: dict[str, dict]


def prune_layer(
    method: str,
    kernel: jax.Array,
    stats: ActivationStats | None,
    sparsity: float | tuple[int, int],
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    dsnot_init: str = "wanda",
    dsnot_options: dict | None = None,
    name: str = "layer",
) -> tuple[jax.Array, jax.Array]:
    """Prunes one ``(in, out)`` kernel with ``method`` given its input statistics; returns ``(kernel, mask)``.

    The per-layer step of :func:`prune_nnx` and :func:`prune_linen`: ``"magnitude"`` is
    :func:`magnitude_prune_layer`, ``"wanda"`` :func:`wanda_prune`, ``"sparsegpt"`` :func:`sparsegpt_prune` on
    :func:`hessian_from_stats` (warning when there are fewer tokens than input features), ``"dsnot"`` a
    ``dsnot_init`` mask refined by :func:`dsnot_prune`.

    Args:
      method: one of :data:`METHODS`.
      kernel: the finite float ``(in, out)`` kernel.
      stats: the layer's input statistics (with ``X^T X`` for SparseGPT); may be ``None`` for ``"magnitude"``.
      sparsity: a fraction in ``[0, 1)`` (unstructured) or an ``(n, m)`` pair (N:M along the input axis, ``m``
        dividing ``in_features``).
      blocksize: SparseGPT's column block size.
      damp: SparseGPT's dampening, a fraction of ``mean(diag H)`` added to the diagonal.
      dsnot_init: the method giving DSnoT's initial mask: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
      dsnot_options: keyword arguments of :func:`dsnot_prune` (e.g. ``max_cycles``).
      name: the layer's name in warnings.

    Returns:
      ``(pruned_kernel, keep_mask)``.

    Raises:
      ValueError: an unknown ``method`` or ``dsnot_init``, ``stats=None`` for a calibrated method, or any error of
        the chosen pruner (bad kernel, sparsity or statistics).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxsparse.posttraining import init_activation_stats, update_activation_stats
      >>> s = update_activation_stats(init_activation_stats(4), jnp.eye(4))
      >>> k, m = prune_layer("wanda", jnp.arange(8.0).reshape(4, 2), s, (2, 4))
      >>> m[:, 0].tolist()
      [False, False, True, True]
    """
    v.check_choice("method", method, METHODS)
    if method == "magnitude":
        return magnitude_prune_layer(kernel, sparsity)
    if stats is None:
        raise ValueError(f"`stats` is required for method={method!r}; got None.")
    if method == "wanda":
        return wanda_prune(kernel, stats.sq_sum, sparsity)
    if method == "sparsegpt":
        h = hessian_from_stats(stats)
        warn_if_ill_conditioned(h, int(stats.count), damp, name=name)
        return sparsegpt_prune(kernel, h, sparsity, blocksize=blocksize, damp=damp)
    v.check_choice("dsnot_init", dsnot_init, ("magnitude", "wanda", "sparsegpt"))
    _, mask = prune_layer(
        dsnot_init, kernel, stats, sparsity, blocksize=blocksize, damp=damp, name=name
    )
    pattern = parse_sparsity(sparsity)
    return dsnot_prune(
        kernel,
        mask,
        activation_mean(stats),
        activation_var(stats),
        stats.sq_sum,
        nm_group_size=pattern.m if pattern.is_nm else None,
        **(dsnot_options or {}),
    )


# ------------------------------------------------------------------------------------------------ the shared loop
def _stages(names: list[str], groups: Sequence[Sequence[str]] | str | None) -> list[list[str]]:
    if groups is None:
        return [[n] for n in names]
    if groups == "all":
        return [list(names)]
    seen = [n for g in groups for n in g]
    unknown = sorted(set(seen) - set(names))
    if unknown or len(seen) != len(set(seen)):
        raise ValueError(
            f"`groups` must partition (a subset of) the selected layers {names}; got unknown or repeated {unknown or seen}."
        )
    order = {n: i for i, n in enumerate(names)}
    return sorted([sorted(g, key=order.get) for g in groups if g], key=lambda g: order[g[0]])


def _progress(stages: list, enabled: bool):
    if not enabled:
        return stages
    try:
        from tqdm.auto import tqdm
    except ImportError:  # plain fallback
        return stages
    return tqdm(stages, desc="pruning", unit="stage")


def _run(
    names,
    kernels_in,
    collect_fn,
    get_kernel,
    set_kernel,
    batches,
    method,
    sparsity,
    groups,
    progress,
    opts,
    owl=None,
):
    pattern = parse_sparsity(sparsity)
    for name in names:
        check_nm_fits(f"kernel of layer {name!r}", kernels_in[name], pattern)
    targets = _owl_targets(names, kernels_in, collect_fn, get_kernel, batches, sparsity, owl)
    need_hessian = method == "sparsegpt" or (
        method == "dsnot" and opts["dsnot_init"] == "sparsegpt"
    )
    masks, report = {}, {}
    stages = _stages(names, groups)
    bar = _progress(stages, bool(progress))
    for stage in bar:
        t0 = time.perf_counter()
        stats = None
        if method != "magnitude":
            stats = {
                n: init_activation_stats(kernels_in[n][0], hessian=need_hessian) for n in stage
            }
            collect = collect_fn(tuple(stage))
            for batch in batches:
                stats = collect(stats, batch)
        for n in stage:
            target = sparsity if targets is None else targets[n][0]
            kernel, mask = prune_layer(
                method, get_kernel(n), None if stats is None else stats[n], target, name=n, **opts
            )
            set_kernel(n, kernel)
            masks[n] = mask
            report[n] = {
                "shape": tuple(kernels_in[n]),
                "sparsity": 1.0 - float(jnp.mean(mask)),
                "tokens": 0 if stats is None else int(stats[n].count),
                "seconds": time.perf_counter() - t0,
            }
            if targets is not None:
                report[n]["target_sparsity"], report[n]["outlier_ratio"] = targets[n]
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(stage[-1])
        elif progress:
            print(
                f"pruned {', '.join(stage)} ({method}, {time.perf_counter() - t0:.2f}s)", flush=True
            )
    return masks, report


def _owl_targets(names, kernels_in, collect_fn, get_kernel, batches, sparsity, owl):
    """OWL: layer name -> (sparsity, its block's outlier ratio), from one pass over the dense model."""
    if owl is None:
        return None
    if not isinstance(owl, OWL):
        raise TypeError(f"`owl` must be None or a jaxsparse.posttraining.OWL; got {owl!r}.")
    if parse_sparsity(sparsity).is_nm:
        raise ValueError(
            f"`owl` sets a per-layer unstructured sparsity; it cannot be combined with N:M "
            f"`sparsity`={sparsity!r}."
        )
    if not isinstance(batches, Sequence) or len(batches) == 0:
        raise ValueError(
            "`owl` needs calibration `batches` (the outlier ratios use activation norms)."
        )
    stats = {n: init_activation_stats(kernels_in[n][0], hessian=False) for n in names}
    collect = collect_fn(tuple(names))
    for batch in batches:
        stats = collect(stats, batch)
    block = owl.block or (lambda n: n)
    members: dict = {}
    for n in names:
        members.setdefault(block(n), []).append(n)
    ratios = {
        b: outlier_ratio([get_kernel(n) for n in ns], [stats[n].sq_sum for n in ns], owl.threshold)
        for b, ns in members.items()
    }
    per_block = owl_sparsities(ratios, sparsity, owl.lam)
    return {n: (per_block[block(n)], ratios[block(n)]) for n in names}


def _check_common(method, batches, layers_filter):
    v.check_choice("method", method, METHODS)
    if method != "magnitude" and (not isinstance(batches, Sequence) or len(batches) == 0):
        raise ValueError(
            f"`batches` must be a non-empty sequence of calibration batches (it is iterated once per stage); "
            f"got {type(batches).__name__}."
        )
    if layers_filter is not None and not callable(layers_filter):
        raise TypeError(f"`layers` must be a callable name -> bool or None; got {layers_filter!r}.")


def _select(found: list[str], layers_filter) -> list[str]:
    names = [n for n in found if layers_filter is None or layers_filter(n)]
    if not names:
        raise ValueError(
            f"no prunable Dense layers selected; the model's 2-D Dense kernels are {found}."
        )
    return names


def _trace_first_batch(fn, params, batch) -> None:
    try:
        jax.eval_shape(fn, params, batch)
    except (
        Exception
    ) as e:  # a model that cannot consume the calibration data: say which argument is wrong
        shapes = jax.tree.map(lambda a: getattr(a, "shape", type(a).__name__), batch)
        raise ValueError(
            f"`batches[0]` (shapes {shapes}) could not be run through the model: {type(e).__name__}: {e}. "
            "Calibration batches must be valid model inputs (e.g. the right feature width)."
        ) from e


# ------------------------------------------------------------------------------------------------ NNX
def _nnx_tap(module, on_input):
    base = type(module)

    def call(self, x, *args, **kwargs):
        on_input(x)
        return base.__call__(self, x, *args, **kwargs)

    module.__class__ = type(f"Tapped{base.__name__}", (base,), {"__call__": call})


def _call_model(model, batch):
    return model(batch)


def _nnx_linear_nodes(m) -> dict:
    from flax import nnx

    return {
        "/".join(map(str, p)): node
        for p, node in nnx.iter_graph(m)
        if isinstance(node, nnx.Linear) and node.kernel[...].ndim == 2
    }


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _nnx_collect(st, stats, batch, graphdef, stage, forward):
    """One calibration pass; a module-level jit so repeated runs with the same model and stage reuse it."""
    from flax import nnx

    stats = dict(stats)
    mm = nnx.merge(graphdef, st)
    nodes = _nnx_linear_nodes(mm)
    for name in stage:

        def on_input(x, name=name):
            stats[name] = update_activation_stats(stats[name], x)

        _nnx_tap(nodes[name], on_input)
    forward(mm, batch)
    return stats


def prune_nnx(
    model: Any,
    batches: Sequence[Any],
    *,
    method: str = "wanda",
    sparsity: float | tuple[int, int] = 0.5,
    forward: Callable[[Any, Any], Any] | None = None,
    layers: Callable[[str], bool] | None = None,
    groups: Sequence[Sequence[str]] | str | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    dsnot_init: str = "wanda",
    dsnot_options: dict | None = None,
    owl: OWL | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prunes the ``nnx.Linear`` kernels of an NNX ``model`` layer by layer; the input model is not modified.

    ``batches``: calibration inputs, each passed as ``forward(model, batch)`` (default ``model(batch)``; pass
    the same ``forward`` object across calls to reuse compiled calibration passes).
    ``method``: one of :data:`METHODS`. ``sparsity``: a fraction or ``(n, m)``. ``layers``: filter on layer names
    (``"blocks/0/mlp/fc1"``-style paths); e.g. ``lambda n: n != "head"``. ``groups``: ``None`` (one layer per
    stage), ``"all"`` (one stage, every layer calibrated on the dense model) or lists of layer names.
    ``owl``: an :class:`~jaxsparse.posttraining.owl.OWL` for outlier-weighted layer-wise sparsity (unstructured
    ``sparsity`` only): one extra pass collects the dense model's activation norms, each block's sparsity comes
    from :func:`~jaxsparse.posttraining.owl.owl_sparsities` (their mean is ``sparsity``), and the report gains
    ``"target_sparsity"`` and ``"outlier_ratio"`` per layer.

    Args:
      model: the NNX model (not modified; a copy is pruned).
      batches: a sequence of calibration inputs, iterated once per stage (may be empty for ``"magnitude"``).
      method: one of :data:`METHODS`.
      sparsity: a fraction in ``[0, 1)`` (unstructured) or an ``(n, m)`` pair (N:M along the input axis, ``m``
        dividing ``in_features``).
      forward: ``forward(model, batch)``; default ``model(batch)``.
      layers: ``name -> bool`` selecting the ``nnx.Linear`` layers to prune; default all 2-D kernels.
      groups: ``None``, ``"all"`` or a partition of (a subset of) the selected layer names into stages.
      blocksize: SparseGPT's column block size.
      damp: SparseGPT's dampening.
      dsnot_init: DSnoT's initial method.
      dsnot_options: keyword arguments of :func:`dsnot_prune`.
      owl: an :class:`~jaxsparse.posttraining.owl.OWL`, or ``None`` for the same sparsity in every layer.
      progress: show a progress bar (``tqdm`` when installed, else one line per stage).

    Returns:
      A :class:`PruneResult`: the pruned model, the keep mask and a report entry per layer name.

    Raises:
      ValueError: an unknown ``method``, empty ``batches`` for a calibrated method, a first batch the model
        cannot run, no layer selected, bad ``groups`` or ``sparsity``, ``owl`` with N:M, or an error of the pruner.
      TypeError: ``layers`` is not callable or ``owl`` is not an ``OWL``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> mlp = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 4, rngs=nnx.Rngs(1)))
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (32, 8))
      >>> res = prune_nnx(mlp, [x], method="sparsegpt", sparsity=(2, 4), progress=False)
      >>> sorted(res.masks), [r["sparsity"] for r in res.report.values()]
      (['layers/0', 'layers/2'], [0.5, 0.5])
    """
    from flax import nnx

    _check_common(method, batches, layers)
    forward = forward or _call_model
    graphdef, state = nnx.split(model)
    work = nnx.merge(graphdef, state, copy=True)

    linear_nodes = _nnx_linear_nodes

    def call_order(st, batch):
        order = []
        mm = nnx.merge(graphdef, st)
        for name, node in linear_nodes(mm).items():
            _nnx_tap(node, lambda x, name=name: order.append(name))
        forward(mm, batch)
        return order

    if batches:
        found = []
        _trace_first_batch(lambda st, b: found.extend(call_order(st, b)) or 0, state, batches[0])
        found = list(dict.fromkeys(found))
    else:
        found = list(linear_nodes(work))
    names = _select(found, layers)
    nodes = linear_nodes(work)
    shapes = {n: tuple(nodes[n].kernel[...].shape) for n in names}

    def collect_fn(stage):
        st = nnx.state(work)
        return lambda stats, batch: _nnx_collect(st, stats, batch, graphdef, stage, forward)

    def set_kernel(name, value):
        nodes[name].kernel[...] = value

    opts = dict(blocksize=blocksize, damp=damp, dsnot_init=dsnot_init, dsnot_options=dsnot_options)
    masks, report = _run(
        names,
        shapes,
        collect_fn,
        lambda n: nodes[n].kernel[...],
        set_kernel,
        batches,
        method,
        sparsity,
        groups,
        progress,
        opts,
        owl,
    )
    return PruneResult(work, masks, report)


# ------------------------------------------------------------------------------------------------ Linen
def prune_linen(
    module: Any,
    variables: Any,
    batches: Sequence[Any],
    *,
    method: str = "wanda",
    sparsity: float | tuple[int, int] = 0.5,
    forward: Callable[[Any, Any, Any], Any] | None = None,
    layers: Callable[[str], bool] | None = None,
    groups: Sequence[Sequence[str]] | str | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
    dsnot_init: str = "wanda",
    dsnot_options: dict | None = None,
    owl: OWL | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prunes the ``linen.Dense`` kernels of ``module`` with ``variables``; returns new variables in the result.

    Arguments as :func:`prune_nnx`; ``forward(module, variables, batch)`` defaults to
    ``module.apply(variables, batch)``; layer names are the module paths (``"Dense_0"``, ``"block/fc1"``).

    Args:
      module: the Linen module.
      variables: its variables (a dict such as ``{"params": ...}`` from ``module.init``); not modified.
      batches: a sequence of calibration inputs, iterated once per stage (may be empty for ``"magnitude"``).
      method: one of :data:`METHODS`.
      sparsity: a fraction in ``[0, 1)`` (unstructured) or an ``(n, m)`` pair (N:M along the input axis, ``m``
        dividing ``in_features``).
      forward: ``forward(module, variables, batch)``.
      layers: ``name -> bool`` selecting the ``linen.Dense`` layers to prune; default all 2-D kernels.
      groups: ``None``, ``"all"`` or a partition of (a subset of) the selected layer names into stages.
      blocksize: SparseGPT's column block size.
      damp: SparseGPT's dampening.
      dsnot_init: DSnoT's initial method.
      dsnot_options: keyword arguments of :func:`dsnot_prune`.
      owl: an :class:`~jaxsparse.posttraining.owl.OWL`, or ``None``.
      progress: show a progress bar.

    Returns:
      A :class:`PruneResult` whose ``model`` is the new variables dict.

    Raises:
      TypeError: ``variables`` is not a Linen variables mapping (e.g. an ``nnx.State``: use :func:`prune_nnx`),
        ``layers`` is not callable or ``owl`` is not an ``OWL``.
      ValueError: as :func:`prune_nnx`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> net = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
      >>> variables = net.init(jax.random.PRNGKey(0), jnp.ones((1, 8)))
      >>> res = prune_linen(net, variables, [jnp.ones((4, 8))], method="wanda", sparsity=0.5, progress=False)
      >>> sorted(res.masks)
      ['layers_0', 'layers_2']
    """
    from flax import linen as nn
    from flax import traverse_util
    from flax.core import unfreeze

    _check_common(method, batches, layers)
    if not isinstance(variables, Mapping) or type(variables).__module__.startswith("flax.nnx"):
        raise TypeError(
            "`variables` must be Linen variables (a dict such as {'params': ...} from module.init); got "
            f"{type(variables).__name__}. For an NNX model use prune_nnx(model, batches, ...)."
        )
    forward = forward or (lambda mod, var, b: mod.apply(var, b))
    flat = traverse_util.flatten_dict(unfreeze(variables))

    def dense_name(context) -> str | None:
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, nn.Dense):
            return "/".join(mod.scope.path)
        return None

    order: list[str] = []

    def record(f, args, kwargs, context):
        name = dense_name(context)
        if name is not None:
            order.append(name)
        return f(*args, **kwargs)

    def run_recording(var, batch):
        with nn.intercept_methods(record):
            forward(module, var, batch)
        return 0

    if batches:
        _trace_first_batch(run_recording, variables, batches[0])
    found = list(dict.fromkeys(order))
    if not found:  # magnitude without batches: every 2-D kernel
        found = [
            "/".join(k[1:-1])
            for k, a in flat.items()
            if k[0] == "params" and k[-1] == "kernel" and a.ndim == 2
        ]
    names = _select(found, layers)
    key = lambda n: ("params", *n.split("/"), "kernel")
    shapes = {n: tuple(flat[key(n)].shape) for n in names}

    def collect_fn(stage):
        @jax.jit
        def collect(var, stats, batch):
            stats = dict(stats)

            def tap(f, args, kwargs, context):
                name = dense_name(context)
                if name in stage:
                    stats[name] = update_activation_stats(stats[name], args[0])
                return f(*args, **kwargs)

            with nn.intercept_methods(tap):
                forward(module, var, batch)
            return stats

        var = traverse_util.unflatten_dict(flat)
        return lambda stats, batch: collect(var, stats, batch)

    def set_kernel(name, value):
        flat[key(name)] = value

    opts = dict(blocksize=blocksize, damp=damp, dsnot_init=dsnot_init, dsnot_options=dsnot_options)
    masks, report = _run(
        names,
        shapes,
        collect_fn,
        lambda n: flat[key(n)],
        set_kernel,
        batches,
        method,
        sparsity,
        groups,
        progress,
        opts,
        owl,
    )
    return PruneResult(traverse_util.unflatten_dict(flat), masks, report)
