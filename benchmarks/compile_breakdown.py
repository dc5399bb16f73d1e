"""Where the compile time of a sparse training step goes on chains of many small kernels.

Model: ``scale.chain_model(N)`` (N Dense layers of 128x128), adam; the whole step (``scale.make_step``) lowered and
compiled once per variant (seconds, one compile each, in this order):

* ``dense``: adam;
* ``gmp``: ``gradual_magnitude_pruning`` at 80% as shipped;
* ``gmp_identity_rule``: the same wrapper with the mask rule replaced by one returning the masks unchanged (no
  selection, no per-leaf cut of its result);
* ``gmp_no_leak_check``: as shipped, but with the pruned-weights count and its check replaced by a constant 0;
* ``gmp_no_finite_check``: as shipped, but with the gradient finiteness check replaced by a constant True;
* ``gmp_identity_rule_no_leak_check``: both of the first two replacements.

The replacements patch private functions of ``jaxsparse.transforms.common`` while a variant is traced: a diagnostic,
not a configuration. Prints a table and writes ``benchmarks/results/compile_breakdown.json`` (device, versions,
date, load average). Run: ``python benchmarks/compile_breakdown.py [--leaves 256]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))

import scale  # noqa: E402

import jaxsparse as js  # noqa: E402
from jaxsparse.transforms import common  # noqa: E402


def _zero(*args):
    return jnp.zeros((), jnp.int32)


NO_LEAK_CHECK = {"_count_pruned_nonzero_sometimes": _zero, "_raise_if_pruned_nonzero": _zero}


def _gmp(identity_rule: bool = False):
    rule = js.gradual_magnitude_pruning.rule(
        scale.SPARSITY, begin_step=0, end_step=10**9, frequency=100
    )
    if identity_rule:
        rule = rule._replace(update=lambda ctx: (ctx.masks, ctx.extra))
    return common.sparse_training(optax.adam(1e-3), rule)


VARIANTS = {
    "dense": ({}, lambda: optax.adam(1e-3)),
    "gmp": ({}, _gmp),
    "gmp_identity_rule": ({}, lambda: _gmp(identity_rule=True)),
    "gmp_no_leak_check": (NO_LEAK_CHECK, _gmp),
    "gmp_no_finite_check": ({"_all_finite": lambda grads: jnp.ones((), bool)}, _gmp),
    "gmp_identity_rule_no_leak_check": (NO_LEAK_CHECK, lambda: _gmp(identity_rule=True)),
}


def compile_seconds(n: int) -> dict[str, float]:
    params, loss, batch, _ = scale.chain_model(n)
    out = {}
    for name, (patch, make) in VARIANTS.items():
        saved = {attr: getattr(common, attr) for attr in patch}
        for attr, value in patch.items():
            setattr(common, attr, value)
        try:
            tx = make()
            state = tx.init(params)
            step = scale.make_step(tx, None, loss)
            start = time.perf_counter()
            step.lower(params, state, batch).compile()
            out[name] = time.perf_counter() - start
        finally:
            for attr, value in saved.items():
                setattr(common, attr, value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--leaves", type=int, nargs="*", default=[256])
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "compile_breakdown.json"),
    )
    args = ap.parse_args()
    rows = [dict(kernels=n, compile_s=compile_seconds(n)) for n in args.leaves]
    for row in rows:
        dense = row["compile_s"]["dense"]
        print(f"{row['kernels']} kernels of 128x128:")
        for name, seconds in row["compile_s"].items():
            print(f"  {name:34s} {seconds:7.2f} s  {seconds / dense:5.2f}x dense")
    scale.write_results(args.out, "compile_breakdown", rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
