"""The computations compared between 2 processes x 4 devices and 1 process x 8 devices.

Used twice: by ``multihost_worker.py`` (run under :func:`jaxsparse._launch.launch`, one copy per process) and
in the pytest process itself (8 local devices, the reference). Every function takes the mesh and builds its
global arrays without any process seeing the whole batch or the whole of a parameter:

* params are sharded over both mesh axes (FSDP rows x tensor-parallel columns), so with the ``data`` axis
  spanning the processes no process can address every shard of any kernel;
* each process feeds only its rows of the batch (``jax.make_array_from_process_local_data``).

Results are returned as global arrays; only the harness (:func:`gather`) brings them to the host.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse
from jaxsparse import checkpoint
from jaxsparse.flax import convert
from jaxsparse.posttraining import (
    init_activation_stats,
    prune_linen,
    update_activation_stats,
)
from jaxsparse.stats import sparsity_summary

FEATURES = (16, 32, 16, 8)  # in -> hidden -> hidden -> classes
BATCH = 16  # global batch; each of the 2 data shards holds 8 rows
STEPS = 8
SPECS = {  # kernels sharded over both axes; biases over "model"
    "Dense_0": P("data", "model"),
    "Dense_1": P("model", "data"),
    "Dense_2": P("data", "model"),
}


def make_mesh() -> Mesh:
    """``(data=2, model=4)``; with 2 processes, ``data`` row ``p`` is process ``p``'s 4 devices."""
    devices = np.array(jax.devices())
    if devices.size != 8:
        raise RuntimeError(f"needs 8 devices in all; got {devices.size}")
    return Mesh(devices.reshape(2, 4), ("data", "model"))


def param_shardings(mesh: Mesh) -> dict:
    return {
        name: {
            "kernel": NamedSharding(mesh, spec),
            "bias": NamedSharding(mesh, P(spec[1])),
        }
        for name, spec in SPECS.items()
    }


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in FEATURES[1:-1]:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(FEATURES[-1])(x)


def init_params(mesh: Mesh) -> dict:
    """Params created on their shardings by a jitted init (identical on every process)."""
    model = MLP()
    x = jnp.zeros((1, FEATURES[0]))
    init = jax.jit(lambda key: model.init(key, x)["params"], out_shardings=param_shardings(mesh))
    return init(jax.random.PRNGKey(0))


def global_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole batch of ``step`` in NumPy (cheap here; a real input pipeline loads only its own rows)."""
    rng = np.random.default_rng(1000 + step)
    x = rng.standard_normal((BATCH, FEATURES[0])).astype(np.float32)
    y = rng.integers(0, FEATURES[-1], BATCH).astype(np.int32)
    return x, y


def feed(mesh: Mesh, array: np.ndarray) -> jax.Array:
    """This process's rows of ``array`` -> a global array sharded over ``data``."""
    sharding = NamedSharding(mesh, P("data"))
    rows = [idx[0] for idx in sharding.addressable_devices_indices_map(array.shape).values()]
    lo = min(r.start or 0 for r in rows)
    hi = max(array.shape[0] if r.stop is None else r.stop for r in rows)
    return jax.make_array_from_process_local_data(sharding, array[lo:hi], array.shape)


def loss_fn(params, x, y):
    logits = MLP().apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def optimizers() -> dict:
    return {
        "gmp_global": jaxsparse.gradual_magnitude_pruning(
            optax.adam(1e-2), 0.75, begin_step=1, end_step=5, frequency=2, scope="global"
        ),
        "rigl_erk": jaxsparse.rigl(
            optax.adam(1e-2),
            jaxsparse.budget(0.8, "erk"),
            update_every=2,
            total_steps=STEPS,
            seed=3,
        ),
    }


def train(mesh: Mesh, tx, steps: int = STEPS):
    """``steps`` sparse-training steps of the sharded MLP; returns ``(params, opt_state)`` (global arrays)."""
    params = init_params(mesh)
    state = tx.init(params)  # eager, on the global params

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(steps):
        x, y = global_batch(t)
        params, state = step(params, state, feed(mesh, x), feed(mesh, y))
        jax.block_until_ready(params)  # one step in flight (see examples/multihost.py)
    return params, state


def sparse_training_runs(mesh: Mesh) -> dict:
    return {
        name: dict(zip(("params", "state"), train(mesh, tx))) for name, tx in optimizers().items()
    }


# ------------------------------------------------------------------------------------------------ post-training
CALIB_BATCHES = 3


def calibration_batches(mesh: Mesh) -> list[jax.Array]:
    return [feed(mesh, global_batch(100 + i)[0]) for i in range(CALIB_BATCHES)]


def first_layer_stats(mesh: Mesh, params: dict) -> dict:
    """Wanda norms and the SparseGPT Hessian sum of the inputs of Dense_0 and Dense_1, from per-process batches."""

    @jax.jit
    def update(params, stats, x):
        h = nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
        return {
            "Dense_0": update_activation_stats(stats["Dense_0"], x),
            "Dense_1": update_activation_stats(stats["Dense_1"], h),
        }

    stats = {
        "Dense_0": init_activation_stats(FEATURES[0]),
        "Dense_1": init_activation_stats(FEATURES[1]),
    }
    for x in calibration_batches(mesh):
        stats = update(params, stats, x)
    return {name: s._asdict() for name, s in stats.items()}


def post_training(mesh: Mesh) -> dict:
    params = init_params(mesh)
    batches = calibration_batches(mesh)
    out = {"stats": first_layer_stats(mesh, params)}
    for method, sparsity in (("wanda", 0.5), ("sparsegpt", (2, 4))):
        res = prune_linen(
            MLP(),
            {"params": params},
            batches,
            method=method,
            sparsity=sparsity,
            groups="all",  # one calibration pass for all layers: fewer programs to compile
            progress=False,
        )
        out[method] = {"params": res.model["params"], "masks": res.masks}
    return out


