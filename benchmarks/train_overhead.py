"""How much does sparse training cost per step compared with dense training, in the same run?

MLP 784-1024-1024-10 (1.86M params), batch 256, adam, float32, the whole step jitted. Every configuration trains
its own copy; configurations run interleaved in blocks of ``--block`` steps (dense included in every round), so a
slow period of the machine hits all of them alike. Per configuration:

* ``median_ratio``: median time of steps *without* a mask update / median dense step time;
* ``mean_ratio``: mean time over all steps (one mask update every 100 steps) / mean dense step time;
* ``update_step_ms``: median time of the steps that do update masks;
* ``mask_bytes_per_param``: bytes of mask state per parameter of the model (the ``*_packed`` rows keep their masks
  1 bit per weight, ``packed_masks=True``);
* ``compile_s``: time to compile the step.

The ``dense_twin`` row is a control: dense training once more, compiled separately. Its ratio is how far two runs
of the same program land apart in this run, the resolution of every other ratio.

Run: ``python benchmarks/train_overhead.py [--rounds 10] [--out benchmarks/results/train_overhead.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))

import scale  # noqa: E402

import jaxsparse as js  # noqa: E402

SIZES = (784, 1024, 1024, 10)
BATCH = 256
UPDATE_EVERY = 100
SPARSITY = 0.8


def init_params(key: jax.Array) -> dict:
    keys = jax.random.split(key, len(SIZES) - 1)
    return {
        f"Dense_{i}": {
            "kernel": jax.random.normal(k, (a, b)) * (2 / a) ** 0.5,
            "bias": jnp.zeros(b),
        }
        for i, (k, a, b) in enumerate(zip(keys, SIZES[:-1], SIZES[1:]))
    }


def forward(params: dict, x: jax.Array) -> jax.Array:
    for i in range(len(SIZES) - 1):
        layer = params[f"Dense_{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(SIZES) - 2:
            x = jax.nn.relu(x)
    return x


def loss_fn(params: dict, batch: tuple, forward_params: Callable | None) -> jax.Array:
    if forward_params is not None:
        params = forward_params(params)
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()


def configs() -> dict[str, tuple[optax.GradientTransformation, Callable | None]]:
    """name -> (optax transformation, forward-time params hook or None). Hard-mask rows at 80%, updates every 100."""
    adam = optax.adam(1e-3)
    return {
        "dense": (adam, None),
        # a second, separately compiled dense step: its ratio is how far two runs of one program differ here
        "dense_twin": (optax.adam(1e-3), None),
        # magnitude pruning held at 80%: the magnitude mask is re-evaluated every 100 steps (nested)
        "magnitude_80": (
            js.gradual_magnitude_pruning(
                adam,
                SPARSITY,
                begin_step=0,
                end_step=10**9,
                frequency=UPDATE_EVERY,
                initial_sparsity=SPARSITY,
            ),
            None,
        ),
        # dynamic sparse training at 80%, drop-and-grow every 100 steps (end_step far away: updates never stop)
        "static_80": (js.static_sparse(adam, SPARSITY), None),
        "set_80": (
            js.set_training(adam, SPARSITY, update_every=UPDATE_EVERY, end_step=10**9),
            None,
        ),
        "rigl_80": (js.rigl(adam, SPARSITY, update_every=UPDATE_EVERY, end_step=10**9), None),
        # the same two with masks kept 1 bit per weight (packed_masks=True: unpacked inside the masked update)
        "magnitude_80_packed": (
            js.gradual_magnitude_pruning(
                adam,
                SPARSITY,
                begin_step=0,
                end_step=10**9,
                frequency=UPDATE_EVERY,
                initial_sparsity=SPARSITY,
                packed_masks=True,
            ),
            None,
        ),
        "rigl_80_packed": (
            js.rigl(adam, SPARSITY, update_every=UPDATE_EVERY, end_step=10**9, packed_masks=True),
            None,
        ),
        # SRigL: constant fan-in + neuron ablation (per-column top-k on update steps)
        "srigl_80": (js.srigl(adam, SPARSITY, update_every=UPDATE_EVERY, end_step=10**9), None),
        # AC/DC with 100-step compressed / decompressed phases: a mask edge every 100 steps
        "acdc_80": (
            js.acdc(
                adam,
                SPARSITY,
                total_steps=20 * UPDATE_EVERY,
                warmup=0.0,
                compressed=0.05,
                decompressed=0.05,
                cycles_end=1.0,
                final_compressed=0.05,
            ),
            None,
        ),
        # 2:4 straight-through estimators: the mask is recomputed from the weights on every step
        "ste_2:4": (adam, lambda p: js.ste_nm(p, 2, 4)),
        "sr_ste_2:4": (
            optax.chain(js.sr_ste_decay(2, 4, 2e-4), adam),
            lambda p: js.ste_nm(p, 2, 4),
        ),
    }


def make_step(tx: optax.GradientTransformation, hook: Callable | None) -> Callable:
    def step(params, state, batch):
        grads = jax.grad(loss_fn)(params, batch, hook)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def mask_bytes(state: Any, params: Any) -> float:
    masks = getattr(state, "masks", None)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    if masks is None:
        return 0.0
    return sum(m.size * m.dtype.itemsize for m in jax.tree.leaves(masks)) / n_params


def run(rounds: int, block: int, only: list[str] | None) -> list[dict]:
    key = jax.random.PRNGKey(0)
    batches = [
        (
            jax.random.normal(jax.random.fold_in(key, i), (BATCH, SIZES[0])),
            jax.random.randint(jax.random.fold_in(key, 100 + i), (BATCH,), 0, SIZES[-1]),
        )
        for i in range(4)
    ]
    runs = {}
    for name, (tx, hook) in configs().items():
        if only and name not in only and name != "dense":
            continue
        params = init_params(jax.random.PRNGKey(1))
        state = tx.init(params)
        step = make_step(tx, hook)
        t0 = time.perf_counter()
        step.lower(params, state, batches[0]).compile()  # calling ``step`` runs this executable
        compile_s = time.perf_counter() - t0
        runs[name] = dict(
            step=step,
            params=params,
            state=state,
            t=0,
            times=[],
            update_times=[],
            compile_s=compile_s,
            mask_bytes=mask_bytes(state, params),
        )
        print(f"compiled {name:>16} in {compile_s:6.2f} s", flush=True)
    for r in range(rounds):
        for run_ in runs.values():
            for _ in range(block):
                is_update = run_["t"] % UPDATE_EVERY == 0
                batch = batches[run_["t"] % len(batches)]
                t0 = time.perf_counter()
                run_["params"], run_["state"] = run_["step"](run_["params"], run_["state"], batch)
                jax.block_until_ready(run_["params"])
                dt = time.perf_counter() - t0
                if run_["t"] > 0:  # step 0 warms caches
                    (run_["update_times"] if is_update else run_["times"]).append(dt)
                run_["t"] += 1
        print(f"round {r + 1}/{rounds} done", flush=True)
    dense = runs["dense"]
    dense_all = dense["times"] + dense["update_times"]
    rows = []
    for name, run_ in runs.items():
        all_times = run_["times"] + run_["update_times"]
        rows.append(
            dict(
                config=name,
                median_step_ms=1e3 * statistics.median(run_["times"]),
                median_ratio=statistics.median(run_["times"]) / statistics.median(dense["times"]),
                mean_ratio=statistics.fmean(all_times) / statistics.fmean(dense_all),
                update_step_ms=1e3 * statistics.median(run_["update_times"])
                if run_["update_times"]
                else None,
                mask_bytes_per_param=run_["mask_bytes"],
                compile_s=run_["compile_s"],
                steps=len(all_times),
                final_sparsity=js.global_sparsity(run_["params"]),
            )
        )
    return rows


def environment() -> dict:
    """:func:`scale.environment` (device, versions, date, load average, malloc settings) plus jaxlib and flax."""
    import flax

    return dict(
        scale.environment(),
        jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        flax=flax.__version__,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--rounds", type=int, default=10, help="interleaved rounds (each: --block steps per config)"
    )
    ap.add_argument("--block", type=int, default=UPDATE_EVERY)
    ap.add_argument("--only", nargs="*", help="configs to run besides dense")
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "train_overhead.json")
    )
    args = ap.parse_args()
    rows = run(args.rounds, args.block, args.only)
    header = f"{'config':>16} {'step ms':>8} {'median':>7} {'mean':>7} {'update ms':>10} {'mask B/p':>9} {'compile s':>9} {'sparsity':>8}"
    print(header)
    for r in rows:
        upd = f"{r['update_step_ms']:10.1f}" if r["update_step_ms"] is not None else f"{'-':>10}"
        print(
            f"{r['config']:>16} {r['median_step_ms']:8.2f} {r['median_ratio']:7.3f} {r['mean_ratio']:7.3f} {upd} "
            f"{r['mask_bytes_per_param']:9.3f} {r['compile_s']:9.2f} {r['final_sparsity']:8.3f}"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            dict(
                benchmark="train_overhead",
                model="MLP 784-1024-1024-10",
                batch=BATCH,
                optimizer="adam",
                dtype="float32",
                update_every=UPDATE_EVERY,
                rounds=args.rounds,
                block=args.block,
                environment=environment(),
                results=rows,
            ),
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
