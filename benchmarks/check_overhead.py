"""Where the non-update step overhead on chains of small kernels comes from: the pruned-weights check's callback.

Models: ``scale.chain_model(N)`` (N Dense layers of 128x128, batch 64), adam, params and state donated. Per N, four
steps timed interleaved (median seconds per step over ``--steps`` rounds, one step of each per round), each called
through its ``jax.jit`` function as a training loop calls it (JAX's C++ dispatch, where the program allows it):

* ``dense``: adam;
* ``masked_by_hand``: adam with the gradients and updates masked by ``jnp.where`` (masks carried in the state), the
  floor any sparse wrapper pays;
* ``rigl``: ``jaxsparse.rigl(adam, 0.8)`` as shipped (no mask update during the run); its pruned-weights check
  raises through a ``jax.pure_callback`` in a branch that runs only when weights leaked;
* ``rigl_no_callback``: the same transformation built after replacing the private function holding that callback
  (``jaxsparse.transforms.common._raise_if_pruned_nonzero``) by a constant 0: the count is still computed every
  ``LEAK_CHECK_EVERY`` steps, but no host callback is in the compiled step. A diagnostic only.

Also records, per step, how long the call took to return (JAX dispatches asynchronously, so without a host callback
the call returns while the step still runs). Prints a table of ratios vs dense and writes
``benchmarks/results/check_overhead.json`` (device, versions, date, load average). Run: ``python
benchmarks/check_overhead.py [--leaves 64 256] [--steps 30]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))

import scale  # noqa: E402

import jaxsparse as js  # noqa: E402
from jaxsparse.transforms import common  # noqa: E402


def _none(x) -> bool:
    return x is None


def _adam_masked_by_hand(masks):
    adam = optax.adam(1e-3)

    def init(params):
        return adam.init(params), masks

    def update(grads, state, params):
        inner, m = state
        grads = jax.tree.map(
            lambda k, g: g if k is None else jnp.where(k, g, 0.0), m, grads, is_leaf=_none
        )
        updates, inner = adam.update(grads, inner, params)
        updates = jax.tree.map(
            lambda k, u, p: u if k is None else jnp.where(k, u, -p),
            m,
            updates,
            params,
            is_leaf=_none,
        )
        return updates, (inner, m)

    return optax.GradientTransformation(init, update)


def _rigl():
    return js.rigl(optax.adam(1e-3), scale.SPARSITY, update_every=10**6, end_step=10**9)


def bench(n: int, steps: int) -> dict:
    params, loss, batch, _ = scale.chain_model(n)
    rigl = _rigl()
    masks = js.state_masks(rigl.init(params))
    runs = {}

    def compile_step(
        name, tx
    ):  # traces now: the patch below applies only to what is compiled under it
        p = jax.tree.map(lambda x: x.copy(), params)
        state = tx.init(p)
        step = scale.make_step(tx, None, loss)
        step.lower(p, state, batch).compile()  # later calls of ``step`` run this executable
        runs[name] = [step, p, state, []]

    compile_step("dense", optax.adam(1e-3))
    compile_step("masked_by_hand", _adam_masked_by_hand(masks))
    compile_step("rigl", rigl)
    shipped = common._raise_if_pruned_nonzero
    common._raise_if_pruned_nonzero = lambda count, step: jnp.zeros((), jnp.int32)
    try:
        compile_step("rigl_no_callback", _rigl())
    finally:
        common._raise_if_pruned_nonzero = shipped
    for _ in range(steps):
        for run in runs.values():
            step, p, state, times = run
            t0 = time.perf_counter()
            p, state = step(p, state, batch)
            returned = time.perf_counter() - t0
            jax.block_until_ready(p)
            times.append((time.perf_counter() - t0, returned))
            run[1], run[2] = p, state
    medians = {name: statistics.median(t for t, _ in run[3][1:]) for name, run in runs.items()}
    returned = {name: statistics.median(r for _, r in run[3][1:]) for name, run in runs.items()}
    return dict(
        leaves=n,
        dense_ms=1e3 * medians["dense"],
        ratios={name: m / medians["dense"] for name, m in medians.items()},
        # median ms until the call returned (JAX dispatches asynchronously: the step may still be running)
        call_returns_ms={name: 1e3 * r for name, r in returned.items()},
        step_ms={name: 1e3 * m for name, m in medians.items()},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--leaves", type=int, nargs="*", default=[64, 256])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "check_overhead.json"),
    )
    args = ap.parse_args()
    rows = [bench(n, args.steps) for n in args.leaves]
    names = list(rows[0]["ratios"])
    print(f"{'kernels':>8} {'dense ms':>9} " + " ".join(f"{n:>17}" for n in names))
    for r in rows:
        print(
            f"{r['leaves']:>8} {r['dense_ms']:9.2f} "
            + " ".join(f"{r['ratios'][n]:17.3f}" for n in names)
        )
    print("ms until the call returned / ms per step:")
    for r in rows:
        print(
            f"{r['leaves']:>8} {'':>9} "
            + " ".join(f"{r['call_returns_ms'][n]:8.1f} /{r['step_ms'][n]:7.1f}" for n in names)
        )
    scale.write_results(args.out, "check_overhead", rows, steps=args.steps)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
