"""Quickstart: dense training vs gradual magnitude pruning to 90% sparsity, on MNIST-1D (generated locally).

The only change from the dense loop is the optimizer: ``jaxsparse.gradual_magnitude_pruning(optax.adam(...), ...)``.
Prints a table (test accuracy, sparsity, inference FLOPs) and saves a plot to ``examples/out/quickstart.png``.

Run: ``make demo`` (or ``python examples/quickstart.py --steps 3000``).
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from mnist1d.data import get_dataset_args, make_dataset
from tqdm import tqdm

import jaxsparse as js
from jaxsparse import flops, global_sparsity

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


class MLP(nn.Module):
    hidden: int = 512

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


def load_data(seed: int = 0):
    args = get_dataset_args()
    args.num_samples, args.seed = 12000, seed
    d = make_dataset(args)
    mean, std = d["x"].mean(), d["x"].std()
    norm = lambda x: jnp.asarray((x - mean) / std, jnp.float32)
    return norm(d["x"]), jnp.asarray(d["y"]), norm(d["x_test"]), jnp.asarray(d["y_test"])


def train(
    name: str, tx: optax.GradientTransformation, data, steps: int, batch: int = 128, seed: int = 0
):
    x, y, x_test, y_test = data
    model = MLP()
    params = model.init(jax.random.PRNGKey(seed), x[:1])

    def loss_fn(params, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, xb), yb).mean()

    @jax.jit
    def train_step(params, state, key):
        idx = jax.random.randint(key, (batch,), 0, x.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    accuracy = jax.jit(lambda p: jnp.mean(model.apply(p, x_test).argmax(-1) == y_test))
    state = tx.init(params)
    key = jax.random.PRNGKey(seed + 1)
    history = []
    t0 = time.perf_counter()
    for t in (bar := tqdm(range(steps), desc=f"{name:>10}", ncols=90, mininterval=1.0)):
        params, state, loss = train_step(params, state, jax.random.fold_in(key, t))
        if t % 100 == 0 or t == steps - 1:
            history.append((t, float(accuracy(params)), global_sparsity(params)))
            bar.set_postfix(
                loss=f"{float(loss):.3f}",
                acc=f"{history[-1][1]:.3f}",
                sparsity=f"{history[-1][2]:.2f}",
            )
    return params, history, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    data = load_data()
    prune = dict(begin_step=args.steps // 6, end_step=args.steps * 2 // 3, frequency=100)
    runs = {
        "dense": optax.adam(1e-3),
        f"gmp {args.sparsity:.0%}": js.gradual_magnitude_pruning(
            optax.adam(1e-3), args.sparsity, **prune
        ),
    }
    results = {name: train(name, tx, data, args.steps) for name, tx in runs.items()}

    dense_flops = flops(results["dense"][0])[0]
    print(
        f"\n{'run':>10} {'test acc':>9} {'sparsity':>9} {'inference FLOPs':>16} {'vs dense':>9} {'time s':>7}"
    )
    for name, (params, history, seconds) in results.items():
        _, sparse_flops = flops(params)
        print(
            f"{name:>10} {history[-1][1]:9.3f} {global_sparsity(params):9.3f} {sparse_flops:16,.0f} "
            f"{sparse_flops / dense_flops:9.3f} {seconds:7.1f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, (_, history, _) in results.items():
        steps, acc, sparsity = zip(*history)
        ax1.plot(steps, acc, label=name)
        ax2.plot(steps, sparsity, label=name)
    ax1.set(xlabel="step", ylabel="test accuracy", title="MNIST-1D, MLP 40-512-512-10")
    ax2.set(xlabel="step", ylabel="sparsity (weight matrices)", title="Zhu-Gupta cubic schedule")
    ax1.legend(), ax2.legend()
    fig.tight_layout()
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "quickstart.png")
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
