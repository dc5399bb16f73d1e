"""Post-training pruning of a small byte-level transformer: dense vs magnitude, Wanda, SparseGPT and DSnoT.

Trains :mod:`char_lm`'s model on the standard library's source for a few hundred steps, then prunes every
projection inside the transformer blocks (the output head stays dense, as in the Wanda/SparseGPT papers) to 50%
unstructured and to 2:4 with each method, calibrating layer by layer on training windows, and reports validation
bits per character. A bar chart and a JSON file go to ``examples/out/``.

    python examples/prune_language_model.py            # ~1-2 min training + ~1 min pruning on 2 CPU cores
    python examples/prune_language_model.py --big --steps 2000
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import char_lm  # noqa: E402

from jaxsparse.posttraining import prune_nnx  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")
PATTERNS = {"50%": 0.5, "2:4": (2, 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="training steps")
    ap.add_argument("--big", action="store_true", help="use char_lm.Config.big()")
    ap.add_argument(
        "--calib-seqs", type=int, default=32, help="calibration windows (of seq_len bytes)"
    )
    ap.add_argument("--val-batches", type=int, default=8, help="validation batches of 32 windows")
    ap.add_argument(
        "--dsnot-threshold",
        type=float,
        default=0.1,
        help="DSnoT update_threshold (per-token units)",
    )
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    )
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cfg = char_lm.Config.big() if args.big else char_lm.Config()
    train_data, val_data = char_lm.train_val_split(char_lm.load_text())
    print(f"data: {len(train_data):,} train / {len(val_data):,} val bytes; model {cfg}")
    graphdef, params = char_lm.train(cfg, train_data, steps=args.steps)
    t_train = time.perf_counter() - t0
    val = char_lm.sequential_batches(val_data, 32, cfg.seq_len, args.val_batches)
    calib = [
        x
        for x, _ in char_lm.sequential_batches(
            train_data, 16, cfg.seq_len, max(1, args.calib_seqs // 16)
        )
    ]
    model = nnx.merge(graphdef, params)

    results = {"dense": {p: char_lm.evaluate_bpc(graphdef, params, val) for p in PATTERNS}}
    seconds = {}
    for method in METHODS:
        results[method] = {}
        for label, sparsity in PATTERNS.items():
            t = time.perf_counter()
            res = prune_nnx(
                model,
                calib,
                method=method,
                sparsity=sparsity,
                layers=lambda n: n != "head",
                dsnot_options={"update_threshold": args.dsnot_threshold},
                progress=False,
            )
            pruned = nnx.to_pure_dict(nnx.state(res.model))
            results[method][label] = char_lm.evaluate_bpc(graphdef, pruned, val)
            seconds[f"{method} {label}"] = time.perf_counter() - t
            print(
                f"{method:>9s} {label}: {results[method][label]:.3f} bits/char ({seconds[f'{method} {label}']:.1f}s)"
            )

    print(
        f"\nvalidation bits per character ({args.steps} training steps, {len(calib) * 16} calibration windows "
        f"of {cfg.seq_len} bytes; head dense)"
    )
    print(f"{'method':>10s} | {'50%':>6s} | {'2:4':>6s}")
    print("-" * 30)
    for method, r in results.items():
        print(f"{method:>10s} | {r['50%']:6.3f} | {r['2:4']:6.3f}")
    print(f"total {time.perf_counter() - t0:.0f}s (training {t_train:.0f}s)")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_language_model.json").write_text(
        json.dumps(
            {"config": vars(args), "model": cfg.__dict__, "bpc": results, "prune_seconds": seconds},
            indent=2,
        )
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; skipped the plot")
        return results
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results)
    xs = np.arange(len(names))
    for i, label in enumerate(PATTERNS):
        ax.bar(xs + (i - 0.5) * 0.38, [results[n][label] for n in names], 0.38, label=label)
    ax.set_xticks(xs, names)
    ax.set_ylabel("validation bits / char")
    ax.set_ylim(min(results["dense"].values()) * 0.9, None)
    ax.set_title("Post-training pruning of a byte-level transformer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "prune_language_model.png", dpi=120)
    print(f"wrote {out / 'prune_language_model.png'}")
    return results


if __name__ == "__main__":
    main()
