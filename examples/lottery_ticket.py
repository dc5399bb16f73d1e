"""Iterative magnitude pruning with weight rewinding (lottery tickets) on MNIST-1D.

Each round trains from ``apply_masks(theta_k, mask)`` (the rewound weights) inside a fixed mask (``jaxsparse.fixed_masks``), then prunes 20%
of the remaining weights by global magnitude (``jaxsparse.lottery.imp_masks``). ``theta_k`` is the dense run's
weights at step ``--rewind-step`` (k = 0 is the original lottery ticket). Each round's training loop is a jitted
step; the rounds themselves are a Python loop, as in open_lth. Prints sparsity and test accuracy per round.

Run: ``python examples/lottery_ticket.py --rounds 5 --steps 1500``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from quickstart import MLP, load_data

import jaxsparse as js
from jaxsparse import apply_masks, global_sparsity, imp_masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--rewind-step", type=int, default=100)
    args = ap.parse_args()
    x, y, x_test, y_test = load_data()
    model = MLP(hidden=256)
    params = model.init(jax.random.PRNGKey(0), x[:1])
    loss_fn = lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, xb), yb
    ).mean()
    accuracy = jax.jit(lambda p: jnp.mean(model.apply(p, x_test).argmax(-1) == y_test))

    def train(params, masks, keep_step: int | None):
        tx = js.fixed_masks(optax.adam(1e-3), masks)

        @jax.jit
        def step(params, state, key):
            idx = jax.random.randint(key, (128,), 0, x.shape[0])
            grads = jax.grad(loss_fn)(params, x[idx], y[idx])
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        state, kept = tx.init(params), None
        for t in range(args.steps):
            if t == keep_step:
                kept = params
            params, state = step(params, state, jax.random.PRNGKey(t))
        return params, kept

    print(f"{'round':>5} {'sparsity':>9} {'test acc':>9}")
    no_masks = jax.tree.map(lambda p: None, params)  # round 0 trains dense
    trained, theta_k = train(params, no_masks, args.rewind_step)
    masks = None  # imp_masks starts from dense over the prunable leaves
    print(f"{0:>5} {global_sparsity(trained):9.3f} {float(accuracy(trained)):9.3f}")
    for r in range(1, args.rounds + 1):
        masks = imp_masks(trained, masks, args.fraction)
        trained, _ = train(apply_masks(theta_k, masks), masks, None)
        print(f"{r:>5} {global_sparsity(trained):9.3f} {float(accuracy(trained)):9.3f}", flush=True)


if __name__ == "__main__":
    main()