# ------------------------------------------------------------------------------------------------ harness only
def gather(tree, mesh: Mesh) -> dict[str, np.ndarray]:
    """Host copies of every array leaf, keyed by path (test harness only).

    Arrays no process can fully address are first replicated by one jitted all-gather for the whole tree.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    spread = [
        i
        for i, (_, x) in enumerate(flat)
        if isinstance(x, jax.Array) and not x.is_fully_addressable
    ]
    leaves = [x for _, x in flat]
    if spread:
        whole = jax.jit(lambda *xs: xs, out_shardings=NamedSharding(mesh, P()))(
            *(leaves[i] for i in spread)
        )
        for i, x in zip(spread, whole):
            leaves[i] = x
    return {jax.tree_util.keystr(path): np.asarray(x) for (path, _), x in zip(flat, leaves)}


# ------------------------------------------------------------------------------------------------ parts
def addressability(tree) -> dict:
    """Per leaf: whether this process can address every shard (False for every sharded kernel when the
    mesh's ``data`` axis spans 2 processes)."""
    return jax.tree.map(lambda x: np.asarray(x.is_fully_addressable), tree)


def part_training(mesh: Mesh, out_dir: str) -> dict:
    """Both sparse-training runs; their state saved with orbax (``ckpt_sparse``) and read back."""
    runs = sparse_training_runs(mesh)
    path = os.path.join(out_dir, "ckpt_sparse")
    checkpoint.save(path, runs)
    return {
        "runs": runs,
        "restored": checkpoint.restore(path, runs),
        "fully_addressable": addressability(runs),
        "nnz": {  # jaxsparse.stats on the sharded params: counted on device, only the counts are fetched
            name: {k: np.asarray(v.nnz) for k, v in sparsity_summary(r["params"]).items()}
            for name, r in runs.items()
        },
    }


def part_posttraining(mesh: Mesh, out_dir: str) -> dict:
    return post_training(mesh)


def nm_masks(params: dict) -> dict:
    """2:4 masks (along the input axis) of every kernel, computed on the params' shardings."""
    return jax.jit(
        lambda p: {
            k: {"kernel": jaxsparse.nm_mask(jnp.abs(v["kernel"]), 2, 4), "bias": None}
            for k, v in p.items()
        }
    )(params)


def compressed_shardings(mesh: Mesh, tree: dict) -> dict:
    """N:M values ``[n, K/m, N]`` over both axes, index words over ``model``, the rest replicated."""

    def spec(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim == 3 and "kernel_values" in name:
            return NamedSharding(mesh, P(None, "data", "model"))
        if leaf.ndim == 3:
            return NamedSharding(mesh, P(None, None, "model"))
        if leaf.ndim == 1 and leaf.shape[0] % 4 == 0:
            return NamedSharding(mesh, P("model"))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(spec, tree)


def part_compressed(mesh: Mesh, out_dir: str) -> dict:
    """The compressed N:M format of a 2:4-pruned model, sharded over the mesh, saved with orbax and read back.

    ``convert.compress`` runs here on replicated copies of params and masks (``part_compress_sharded`` runs it
    on the sharded ones; the test compares the two); the compressed arrays are then sharded over both processes
    before saving.
    """
    params = init_params(mesh)
    replicated = NamedSharding(mesh, P())
    rep = jax.jit(lambda t: t, out_shardings=replicated)
    cparams, pattern = convert.compress(rep(params), rep(nm_masks(params)), format="nm")
    tree = {"params": cparams, "pattern": pattern}
    tree = jax.jit(lambda t: t, out_shardings=compressed_shardings(mesh, tree))(tree)
    path = os.path.join(out_dir, "ckpt_compressed")
    checkpoint.save(path, tree)
    dense, masks = convert.decompress(tree["params"], tree["pattern"])
    return {
        "compressed": tree,
        "restored": checkpoint.restore(path, tree),
        "dense": dense,
        "masks": masks,
        "fully_addressable": addressability(tree),
    }


def block_masks(params: dict) -> dict:
    """A 4x4-block mask of ``Dense_0``'s kernel (the blocks whose |w| sum is above the mean block sum), on its
    sharding; ``None`` (dense) for every other leaf."""

    def one(w):
        sums = jnp.abs(w).reshape(w.shape[0] // 4, 4, w.shape[1] // 4, 4).sum((1, 3))
        return jnp.repeat(jnp.repeat(sums > sums.mean(), 4, axis=0), 4, axis=1)

    kernel = jax.jit(one)(params["Dense_0"]["kernel"])
    return {k: {"kernel": kernel if k == "Dense_0" else None, "bias": None} for k in params}


def part_compress_sharded(mesh: Mesh, out_dir: str) -> dict:
    """``convert.compress`` (N:M and block) on params and masks sharded over both processes: the mask checks
    and block counts reach the host only as replicated scalars."""
    params = init_params(mesh)
    out = {}
    for fmt, masks, kw in (("nm", nm_masks, {}), ("block", block_masks, {"block": (4, 4)})):
        mk = masks(params)
        cparams, pattern = convert.compress(params, mk, format=fmt, **kw)
        out[fmt] = {
            "params": cparams,
            "pattern": pattern,
            "masks_fully_addressable": addressability(mk),
        }
    return out


PARTS = {
    "training": part_training,
    "posttraining": part_posttraining,
    "compressed": part_compressed,
    "compress_sharded": part_compress_sharded,
}
