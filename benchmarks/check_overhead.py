"""Where the non-update step overhead on chains of small kernels comes from: a ladder from masking by hand to RigL.

Models: ``scale.chain_model(N)`` (N Dense layers of 128x128, batch 64), adam, params and state donated. Per N, the
steps below are timed interleaved (median over ``--steps`` rounds, one step of each per round), each called through
its ``jax.jit`` function as a training loop calls it (JAX's C++ dispatch, where the program allows it). Each rung
adds one thing to the one before it:

* ``dense``: adam;
* ``masked_by_hand``: adam with the gradients and updates masked by ``jnp.where`` (masks carried in the state), the
  floor any sparse wrapper pays;
* ``fixed_masks_no_check``: ``jaxsparse.fixed_masks(adam, masks)`` compiled with the pruned-weights count left out
  (``jaxsparse.transforms.common._leak_check_step`` replaced by a constant False while it is traced): the wrapper's
  state (step, key, one ``mask_slots`` scalar per mask) and masking, no ``lax.cond``;
* ``fixed_masks_no_callback``: the same with the count in its ``lax.cond`` (run every ``LEAK_CHECK_EVERY`` steps)
  but no host callback (``common._raise_if_pruned_nonzero`` replaced by a constant 0);
* ``rigl_no_rule``: ``jaxsparse.rigl(adam, 0.8)``'s state and growth bookkeeping with its ``is_update`` a constant
  False (no mask-update ``lax.cond``), no callback;
* ``rigl_no_growth``: RigL's mask-update ``lax.cond`` (never taken in the run) without the growth bookkeeping
  (``grows`` and ``skip_step_on_update`` False: no zeroed moments, no grown-connection stacks), no callback;
* ``rigl_no_callback``: RigL as shipped but without the callback;
* ``rigl``: RigL as shipped (no mask update during the run); its pruned-weights check raises through a
  ``jax.pure_callback`` in a branch that runs only when weights leaked.

All but the last two are diagnostics built by replacing private functions while they are traced. Records, per
step, the wall time until the result is ready (the ratio vs dense), how long the call took to return (JAX
dispatches asynchronously, so without a host callback the call returns while the step still runs) and the
process CPU time per step (dispatch thread and the step's threads together: what the step costs the machine, less
sensitive than the wall time to other processes' load). Prints a table of ratios vs dense and writes
``benchmarks/results/check_overhead.json`` (device, versions, date, load average). Run: ``python
benchmarks/check_overhead.py [--leaves 64 256] [--steps 30]``.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _rigl_rule(**changes) -> js.MaskAlgorithm:
    return js.rigl.rule(scale.SPARSITY, update_every=10**6, end_step=10**9)._replace(**changes)


@contextlib.contextmanager
def _traced_without(check: bool, callback: bool):
    """While tracing: the pruned-weights count (``check``) and/or its host callback (``callback``) left out."""
    saved = common._leak_check_step, common._raise_if_pruned_nonzero
    if check:
        common._leak_check_step = lambda step, is_update: jnp.zeros((), bool)
    if callback:
        common._raise_if_pruned_nonzero = lambda count, step: jnp.zeros((), jnp.int32)
    try:
        yield
    finally:
        common._leak_check_step, common._raise_if_pruned_nonzero = saved


def bench(n: int, steps: int) -> dict:
    params, loss, batch, _ = scale.chain_model(n)
    adam = optax.adam(1e-3)
    wrap = lambda rule: js.sparse_training(adam, rule)  # noqa: E731
    masks = js.state_masks(wrap(_rigl_rule()).init(params))
    never = lambda step: jnp.zeros((), bool)  # noqa: E731
    # name -> (transformation, leave the count out, leave the callback out)
    ladder = {
        "dense": (adam, False, False),
        "masked_by_hand": (_adam_masked_by_hand(masks), False, False),
        "fixed_masks_no_check": (js.fixed_masks(adam, masks), True, True),
        "fixed_masks_no_callback": (js.fixed_masks(adam, masks), False, True),
        "rigl_no_rule": (wrap(_rigl_rule(is_update=never)), False, True),
        "rigl_no_growth": (
            wrap(_rigl_rule(grows=False, skip_step_on_update=False)),
            False,
            True,
        ),
        "rigl_no_callback": (wrap(_rigl_rule()), False, True),
        "rigl": (wrap(_rigl_rule()), False, False),
    }
    runs, temp_mb = {}, {}
    for name, (tx, no_check, no_callback) in ladder.items():
        p = jax.tree.map(lambda x: x.copy(), params)
        state = jax.tree.map(
            lambda x: x.copy(), tx.init(p)
        )  # donated: no buffer shared between runs
        step = scale.make_step(tx, None, loss)
        with _traced_without(no_check, no_callback):
            compiled = step.lower(p, state, batch).compile()  # later calls of ``step`` run it
        temp_mb[name] = compiled.memory_analysis().temp_size_in_bytes / 2**20
        runs[name] = [step, p, state, []]
    for _ in range(steps):
        for run in runs.values():
            step, p, state, times = run
            c0, t0 = time.process_time(), time.perf_counter()
            p, state = step(p, state, batch)
            returned = time.perf_counter() - t0
            jax.block_until_ready(p)
            times.append((time.perf_counter() - t0, returned, time.process_time() - c0))
            run[1], run[2] = p, state

    def median(name, i):
        return statistics.median(t[i] for t in runs[name][3][1:])

    return dict(
        leaves=n,
        dense_ms=1e3 * median("dense", 0),
        ratios={name: median(name, 0) / median("dense", 0) for name in runs},
        cpu_ratios={name: median(name, 2) / median("dense", 2) for name in runs},
        # median ms until the call returned (JAX dispatches asynchronously: the step may still be running)
        call_returns_ms={name: 1e3 * median(name, 1) for name in runs},
        step_ms={name: 1e3 * median(name, 0) for name in runs},
        cpu_ms={name: 1e3 * median(name, 2) for name in runs},
        # the compiled step's temporary buffer, allocated on every call
        temp_mb=temp_mb,
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
    print(
        f"{'step':>24} "
        + " ".join(f"{r['leaves']:>6} kernels: ratio / CPU ratio / returned ms" for r in rows)
    )
    for name in rows[0]["ratios"]:
        print(
            f"{name:>24} "
            + " ".join(
                f"{r['ratios'][name]:>21.3f} / {r['cpu_ratios'][name]:9.3f} / {r['call_returns_ms'][name]:11.1f}"
                f" / {r['temp_mb'][name]:7.1f}"
                for r in rows
            )
        )
    scale.write_results(args.out, "check_overhead", rows, steps=args.steps)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
