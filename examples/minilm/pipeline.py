"""Prune, compress, serve and recover all-MiniLM-L6-v2: the steps of ``examples/prune_minilm.py``.

* :func:`setup` loads the pretrained model, the tokenizer, calibration windows and evaluation sentences, and
  the dense model's evaluation embeddings.
* :func:`prune` runs ``jaxsparse.posttraining.prune_nnx`` on every Linear of the encoder (embeddings stay
  dense), one stage per q/k/v group, attention output, MLP input and MLP output of each layer, optionally
  with OWL layer-wise sparsity (one block per transformer layer).
* :func:`quality`: mean cosine of pruned vs dense embeddings and retrieval agreement (fraction of evaluation
  sentences whose nearest neighbour among the evaluation set is unchanged).
* :func:`serve`: the pruned model as ``jaxsparse.flax`` N:M or block-sparse layers (``to_sparse_nnx``), the
  largest difference to the masked dense model, bytes before/after, the dispatcher's choice per layer and
  encode throughput dense vs compressed.
* :func:`recover`: a fixed-mask fine-tune (``jaxsparse.fixed_masks`` around ``optax.adamw``) distilling the
  dense model's embeddings of the calibration sentences into the pruned model.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxsparse as js
import jaxsparse.flax as jsf
from jaxsparse import posttraining as pt

from . import data
from . import model as M

LINEAR_KINDS = (
    "attention/query",
    "attention/key",
    "attention/value",
    "attention/out",
    "mlp/fc1",
    "mlp/fc2",
)


@dataclasses.dataclass
class Setup:
    model: M.MiniLM
    tok: Any
    calib: list  # fixed-length token windows (ids, mask) for pruning statistics
    calib_sentences: list[str]  # for the distillation fine-tune
    eval_sentences: list[str]
    eval_batch: tuple[np.ndarray, np.ndarray]
    dense: np.ndarray  # dense embeddings of the evaluation sentences


def setup(
    *,
    num_layers: int | None = None,
    num_eval: int | None = None,
    num_calib_sentences: int | None = None,
    calib_windows: int = 64,
    window: int = 64,
) -> Setup:
    model = M.load_pretrained(num_layers=num_layers)
    tok = data.tokenizer()
    cal, ev = data.split(num_eval=num_eval, num_calib=num_calib_sentences)
    calib = data.calibration_windows(tok, cal, calib_windows, length=window)
    # one padded length for evaluation and fine-tuning sentences: one compile of the encoder per model
    length = data.encode_batch(tok, cal + ev)[0].shape[1]
    batch = data.encode_batch(tok, ev, length=length)
    return Setup(model, tok, calib, cal, ev, batch, embed(model, batch))


def layer_groups(num_layers: int) -> list[list[str]]:
    """Pruning stages: q/k/v together (same input), then the attention output, fc1, fc2 of each layer."""
    groups = []
    for i in range(num_layers):
        p = f"layers/{i}/"
        groups += [[p + "attention/query", p + "attention/key", p + "attention/value"]]
        groups += [[p + "attention/out"], [p + "mlp/fc1"], [p + "mlp/fc2"]]
    return groups


def transformer_block(name: str) -> str:
    """OWL block of a layer name: its transformer layer (``"layers/3/mlp/fc1"`` -> ``"3"``)."""
    return name.split("/")[1]


# ----------------------------------------------------------------------------------------- embeddings
@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def _chunks(batch, batch_size: int = 64):
    """``(ids, mask)`` in chunks of exactly ``batch_size`` rows (the last padded), so one compile serves all."""
    ids, mask = batch
    pad = -len(ids) % batch_size
    ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
    mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), mask.dtype)])
    return [
        (ids[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, len(ids), batch_size)
    ]


def embed(model: nnx.Module, batch, batch_size: int = 64) -> np.ndarray:
    """Embeddings of a padded ``(ids, mask)`` batch, computed ``batch_size`` rows at a time (one compile)."""
    graphdef, state = nnx.split(model)
    out = [_embed(graphdef, state, i, m) for i, m in _chunks(batch, batch_size)]
    return np.asarray(jnp.concatenate(out))[: len(batch[0])]


def nearest(emb: np.ndarray) -> np.ndarray:
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(1)


def quality(emb: np.ndarray, dense: np.ndarray) -> dict[str, float]:
    """``cosine``: mean cosine to the dense embedding; ``retrieval``: nearest-neighbour agreement."""
    cos = (emb * dense).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(dense, axis=1))
    return {
        "cosine": float(cos.mean()),
        "retrieval": float((nearest(emb) == nearest(dense)).mean()),
    }


# ----------------------------------------------------------------------------------------- pruning
def prune(
    s: Setup, method: str, sparsity, *, owl: pt.OWL | None = None, dsnot_options=None
) -> tuple[pt.PruneResult, float]:
    """Prunes every encoder Linear of ``s.model``; returns the driver's result and the seconds it took."""
    t0 = time.perf_counter()
    if owl is not None and owl.block is None:
        owl = owl._replace(block=transformer_block)
    res = pt.prune_nnx(
        s.model,
        s.calib,
        method=method,
        sparsity=sparsity,
        forward=M.forward,
        groups=layer_groups(s.model.cfg.layers),
        owl=owl,
        dsnot_options=dsnot_options,
        progress=False,
    )
    jax.block_until_ready(jax.tree.leaves(nnx.state(res.model)))
    return res, time.perf_counter() - t0


