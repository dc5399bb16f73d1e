"""Sparse training on several processes (a TPU pod, a multi-node GPU cluster, or N local CPU processes).

Every process runs this same program. It joins the job, builds a ``(data, model)`` mesh over *all* processes'
devices (one ``data`` row per process, its local devices along ``model``), shards every kernel over both axes,
feeds each process only its own rows of every batch, and trains an MLP with RigL at 90% ERK sparsity (or gradual
magnitude pruning with one global threshold, ``--method gmp``). No process ever holds a whole kernel or a whole
batch; the only values read on the host are scalars (loss, accuracy, nonzero counts).

On one machine, as 2 processes with 4 CPU devices each (loopback only; the launcher stops them after --timeout):

    python -m jaxsparse._launch -n 2 -d 4 examples/multihost.py [--steps 300] [--ckpt /tmp/multihost_ckpt]

On a pod or cluster, start it on every host; ``jaxsparse.distributed_initialize()`` (there
``jax.distributed.initialize()``) finds the coordinator, the process count and this process's id by itself (TPU,
SLURM, Open MPI, ...):

    python examples/multihost.py --ckpt /shared/fs/multihost_ckpt

``--local`` runs it as a single process on whatever devices this process sees. ``--ckpt DIR`` (a new directory on
a file system every process can reach) saves the params and the optimizer state with orbax, every process writing
its own shards, reads them back and checks the round trip on device.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse
from jaxsparse import checkpoint, global_sparsity

FEATURES = 64
HIDDEN = 256
CLASSES = 10
LR = 3e-3


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(HIDDEN)(x))
        x = nn.relu(nn.Dense(HIDDEN)(x))
        return nn.Dense(CLASSES)(x)


def make_mesh() -> Mesh:
    """One ``data`` row per process (its local devices along ``model``)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(
        np.array(devices).reshape(jax.process_count(), jax.local_device_count()), ("data", "model")
    )


def spec(mesh: Mesh, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> NamedSharding:
    """``axes`` for ``shape``, dropping any mesh axis that does not divide its dimension."""
    fit = tuple(a if a is None or d % mesh.shape[a] == 0 else None for d, a in zip(shape, axes))
    return NamedSharding(mesh, P(*fit))


def param_shardings(mesh: Mesh, params) -> dict:
    """Kernels over both axes (rows over ``data``, i.e. across processes; columns over ``model``), alternating
    so that consecutive layers' shardings chain; biases over their kernel's column axis."""
    out = {}
    for i, name in enumerate(sorted(params)):
        axes = ("data", "model") if i % 2 == 0 else ("model", "data")
        kernel = params[name]["kernel"]
        out[name] = {
            "kernel": spec(mesh, kernel.shape, axes),
            "bias": spec(mesh, params[name]["bias"].shape, axes[1:]),
        }
    return out


def teacher(x: np.ndarray) -> np.ndarray:
    """Labels from a fixed random two-layer network (the same on every process)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((FEATURES, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, CLASSES)).astype(np.float32)
    return np.argmax(np.tanh(x @ w1) @ w2, axis=-1).astype(np.int32)


def local_batch(step: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of batch ``step``: generated here, never seen by the other processes."""
    rng = np.random.default_rng([seed, step, jax.process_index()])
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    return x, teacher(x)


def to_global(mesh: Mesh, local: np.ndarray) -> jax.Array:
    """Process-local rows -> one array sharded over ``data`` (rows of process p are block p)."""
    shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, shape)


def make_tx(method: str, sparsity: float, steps: int) -> optax.GradientTransformation:
    adam = optax.adam(LR)
    if method == "rigl":
        return jaxsparse.rigl(
            adam, jaxsparse.budget(sparsity, "erk"), update_every=50, total_steps=steps
        )
    begin, end = steps // 10, steps // 2
    return jaxsparse.gradual_magnitude_pruning(
        adam, sparsity, begin, end, frequency=max(1, (end - begin) // 8), scope="global"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-per-process", type=int, default=64)
    parser.add_argument("--method", choices=("rigl", "gmp"), default="rigl")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--ckpt", default=None, help="new directory for an orbax checkpoint")
    parser.add_argument("--local", action="store_true", help="one process, no jax.distributed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if not args.local:
        jaxsparse.distributed_initialize()  # the launcher's coordinator, else jax.distributed's
    lead = jax.process_index() == 0
    mesh = make_mesh()
    if lead:
        print(
            f"{jax.process_count()} process(es) x {jax.local_device_count()} {jax.devices()[0].platform} "
            f"devices; mesh {dict(mesh.shape)}; jax {jax.__version__}",
            flush=True,
        )

    model = MLP()
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, FEATURES)))["params"]
    shardings = param_shardings(mesh, shapes)
    params = jax.jit(
        lambda key: model.init(key, jnp.zeros((1, FEATURES)))["params"], out_shardings=shardings
    )(jax.random.PRNGKey(args.seed))
    tx = make_tx(args.method, args.sparsity, args.steps)
    state = tx.init(params)
    params = jaxsparse.apply_masks(params, state.masks)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    @jax.jit
    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

    t0 = time.perf_counter()
    for step in range(args.steps):
        if step == 1:
            jax.block_until_ready(params)
            t1 = time.perf_counter()  # after the first step's compilation
        x, y = local_batch(step, args.batch_per_process, args.seed)
        params, state, loss = train_step(params, state, to_global(mesh, x), to_global(mesh, y))
        # One step in flight: on CPU (gloo), steps dispatched far ahead can interleave their collectives and
        # hang; on TPU/GPU this wait costs little at this size.
        loss.block_until_ready()
        if lead and (step % 100 == 0 or step == args.steps - 1):
            print(f"step {step:5d}  loss {float(loss):.4f}", flush=True)
    jax.block_until_ready(params)
    per_step = (time.perf_counter() - t1) / max(args.steps - 1, 1) if args.steps > 1 else 0.0
    x, y = local_batch(10**6, 256, args.seed + 1)
    acc = float(accuracy(params, to_global(mesh, x), to_global(mesh, y)))
    sparsity = global_sparsity(params)  # counted on device; only the counts are fetched
    if lead:
        print(
            f"{args.method}: test accuracy {acc:.3f}, kernel sparsity {sparsity:.3f}, "
            f"{time.perf_counter() - t0:.1f} s ({1e3 * per_step:.1f} ms per step after the first)",
            flush=True,
        )

    if args.ckpt:
        checkpoint.save(args.ckpt, {"params": params, "state": state})
        restored = checkpoint.restore(args.ckpt, {"params": params, "state": state})
        same = jax.jit(
            lambda a, b: jnp.all(
                jnp.stack([jnp.all(u == v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))])
            )
        )({"params": params, "state": state}, restored)
        if not bool(same):
            raise SystemExit(f"checkpoint round trip in {args.ckpt} changed the state")
        if lead:
            print(f"saved and restored {args.ckpt}: identical", flush=True)


if __name__ == "__main__":
    main()
