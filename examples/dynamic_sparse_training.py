"""Dense vs static vs SET vs RigL at 90% ERK sparsity on MNIST-1D (Greydanus 2020), a few minutes on a laptop CPU.

    python examples/dynamic_sparse_training.py [--steps 3000] [--seeds 3] [--sparsity 0.9]

MNIST-1D is generated locally by the ``mnist1d`` package (``make_dataset(get_dataset_args())``, no download). A
Flax MLP 40-256-256-10 is trained with Adam; the sparse runs wrap the same optimizer:

* ``static_sparse(adam, budget(0.9, "erk"))`` — a random ERK mask, fixed;
* ``set_training(adam, budget(0.9, "erk"), update_every=100, total_steps=T)`` — drop smallest, regrow random;
* ``rigl(adam, budget(0.9, "erk"), update_every=100, total_steps=T)`` — drop smallest, regrow by dense gradient.

The training loop is the ordinary optax one; the only sparse-specific line is ``apply_masks`` once after ``init``.
Prints mean ± std test accuracy over seeds and the FLOPs of training / inference relative to dense (RigL's
accounting: a sparse forward costs ``f_S = sum 2 * nnz`` per example, a step ``3 f_S``, a RigL update step
``2 f_S + f_D``; FLOPs the hardware would do with sparse kernels — this CPU demo multiplies masked dense arrays).
Saves ``examples/out/dynamic_sparse_training.png``.
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from mnist1d.data import get_dataset_args, make_dataset

import jaxsparse
from jaxsparse import rigl, set_training, static_sparse

HIDDEN = 256
BATCH = 128
LR = 2e-3
UPDATE_EVERY = 100
EVAL_EVERY = 250


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(HIDDEN)(x))
        x = nn.relu(nn.Dense(HIDDEN)(x))
        return nn.Dense(10)(x)


def make_tx(method: str, sparsity: float, steps: int, seed) -> optax.GradientTransformation:
    adam = optax.adam(LR)
    erk = jaxsparse.budget(sparsity, "erk")
    if method == "dense":
        return adam
    if method == "static":
        return static_sparse(adam, erk, seed=seed)
    if method == "set":
        return set_training(adam, erk, update_every=UPDATE_EVERY, total_steps=steps, seed=seed)
    if method == "rigl":
        return rigl(adam, erk, update_every=UPDATE_EVERY, total_steps=steps, seed=seed)
    raise ValueError(f"unknown method {method!r}")


def loss_fn(params, x, y):
    logits = MLP().apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(MLP().apply(params, x), -1) == y)


def make_chunk(tx):
    """``EVAL_EVERY`` training steps under one ``jit`` (compiled once per method, reused for every seed)."""

    @jax.jit
    def chunk(params, state, start, seed, x, y, xt, yt):
        def body(carry, t):
            params, state = carry
            idx = jax.random.randint(
                jax.random.fold_in(jax.random.PRNGKey(seed), t), (BATCH,), 0, x.shape[0]
            )
            grads = jax.grad(loss_fn)(
                params, x[idx], y[idx]
            )  # dense gradient (pruned weights are exactly 0)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(body, (params, state), start + jnp.arange(EVAL_EVERY))
        return params, state, accuracy(params, xt, yt)

    return chunk


def train(method, chunk, data, sparsity, steps, seed):
    """One run; returns the test-accuracy curve [(step, acc)], the final masks (None if dense) and params."""
    tx = make_tx(
        method, sparsity, steps, seed
    )  # the seed only matters at init (random mask, PRNG key)
    params = MLP().init(jax.random.PRNGKey(seed), data[0][:1])
    state = tx.init(params)
    if method != "dense":
        params = jaxsparse.apply_masks(
            params, state.masks
        )  # the first forward pass is already sparse
    curve = []
    for start in range(0, steps, EVAL_EVERY):
        params, state, acc = chunk(params, state, start, 10_000 + seed, *data)
        curve.append((start + EVAL_EVERY, float(acc)))
    return curve, (None if method == "dense" else state.masks), params


def flops(masks, params, method, steps):
    """(training, inference) FLOPs relative to dense, by RigL's accounting."""
    kernels = [p for p in jax.tree.leaves(params) if p.ndim == 2]
    f_d = sum(2 * k.size for k in kernels)
    if masks is None:
        return 1.0, 1.0
    f_s = sum(2 * int(m.sum()) for m in jax.tree.leaves(masks))
    f_s += sum(
        2 * k.size
        for k, m in zip(
            jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=lambda v: v is None)
        )
        if m is None and k.ndim == 2
    )
    n_updates = (
        0
        if method in ("static", "set")
        else len(range(UPDATE_EVERY, int(0.75 * steps) + 1, UPDATE_EVERY))
    )
    train_flops = n_updates * (2 * f_s + f_d) + (steps - n_updates) * 3 * f_s
    return train_flops / (3 * f_d * steps), f_s / f_d


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    )
    args = ap.parse_args()
    if args.steps % EVAL_EVERY:
        ap.error(f"--steps must be a multiple of {EVAL_EVERY}")

    t0 = time.time()
    d = make_dataset(get_dataset_args())  # generated locally, no download
    data = tuple(
        jnp.asarray(d[k], dt)
        for k, dt in (
            ("x", jnp.float32),
            ("y", jnp.int32),
            ("x_test", jnp.float32),
            ("y_test", jnp.int32),
        )
    )
    print(
        f"MNIST-1D: {data[0].shape[0]} train / {data[2].shape[0]} test, generated in {time.time() - t0:.1f}s"
    )

    methods = ["dense", "static", "set", "rigl"]
    results = {}
    for method in methods:
        accs, curves, fl = [], [], None
        chunk = make_chunk(make_tx(method, args.sparsity, args.steps, 0))
        for seed in range(args.seeds):
            t = time.time()
            curve, masks, params = train(method, chunk, data, args.sparsity, args.steps, seed)
            accs.append(curve[-1][1])
            curves.append(curve)
            fl = flops(masks, params, method, args.steps)
            print(
                f"  {method:6s} seed {seed}: test acc {accs[-1]:.4f} ({time.time() - t:.1f}s)",
                flush=True,
            )
        results[method] = (np.array(accs), curves, fl)

    sp = f"{args.sparsity:.0%} ERK"
    print(
        f"\nMNIST-1D, MLP 40-{HIDDEN}-{HIDDEN}-10, Adam {LR}, {args.steps} steps x batch {BATCH}, {args.seeds} seeds"
    )
    print(
        "| method | sparsity | test accuracy (mean ± std) | training FLOPs (x dense) | inference FLOPs (x dense) |"
    )
    print("|---|---|---|---|---|")
    for method in methods:
        accs, _, (tr, inf) = results[method]
        label = "dense" if method == "dense" else sp
        print(
            f"| {method} | {label} | {100 * accs.mean():.2f} ± {100 * accs.std():.2f} | {tr:.3f} | {inf:.3f} |"
        )
    print(f"total time {time.time() - t0:.0f}s")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        accs, curves, _ = results[method]
        steps = [s for s, _ in curves[0]]
        c = np.array([[a for _, a in cur] for cur in curves])
        ax.plot(steps, c.mean(0), label=f"{method} ({100 * accs.mean():.1f}%)")
        ax.fill_between(steps, c.mean(0) - c.std(0), c.mean(0) + c.std(0), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MNIST-1D, {sp} sparsity, {args.seeds} seeds")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, "dynamic_sparse_training.png")
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
