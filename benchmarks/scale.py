"""Does sparse training stay cheap as the model grows? Compile time, init time and step overhead vs dense.

Models (float32, adam, the whole step jitted, masks at 80% sparsity, mask updates every 100 steps):

* ``leaves_N``: a chain of ``N`` Dense layers of 128x128 (``N`` kernels + ``N`` biases), batch 64;
* ``transformer``: a 12-layer pre-LN transformer tree, d_model 256, MLP 1024, vocab 1024 (148 leaves, 9.7M
  params), batch 8 x 64 tokens; ``transformer_scanned``: the same model with every per-layer leaf stacked along a
  leading layer axis ``(12, ...)`` and the forward a ``lax.scan`` (the ``nn.scan`` / ``nnx.scan`` layout); the
  sparse methods get ``budget(0.8, layer_axis={"layers/": 0})`` so budgets and top-k act per layer slice.

Methods: GMP (magnitude pruning held at 80%, re-evaluated every 100 steps), RigL, SET, 2:4 STE and SR-STE (the N:M
mask recomputed from the weights in the forward on every step). Per (model, method):

* ``compile_s``: lower + compile of the step; ``dense_compile_s`` the same for dense adam;
* ``init_s``: first ``tx.init(params)`` call (eager; includes compiling the jitted selections the first time
  the process sees these shapes), ``init_again_s`` (second call) and ``init_new_tx_s`` (a new transformation's
  first call on the same model); ``inner_init_s``: adam's own ``init`` (eager, first call) for comparison;
* ``median_ratio``: median step time without a mask update / median dense step time (interleaved rounds);
* ``update_ratio``: median time of a mask-update step / median dense step;
* ``mean_ratio``: ``(99 * median + update) / (100 * dense median)``: the mean cost with one update every 100 steps.

The machine these figures come from may be loaded by other processes: every ratio is measured in the same run,
dense interleaved with the sparse configurations, medians. Run:
``python benchmarks/scale.py [--quick] [--leaves 4 16 64 256] [--rounds 5] [--out benchmarks/results/scale.json]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js

SPARSITY = 0.8
UPDATE_EVERY = 100
WIDTH = 128
BATCH = 64
D_MODEL, D_MLP, VOCAB, LAYERS, SEQ, TBATCH = 256, 1024, 1024, 12, 64, 8
METHODS = ("dense", "gmp", "rigl", "set", "ste_2:4", "sr_ste_2:4")


# ------------------------------------------------------------------------------------------------ models
def chain_model(n: int):
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    params = {
        f"Dense_{i}": {
            "kernel": jax.random.normal(keys[i], (WIDTH, WIDTH)) / math.sqrt(WIDTH),
            "bias": jnp.zeros(WIDTH),
        }
        for i in range(n)
    }

    def loss(p, batch):
        x = batch
        for i in range(n):
            x = jnp.tanh(x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"])
        return jnp.mean(jnp.square(x - 0.5))

    batch = jax.random.normal(jax.random.PRNGKey(1), (BATCH, WIDTH))
    return params, loss, batch, False


def _layer_params(key):
    ks = jax.random.split(key, 6)
    d, f = D_MODEL, D_MLP
    return {
        "attn": {
            n: {"kernel": jax.random.normal(k, (d, d)) / math.sqrt(d)}
            for n, k in zip(("q", "k", "v", "o"), ks[:4])
        },
        "mlp_up": {"kernel": jax.random.normal(ks[4], (d, f)) / math.sqrt(d), "bias": jnp.zeros(f)},
        "mlp_down": {
            "kernel": jax.random.normal(ks[5], (f, d)) / math.sqrt(f),
            "bias": jnp.zeros(d),
        },
        "ln1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
        "ln2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
    }


def _ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]


def _block(x, p):
    h = _ln(x, p["ln1"])
    q, k, v = (h @ p["attn"][n]["kernel"] for n in ("q", "k", "v"))
    heads = 4
    b, t, d = q.shape
    q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads), axis=-1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d) @ p["attn"]["o"]["kernel"]
    h = _ln(x, p["ln2"])
    h = jax.nn.gelu(h @ p["mlp_up"]["kernel"] + p["mlp_up"]["bias"])
    return x + h @ p["mlp_down"]["kernel"] + p["mlp_down"]["bias"]


def transformer_model(scanned: bool):
    keys = jax.random.split(jax.random.PRNGKey(0), LAYERS + 2)
    layers = [_layer_params(k) for k in keys[:LAYERS]]
    params = {
        "embed": {"embedding": jax.random.normal(keys[-2], (VOCAB, D_MODEL)) * 0.02},
        "ln_f": {"scale": jnp.ones(D_MODEL), "bias": jnp.zeros(D_MODEL)},
        "head": {"kernel": jax.random.normal(keys[-1], (D_MODEL, VOCAB)) / math.sqrt(D_MODEL)},
    }
    if scanned:
        params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    else:
        params.update({f"layer_{i}": p for i, p in enumerate(layers)})

    def loss(p, tokens):
        x = p["embed"]["embedding"][tokens]
        if scanned:
            x, _ = jax.lax.scan(lambda h, lp: (_block(h, lp), None), x, p["layers"])
        else:
            for i in range(LAYERS):
                x = _block(x, p[f"layer_{i}"])
        logits = _ln(x, p["ln_f"]) @ p["head"]["kernel"]
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    tokens = jax.random.randint(jax.random.PRNGKey(1), (TBATCH, SEQ), 0, VOCAB)
    return params, loss, tokens, scanned


# ------------------------------------------------------------------------------------------------ methods
def make(method: str, scanned: bool) -> tuple[optax.GradientTransformation, Callable | None]:
    adam = optax.adam(1e-3)
    sparsity = js.budget(SPARSITY, layer_axis={"layers/": 0}) if scanned else SPARSITY
    if method == "dense":
        return adam, None
    if method == "gmp":
        tx = js.gradual_magnitude_pruning(
            adam,
            sparsity,
            begin_step=0,
            end_step=10**9,
            frequency=UPDATE_EVERY,
            initial_sparsity=SPARSITY,
        )
        return tx, None
    if method == "rigl":
        return js.rigl(adam, sparsity, update_every=UPDATE_EVERY, end_step=10**9), None
    if method == "set":
        return js.set_training(adam, sparsity, update_every=UPDATE_EVERY, end_step=10**9), None
    if method == "ste_2:4":
        return adam, lambda p: js.ste_nm(p, 2, 4)
    if method == "sr_ste_2:4":
        return optax.chain(js.sr_ste_decay(2, 4, 2e-4), adam), lambda p: js.ste_nm(p, 2, 4)
    raise ValueError(method)


def make_step(tx, hook, loss):
    def step(params, state, batch):
        def f(p):
            return loss(hook(p) if hook is not None else p, batch)

        grads = jax.grad(f)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def bench_model(name: str, model, methods, rounds: int, block: int) -> list[dict]:
    params0, loss, batch, scanned = model
    n_leaves = len(jax.tree.leaves(params0))
    n_params = sum(x.size for x in jax.tree.leaves(params0))
    runs = {}
    for method in methods:
        tx, hook = make(method, scanned)
        params = _copy(params0)
        t0 = time.perf_counter()
        state = tx.init(params)
        jax.block_until_ready(state)
        init_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(tx.init(params))
        init_again_s = time.perf_counter() - t0
        fresh, _ = make(
            method, scanned
        )  # a new transformation for the same model (a sweep, a restart)
        t0 = time.perf_counter()
        jax.block_until_ready(fresh.init(params))
        init_new_tx_s = time.perf_counter() - t0
        step = make_step(tx, hook, loss)
        t0 = time.perf_counter()
        step.lower(params, state, batch).compile()  # calling ``step`` runs this executable
        compile_s = time.perf_counter() - t0
        sparse = hasattr(state, "masks")
        if sparse:  # pruned weights start at zero; start just after an update step
            params = js.apply_masks(params, state.masks)
            state = state._replace(step=jnp.asarray(UPDATE_EVERY + 1, jnp.int32))
        runs[method] = dict(
            step=step,
            params=params,
            state=state,
            times=[],
            update_times=[],
            init_s=init_s,
            init_again_s=init_again_s,
            init_new_tx_s=init_new_tx_s,
            compile_s=compile_s,
            sparse=sparse,
            t=UPDATE_EVERY + 1,
        )
        print(
            f"{name:>20} {method:>10}: compile {compile_s:6.2f} s, init {init_s:6.3f} s "
            f"(again {init_again_s:6.3f} s, new transformation {init_new_tx_s:6.3f} s)",
            flush=True,
        )
    for r in range(rounds):
        for run in runs.values():
            for i in range(block + 1):
                if run["sparse"]:
                    # a mask-update step at the start of every round, then `block` steps without one
                    upd = i == 0
                    run["t"] = (r + 2) * UPDATE_EVERY if upd else run["t"]
                    run["state"] = run["state"]._replace(step=jnp.asarray(run["t"], jnp.int32))
                t0 = time.perf_counter()
                run["params"], run["state"] = run["step"](run["params"], run["state"], batch)
                jax.block_until_ready(run["params"])
                dt = time.perf_counter() - t0
                run["t"] += 1
                if i == 0:
                    if run["sparse"]:
                        run["update_times"].append(dt)
                    continue  # the first step of a round also absorbs the switch between configs
                run["times"].append(dt)
    inner = optax.adam(1e-3)
    params = _copy(params0)
    t0 = time.perf_counter()
    jax.block_until_ready(inner.init(params))
    inner_init_s = time.perf_counter() - t0
    dense = statistics.median(runs["dense"]["times"])
    rows = []
    for method, run in runs.items():
        med = statistics.median(run["times"])
        upd = statistics.median(run["update_times"]) if run["update_times"] else med
        rows.append(
            dict(
                model=name,
                leaves=n_leaves,
                params=n_params,
                method=method,
                compile_s=run["compile_s"],
                dense_compile_s=runs["dense"]["compile_s"],
                init_s=run["init_s"],
                init_again_s=run["init_again_s"],
                init_new_tx_s=run["init_new_tx_s"],
                inner_init_s=inner_init_s,
                median_step_ms=1e3 * med,
                median_ratio=med / dense,
                update_ratio=upd / dense,
                mean_ratio=((UPDATE_EVERY - 1) * med + upd) / (UPDATE_EVERY * dense),
                steps=len(run["times"]),
            )
        )
    return rows


def environment() -> dict:
    return dict(
        device=str(jax.devices()[0].device_kind),
        platform=jax.devices()[0].platform,
        cpu_count=os.cpu_count(),
        load_average_1min=os.getloadavg()[0],
        machine=platform.machine(),
        python=sys.version.split()[0],
        jax=jax.__version__,
        numpy=np.__version__,
        optax=optax.__version__,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # glibc malloc tunables (they decide whether a step's temporary buffer is fresh memory on every step)
        malloc_settings={k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
    )


def write_results(path: str, benchmark: str, rows: list, **settings) -> None:
    """Writes a benchmark's JSON: its name, its settings, the command, :func:`environment` and the rows."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            dict(
                benchmark=benchmark,
                **settings,
                command=" ".join(sys.argv),
                environment=environment(),
                results=rows,
            ),
            f,
            indent=2,
        )


