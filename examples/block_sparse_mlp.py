"""Train a transformer MLP block (d -> 4d -> d) with block-sparse layers and gradual block pruning.

The sparse model uses :class:`jaxsparse.flax.nnx.BlockSparseLinear`: its stored blocks are the parameters,
forward and backward run on ``pallas_kernels.block_sparse.bsr_matmul``, and block GMP
(:func:`jaxsparse.flax.train.block_gmp_step`) re-packs the layers inside the one compiled train step at a
fixed capacity. The task is regression onto a random dense teacher MLP block. The script reports the loss
and the step time of the sparse model against the same block built from ``nnx.Linear``.

On CPU there is no Pallas kernel, so the sparse layers run on the XLA path (dense fallback or the XLA
gather reference, as the dispatch decides) and the timings say nothing about the kernel speedup; on a
TPU/GPU the same script runs the Pallas kernels.

    .venv/bin/python examples/block_sparse_mlp.py              # d=128, 300 steps, ~1 min on 2 CPU cores
    .venv/bin/python examples/block_sparse_mlp.py --d 1024 --tokens 4096 --block 128   # accelerator sizes
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsparse.flax import BlockSparseLinear, block_gmp_step, block_sparse_weights
from pallas_kernels.block_sparse import plan


class MLPBlock(nnx.Module):
    """``x + fc2(gelu(fc1(layernorm(x))))`` with ``linear`` building the two projections."""

    def __init__(self, d: int, linear, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.fc1 = linear(d, 4 * d, rngs=rngs)
        self.fc2 = linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm(x))))


def make_step(graphdef, tx, prune: dict | None):
    def loss_fn(params, rest, x, y):
        return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2)

    @jax.jit
    def step(params, rest, opt_state, i, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if prune is not None:  # re-pack at fixed capacity on the update grid: no recompilation
            params, rest, opt_state = block_gmp_step(params, rest, opt_state, i, tx=tx, **prune)
        return params, rest, opt_state, loss

    return step


def train(model, args, prune, data_key):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(args.lr)
    opt_state = tx.init(params)
    step = make_step(graphdef, tx, prune)
    teacher = MLPBlock(args.d, nnx.Linear, nnx.Rngs(123))
    losses, times = [], []
    for i in range(args.steps):
        x = jax.random.normal(jax.random.fold_in(data_key, i), (args.tokens, args.d))
        y = teacher(x)
        t0 = time.perf_counter()
        params, rest, opt_state, loss = step(params, rest, opt_state, jnp.int32(i), x, y)
        loss = float(loss)  # blocks until the step is done
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    steady = sorted(times[len(times) // 5 :])  # skip compile + warm-up, median of the rest
    return params, rest, losses, steady[len(steady) // 2], step._cache_size()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--initial-sparsity", type=float, default=0.5)
    ap.add_argument("--final-sparsity", type=float, default=0.9)
    ap.add_argument("--impl", default="auto", choices=["auto", "xla", "dense", "pallas"])
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args()
    platform = jax.default_backend()
    key = jax.random.key(0)

    dense_model = MLPBlock(args.d, nnx.Linear, nnx.Rngs(0))
    density = 1.0 - args.initial_sparsity

    def sparse_linear(i, o, rngs):
        return BlockSparseLinear(
            i, o, block=(args.block, args.block), density=density, impl=args.impl, rngs=rngs
        )

    sparse_model = MLPBlock(args.d, sparse_linear, nnx.Rngs(0))
    end = int(args.steps * 0.7)
    prune = dict(
        final_sparsity=args.final_sparsity,
        initial_sparsity=args.initial_sparsity,
        begin_step=0,
        end_step=end,
        frequency=max(1, end // 10),
    )
    w = sparse_model.fc1.weight
    print(
        f"platform={platform}; fc1 {w.shape} in {w.block} blocks, capacity {w.capacity} of "
        f"{w.grid_shape[0] * w.grid_shape[1]}; bsr_matmul plan for {args.tokens} rows (impl={args.impl!r}): "
        f"{dict(plan(args.tokens, w, impl=args.impl).branches)}"
    )
    if platform == "cpu":
        print(
            "CPU: no Pallas kernel here, the sparse layers run on the XLA path; step times below are not a "
            "kernel speedup (run on a TPU/GPU for that)."
        )

    results = {"platform": platform, "args": vars(args)}
    for name, model, pr in (
        ("dense nnx.Linear", dense_model, None),
        ("block-sparse GMP", sparse_model, prune),
    ):
        params, rest, losses, step_s, compiles = train(model, args, pr, key)
        line = f"{name:18s} loss {losses[0]:.4f} -> {losses[-1]:.4f}   step {step_s * 1e3:7.2f} ms   compiles {compiles}"
        if pr is not None:
            ws = block_sparse_weights(params, rest)
            nnz = {k: f"{int(v.nnz)}/{v.grid_shape[0] * v.grid_shape[1]}" for k, v in ws.items()}
            line += f"   live blocks {nnz}"
        print(line)
        results[name] = {
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "median_step_s": step_s,
            "compiles": compiles,
        }
    d, s = (
        results["dense nnx.Linear"]["median_step_s"],
        results["block-sparse GMP"]["median_step_s"],
    )
    print(
        f"sparse / dense step time: {s / d:.2f}x ({'XLA path on CPU' if platform == 'cpu' else platform})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