def mask_tree(masks: dict[str, jax.Array]) -> dict:
    """``{"layers/0/mlp/fc1": mask}`` -> the nested ``{..."kernel": mask}`` tree that ``jaxsparse.flax`` takes."""
    tree: dict = {}
    for name, mask in masks.items():
        node = tree
        for k in name.split("/"):
            node = node.setdefault(k, {})
        node["kernel"] = mask
    return tree


def linear_bytes(model: nnx.Module) -> int:
    """Bytes of the encoder's Linear layers as stored (dense kernels, or compressed values + indices), biases
    included."""
    total = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Linear, jsf.NMLinear, jsf.BlockSparseLinear)):
            total += sum(np.asarray(x).nbytes for x in jax.tree.leaves(nnx.state(node)))
    return int(total)


def block_prune(
    model: nnx.Module, sparsity: float, block: tuple[int, int]
) -> tuple[nnx.Module, dict]:
    """Block magnitude pruning: in every encoder Linear keep the ``1 - sparsity`` blocks of largest L2 norm."""
    work = nnx.clone(model)
    masks = {}
    for path, node in nnx.iter_graph(work):
        if isinstance(node, nnx.Linear):
            k = node.kernel[...]
            count = (k.shape[0] // block[0]) * (k.shape[1] // block[1])
            keep = count - int(round(sparsity * count))
            mask = js.block_mask(k, block, keep, pool="l2")
            node.kernel[...] = jnp.where(mask, k, 0.0)
            masks["/".join(map(str, path))] = mask
    return work, masks


# ----------------------------------------------------------------------------------------- serving
def dispatch_choices(model: nnx.Module, rows: int) -> dict[str, int]:
    """How many sparse layers run each backend on this platform for ``rows`` rows (``impl`` as stored)."""
    from pallas_kernels import block_sparse, dispatch
    from pallas_kernels import nm as nm_ops

    platform = dispatch.default_platform()
    counts: dict[str, int] = {}
    for _, node in nnx.iter_graph(model):
        if isinstance(node, jsf.NMLinear):
            plan = nm_ops.plan(rows, node.weight, impl=node.impl)
        elif isinstance(node, jsf.BlockSparseLinear):
            plan = block_sparse.plan(rows, node.weight, impl=node.impl)
        else:
            continue
        branches = dict(getattr(plan, "branches", plan))
        kind = f"{type(node).__name__}: {branches.get(platform, branches['default'])}"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def throughput(models: dict[str, nnx.Module], batch, *, repeats: int = 5) -> dict[str, float]:
    """Sentences per second of each model encoding the first 64-row chunk of ``batch`` (one jitted call, the
    compile :func:`embed` made), models interleaved, median over ``repeats``."""
    ids, mask = (jnp.asarray(a) for a in _chunks(batch)[0])
    fns = {}
    for name, mdl in models.items():
        graphdef, state = nnx.split(mdl)
        fns[name] = (graphdef, state)
        _embed(graphdef, state, ids, mask).block_until_ready()  # compile
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, (graphdef, state) in fns.items():
            t = time.perf_counter()
            _embed(graphdef, state, ids, mask).block_until_ready()
            times[name].append(time.perf_counter() - t)
    return {k: min(len(ids), len(batch[0])) / float(np.median(v)) for k, v in times.items()}


def serve(
    s: Setup,
    pruned: nnx.Module,
    masks: dict[str, jax.Array],
    *,
    format: str,
    n: int = 2,
    m: int = 4,
    block: tuple[int, int] | None = None,
    repeats: int = 5,
    compare_xla: bool = True,
) -> dict:
    """Compresses ``pruned`` into ``jaxsparse.flax`` layers and compares it with the masked dense model.

    The compressed model runs with ``impl="auto"`` (the dispatcher's choice, reported per layer kind); with
    ``compare_xla`` the same layers with ``impl="xla"`` (the sparse XLA reference kernel, forced) are checked
    and timed beside it.
    """
    convert = functools.partial(
        jsf.to_sparse_nnx, pruned, mask_tree(masks), format=format, n=n, m=m, block=block
    )
    models = {"dense": s.model, "compressed": convert(impl="auto")}
    if compare_xla:
        models["compressed_xla"] = convert(impl="xla")
    sparse = models["compressed"]
    ref = embed(pruned, s.eval_batch)
    diff = {
        name.replace("compressed_", "").replace("compressed", "auto"): float(
            np.abs(embed(mdl, s.eval_batch) - ref).max()
        )
        for name, mdl in models.items()
        if name != "dense"
    }
    rows = 64 * s.eval_batch[0].shape[1]
    tp = throughput(models, s.eval_batch, repeats=repeats)
    return {
        "format": format if format == "block" else f"{n}:{m}",
        "max_abs_diff": diff,
        "linear_bytes_dense": linear_bytes(pruned),
        "linear_bytes_compressed": linear_bytes(sparse),
        "model_bytes_dense": M.param_bytes(pruned),
        "model_bytes_compressed": M.param_bytes(sparse),
        "dispatch": dispatch_choices(sparse, rows),
        "rows_per_matmul": rows,
        "sentences_per_s": tp,
        "model": sparse,
    }


# ----------------------------------------------------------------------------------------- recovery
def recover(
    s: Setup,
    pruned: nnx.Module,
    masks: dict[str, jax.Array],
    *,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 1e-4,
    seed: int = 0,
) -> tuple[nnx.Module, list[float]]:
    """Fixed-mask distillation: minimise ``1 - cos(student, dense teacher)`` on the calibration sentences.

    Only the encoder layers train (embeddings frozen); ``js.fixed_masks(optax.adamw(lr), masks)`` keeps every
    pruned weight exactly zero. Returns the fine-tuned model and the loss per step.
    """
    cal_ids, cal_mask = data.encode_batch(s.tok, s.calib_sentences, length=s.eval_batch[0].shape[1])
    teacher = embed(s.model, (cal_ids, cal_mask))
    graphdef, frozen, layers = nnx.split(pruned, _is_frozen, ...)
    params = nnx.to_pure_dict(layers)
    mask_pure = jax.tree.map(lambda _: None, params)
    for (
        name,
        mask,
    ) in masks.items():  # "layers/0/mlp/fc1" -> mask_pure["layers"][0]["mlp"]["fc1"]["kernel"]
        node = mask_pure
        for k in name.split("/"):
            node = node[int(k) if k.isdigit() else k]
        node["kernel"] = jnp.asarray(mask)
    tx = js.fixed_masks(optax.adamw(lr, weight_decay=0.0), mask_pure)
    opt_state = tx.init(params)

    def merged(p):
        st = jax.tree.map(lambda x: x, layers)  # fresh Variables, filled from p
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, frozen, st)

    def loss_fn(p, ids, mask, target):
        emb = merged(p)(ids, mask)
        return jnp.mean(1.0 - jnp.sum(emb * target, axis=-1))

    @jax.jit
    def step(p, opt_state, ids, mask, target):
        loss, g = jax.value_and_grad(loss_fn)(p, ids, mask, target)
        updates, opt_state = tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    n = len(cal_ids)
    losses = []
    for _ in range(steps):
        idx = rng.choice(n, size=min(batch_size, n), replace=False)
        params, opt_state, loss = step(params, opt_state, cal_ids[idx], cal_mask[idx], teacher[idx])
        losses.append(float(loss))
    return merged(params), losses


def _is_frozen(path, node) -> bool:
    return not (path and path[0] == "layers")
