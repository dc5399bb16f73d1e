"""How long does SparseGPT take on one 4096x4096 layer with 64k calibration tokens on this machine?

Measures separately: accumulating the statistics (``X^T X`` plus sums, streamed in chunks through the jitted
``update_activation_stats``) and the pruning sweep (``sparsegpt_prune``, 50% unstructured and 2:4), each with
compile time reported apart from run time. Prints a table and writes
``benchmarks/results/sparsegpt_speed_<platform>.json`` with device, versions, date and the machine's load.

    python benchmarks/sparsegpt_speed.py                 # 4096 x 4096, 65536 tokens
    python benchmarks/sparsegpt_speed.py --dim 1024 --tokens 8192   # quick check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxsparse
from jaxsparse.posttraining import (
    hessian_from_stats,
    init_activation_stats,
    sparsegpt_prune,
    update_activation_stats,
)


def timed(fn, *args):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=8192, help="calibration tokens per update call")
    ap.add_argument("--blocksize", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    d, n, chunk = args.dim, args.tokens, min(args.chunk, args.tokens)

    key = jax.random.PRNGKey(0)
    mix = jax.random.normal(key, (d // 8, d)) / np.sqrt(d // 8)
    make_chunk = jax.jit(
        lambda k: (
            jax.random.normal(k, (chunk, d // 8)) @ mix + 0.1 * jax.random.normal(k, (chunk, d))
        )
    )
    chunks = [
        jax.block_until_ready(make_chunk(jax.random.fold_in(key, i))) for i in range(n // chunk)
    ]
    weight = jax.random.normal(jax.random.PRNGKey(1), (d, d)) / np.sqrt(d)

    update = jax.jit(update_activation_stats)
    stats0 = init_activation_stats(d)
    t = time.perf_counter()
    update.lower(stats0, chunks[0]).compile()
    stats_compile = time.perf_counter() - t
    t = time.perf_counter()
    stats = stats0
    for c in chunks:
        stats = update(stats, c)
    jax.block_until_ready(stats)
    stats_run = time.perf_counter() - t
    hessian = jax.block_until_ready(hessian_from_stats(stats))

    rows = []
    for label, sparsity in [("50%", 0.5), ("2:4", (2, 4))]:
        fn = jax.jit(lambda w, h, s=sparsity: sparsegpt_prune(w, h, s, blocksize=args.blocksize))
        t = time.perf_counter()
        compiled = fn.lower(weight, hessian).compile()
        compile_s = time.perf_counter() - t
        (q, mask), run_s = timed(compiled, weight, hessian)
        rows.append(
            {
                "pattern": label,
                "compile_s": compile_s,
                "prune_s": run_s,
                "density": float(jnp.mean(mask)),
            }
        )

    dev = jax.devices()[0]
    result = {
        "benchmark": "sparsegpt_speed",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": {
            "platform": dev.platform,
            "kind": dev.device_kind,
            "count": jax.device_count(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(),
            "load_average_1_5_15": list(os.getloadavg()),
        },
        "versions": {
            "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
            "jaxsparse": getattr(jaxsparse, "__version__", None),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "layer": {
            "in": d,
            "out": d,
            "calibration_tokens": n,
            "chunk_tokens": chunk,
            "blocksize": args.blocksize,
        },
        "statistics": {
            "compile_s": stats_compile,
            "accumulate_s": stats_run,
            "gflops_per_s": 2.0 * n * d * d / stats_run / 1e9,
        },
        "prune": rows,
    }
    print(
        f"SparseGPT, {d}x{d} layer, {n} calibration tokens, {dev.platform} ({os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f})"
    )
    print(f"{'phase':<28s} {'compile s':>10s} {'run s':>10s}")
    print(f"{'statistics (X^T X + sums)':<28s} {stats_compile:10.2f} {stats_run:10.2f}")
    for r in rows:
        print(f"{'prune ' + r['pattern']:<28s} {r['compile_s']:10.2f} {r['prune_s']:10.2f}")
    out = pathlib.Path(
        args.out
        or pathlib.Path(__file__).parent / "results" / f"sparsegpt_speed_{dev.platform}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
