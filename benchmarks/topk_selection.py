"""How long does a mask update's selection take? Exact top-k by bit-pattern bisection vs a full sort.

Params of the MLP 784-1024-1024-10 kernels (1.86M weights), float32, keep 20%. Contenders, each jitted and timed
in the same run (median of ``--repeats`` calls):

* ``global_topk_masks``: one threshold over all leaves (32 counting passes + tie bisection), traced k;
* ``topk_masks``: a threshold per leaf, all leaves in one loop, traced k;
* ``argsort``: the sort-based mask (``argsort`` of the concatenated scores, then ranks < k), what a sort-based
  library does for a traced k.

Run: ``python benchmarks/topk_selection.py`` (writes ``benchmarks/results/topk_selection.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import jaxsparse as js

SHAPES = {"Dense_0": (784, 1024), "Dense_1": (1024, 1024), "Dense_2": (1024, 10)}
KEEP = 0.2


def median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def sort_masks(scores: dict, k) -> dict:
    flat = jnp.concatenate([s.ravel() for s in scores.values()])
    ranks = jnp.argsort(jnp.argsort(-flat, stable=True), stable=True)
    keep, out, start = ranks < k, {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.size].reshape(s.shape)
        start += s.size
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "topk_selection.json")
    )
    args = ap.parse_args()
    keys = jax.random.split(jax.random.PRNGKey(0), len(SHAPES))
    scores = {n: jnp.abs(jax.random.normal(k, s)) for k, (n, s) in zip(keys, SHAPES.items())}
    total = sum(s.size for s in scores.values())
    k_total = jnp.int32(int(KEEP * total))
    k_leaf = {n: jnp.int32(int(KEEP * s.size)) for n, s in scores.items()}
    global_fn, leaf_fn, sort_fn = (
        jax.jit(js.global_topk_masks),
        jax.jit(js.topk_masks),
        jax.jit(sort_masks),
    )
    got, ref = global_fn(scores, k_total), sort_fn(scores, k_total)
    assert all(bool((got[n] == ref[n]).all()) for n in scores), (
        "global top-k disagrees with the sort"
    )
    rows = [
        dict(
            method="global_topk_masks",
            ms=median_ms(global_fn, scores, k_total, repeats=args.repeats),
        ),
        dict(
            method="topk_masks (per leaf)",
            ms=median_ms(leaf_fn, scores, k_leaf, repeats=args.repeats),
        ),
        dict(
            method="argsort (global)", ms=median_ms(sort_fn, scores, k_total, repeats=args.repeats)
        ),
    ]
    sort_ms = rows[-1]["ms"]
    print(f"{total:,} weights, keep {KEEP:.0%}")
    print(f"{'method':>24} {'ms':>9} {'vs argsort':>11}")
    for r in rows:
        r["speedup_vs_argsort"] = sort_ms / r["ms"]
        print(f"{r['method']:>24} {r['ms']:9.2f} {r['speedup_vs_argsort']:10.1f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(
                benchmark="topk_selection",
                weights=total,
                keep=KEEP,
                repeats=args.repeats,
                results=rows,
                environment=dict(
                    device=str(jax.devices()[0].device_kind),
                    cpu_count=os.cpu_count(),
                    python=sys.version.split()[0],
                    jax=jax.__version__,
                    date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                ),
            ),
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
