"""N:M and annealed sparse training of a small character-level transformer on Python stdlib source.

Four runs with the same model, data, optimizer and step count, differing only in the forward hook applied to
params inside the loss (and, for SR-STE, one extra optax transform):

* ``dense``: no sparsity;
* ``2:4 SR-STE``: ``ste_nm(params, 2, 4)`` forward + ``sr_ste_decay(2, 4)`` before AdamW;
* ``2:4 mask decay``: PGF's ``decayed_nm(params, beta_t, 2, 4)``, ``beta_t`` linear from 1 to 0 over 70% of training;
* ``80% GA``: unstructured magnitude top-k at 80% sparsity with AutoSparse's gradient annealing, ``alpha_t`` from 1 to
  0 over 70% of training.

Sparsity is applied to every projection kernel inside the transformer blocks (qkv, attention output, MLP); the
embeddings, position table and output head stay dense. Validation is reported in bits per character of the
*effective* (sparse) weights, and each sparse result is checked: every group of 4 along the input axis has
exactly 2 nonzeros (N:M), or exactly 80% zeros (GA). A plot of validation bits/char is saved to
``examples/out/nm_transformer.png``.

Run (about 4-6 minutes on 2 CPU cores)::

    python examples/nm_transformer.py            # small config
    python examples/nm_transformer.py --big      # 4 layers, d_model 256, more steps
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import char_lm  # noqa: E402  (the shared example model/data; examples/char_lm.py)

from jaxsparse import (  # noqa: E402
    annealed_topk,
    budget,
    compress_nm,
    decayed_nm,
    decompress_nm,
    gradient_annealing_schedule,
    mask_decay_schedule,
    prunable,
    sr_ste_decay,
    ste_nm,
)

OUT = pathlib.Path(__file__).resolve().parent / "out"
SPARSE = r"blocks/.*/kernel$"  # every projection kernel inside the transformer blocks


def make_step(graphdef, tx, forward):
    """Like ``char_lm.make_train_step`` but the forward hook also sees the (traced) step: ``forward(params, t)``."""

    @jax.jit
    def step(params, opt_state, t, x, y):
        loss, grads = jax.value_and_grad(lambda p: char_lm.loss_fn(graphdef, forward(p, t), x, y))(
            params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def run(
    name,
    cfg,
    data,
    steps,
    batch_size,
    lr,
    forward,
    extra_tx=None,
    final=None,
    eval_every=100,
    seed=0,
):
    train_data, val_batches = data
    graphdef, params = char_lm.init_model(cfg, seed)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps, lr * 0.05)
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    tx = inner if extra_tx is None else optax.chain(extra_tx, inner)
    opt_state = tx.init(params)
    step = make_step(graphdef, tx, forward)
    effective = jax.jit(lambda p, t: forward(p, t) if final is None else final(p))
    val_loss = jax.jit(lambda p, x, y: char_lm.loss_fn(graphdef, p, x, y))

    def evaluate(p):  # char_lm.evaluate_bpc, with the jitted loss built once per run
        return float(np.mean([float(val_loss(p, x, y)) for x, y in val_batches])) / math.log(2.0)

    rng = np.random.default_rng(seed)
    curve, t0 = [], time.time()
    for i in range(steps):
        x, y = char_lm.sample_batch(train_data, rng, batch_size, cfg.seq_len)
        params, opt_state, loss = step(params, opt_state, jnp.int32(i), x, y)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            bpc = evaluate(effective(params, jnp.int32(i + 1)))
            curve.append((i + 1, bpc))
            print(
                f"  [{name}] step {i + 1:5d}  train {float(loss) / math.log(2):.3f}  val {bpc:.3f} bits/char",
                flush=True,
            )
    return effective(params, jnp.int32(steps)), curve, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--big", action="store_true", help="4 layers, d_model 256, seq 256, 3x the steps"
    )
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-bytes", type=int, default=2_000_000)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--only", default=None, help="comma-separated subset of: dense,srste,decay,ga")
    args = ap.parse_args(argv)

    cfg = (
        char_lm.Config.big()
        if args.big
        else char_lm.Config(seq_len=128, d_model=128, n_heads=4, n_layers=2, d_mlp=512)
    )
    steps = args.steps or (1200 if args.big else 300)
    text = char_lm.load_text(args.max_bytes)
    train_data, val_data = char_lm.train_val_split(text)
    val_batches = char_lm.sequential_batches(
        val_data, args.batch_size, cfg.seq_len, args.val_batches
    )
    data = (train_data, val_batches)
    print(
        f"{len(text)} bytes of stdlib source; config {cfg}; {steps} steps, batch {args.batch_size}"
    )

    _, params0 = char_lm.init_model(cfg)
    where = prunable(params0, include=SPARSE)
    decay_end = int(0.7 * steps)
    beta = mask_decay_schedule("linear", end_step=decay_end)
    alpha = gradient_annealing_schedule(decay_end, alpha0=1.0)
    ga_budget = budget(0.8, include=SPARSE)

    runs = {
        "dense": dict(label="dense", forward=lambda p, t: p),
        "srste": dict(
            label="2:4 SR-STE",
            forward=lambda p, t: ste_nm(p, 2, 4, where=where),
            extra_tx=sr_ste_decay(2, 4, 2e-4, where=where),
        ),
        "decay": dict(
            label="2:4 mask decay",
            forward=lambda p, t: decayed_nm(p, beta(t), 2, 4, where=where),
            final=lambda p: ste_nm(p, 2, 4, where=where),
        ),
        "ga": dict(
            label="80% unstructured GA", forward=lambda p, t: annealed_topk(p, alpha(t), ga_budget)
        ),
    }
    chosen = args.only.split(",") if args.only else list(runs)
    results, curves = {}, {}
    for key in chosen:
        spec = dict(runs[key])
        label = spec.pop("label")
        eff, curve, secs = run(
            label, cfg, data, steps, args.batch_size, args.lr, eval_every=max(steps // 5, 1), **spec
        )
        check = ""
        if key in ("srste", "decay"):
            ok = all(
                bool(((eff_l != 0).reshape(eff_l.shape[0] // 4, 4, -1).sum(1) == 2).all())
                for eff_l, mk in zip(
                    jax.tree.leaves(eff), jax.tree.leaves(jax.tree.map(lambda w, s: s, eff, where))
                )
                if mk
            )
            packed = compress_nm(eff, 2, 4, where=where)
            exact = all(
                bool((a == b).all())
                for a, b in zip(jax.tree.leaves(decompress_nm(packed)), jax.tree.leaves(eff))
            )
            check = f"2:4 per group: {ok}; NMWeight round trip exact: {exact}"
        elif key == "ga":
            sel = [w for w, s in zip(jax.tree.leaves(eff), jax.tree.leaves(where)) if s]
            zeros = sum(int((w == 0).sum()) for w in sel) / sum(w.size for w in sel)
            check = f"sparsity of selected kernels: {zeros:.4f}"
        results[label] = dict(val_bpc=curve[-1][1], seconds=round(secs, 1), check=check)
        curves[label] = curve
        print(f"{label}: val {curve[-1][1]:.4f} bits/char in {secs:.0f}s  {check}", flush=True)

    print("\n| run | val bits/char | train time (s) | check |\n|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['val_bpc']:.4f} | {r['seconds']} | {r['check']} |")

    OUT.mkdir(exist_ok=True)
    (OUT / "nm_transformer.json").write_text(
        json.dumps(dict(config=str(cfg), steps=steps, results=results, curves=curves), indent=1)
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, curve in curves.items():
            ax.plot(*zip(*curve), marker="o", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("validation bits / char")
        ax.set_title("char LM on stdlib source: dense vs N:M vs annealed")
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "nm_transformer.png", dpi=120)
        print(f"plot: {OUT / 'nm_transformer.png'}")
    except ImportError:
        print("matplotlib not installed; skipped the plot")


if __name__ == "__main__":
    main()