def _write(args, rows) -> None:
    write_results(
        args.out,
        "scale",
        rows,
        sparsity=SPARSITY,
        update_every=UPDATE_EVERY,
        rounds=args.rounds,
        block=args.block,
        quick=args.quick,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 and 16 leaves, 3 rounds of 5 steps")
    ap.add_argument("--leaves", type=int, nargs="*", default=[4, 16, 64, 256])
    ap.add_argument("--no-transformer", action="store_true")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=10, help="non-update steps per config per round")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "scale.json")
    )
    args = ap.parse_args()
    if args.quick:
        args.leaves, args.rounds, args.block = [4, 16], 3, 5
    methods = ["dense"] + [m for m in args.methods if m != "dense"]
    rows = []
    models = [(f"leaves_{n}", lambda n=n: chain_model(n)) for n in args.leaves]
    if not args.no_transformer:
        models += [
            ("transformer", lambda: transformer_model(False)),
            ("transformer_scanned", lambda: transformer_model(True)),
        ]
    big = [m for m in models if m[0] == "leaves_256"]  # the slowest to compile: last
    models = [m for m in models if m[0] != "leaves_256"] + big
    for name, build in models:
        rows += bench_model(name, build(), methods, args.rounds, args.block)
        _write(args, rows)  # after every model, so that an interrupted run keeps what it measured
    cols = ("compile_s", "dense_compile_s", "init_s", "inner_init_s", "median_ratio", "mean_ratio")
    print(f"{'model':>20} {'method':>10} " + " ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print(f"{r['model']:>20} {r['method']:>10} " + " ".join(f"{r[c]:15.3f}" for c in cols))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
