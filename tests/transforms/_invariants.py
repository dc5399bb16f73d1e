"""Checks of the shared wrapper's invariants, reused by the tests of the second-wave algorithms.

A tiny three-layer MLP in Flax layout, a jitted train step that counts its traces, and checks: pruned weights
exactly zero after every ``apply_updates``, grown weights' Adam moments exactly zero right after the update step,
one compilation for a whole run, and masks/params of a run sharded over 8 CPU devices equal to the unsharded run.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

SIZES = (12, 16, 8, 4)


def mlp_params(key=0, sizes=SIZES):
    keys = jax.random.split(jax.random.PRNGKey(key), len(sizes))
    return {
        f"Dense_{i}": {"kernel": jax.random.normal(keys[i], (a, b)) / a**0.5, "bias": jnp.zeros(b)}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }


def mlp_apply(params, x):
    n = len(params)
    for i in range(n):
        layer = params[f"Dense_{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        x = jax.nn.relu(x) if i < n - 1 else x
    return x


def mlp_loss(params, batch):
    x, y = batch
    return jnp.mean((mlp_apply(params, x) - y) ** 2)


def batch_at(t, n=16, sizes=SIZES):
    key = jax.random.fold_in(jax.random.PRNGKey(123), t)
    x = jax.random.normal(key, (n, sizes[0]))
    return x, jnp.tanh(2 * x[:, : sizes[-1]])


def make_step(tx, traces, loss=mlp_loss):
    @jax.jit
    def step(params, state, batch):
        traces.append(1)
        grads = jax.grad(loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def live(tree):
    return [x for x in jax.tree.leaves(tree, is_leaf=lambda x: x is None) if x is not None]


def zeros_outside(params, masks):
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=lambda x: x is None)):
        if m is not None:
            assert not bool(jnp.any(p[~m] != 0)), "a pruned weight is nonzero"


def run(tx, steps, params=None, batches=batch_at, loss=mlp_loss):
    """Runs ``steps`` jitted steps; returns (params, state, history of (masks_before, masks_after, state_after),
    traces). Checks zeros outside the mask after every step."""
    params = mlp_params() if params is None else params
    state = tx.init(params)
    traces = []
    step = make_step(tx, traces, loss)
    history = []
    for t in range(steps):
        before = state.masks
        params, state = step(params, state, batches(t))
        zeros_outside(params, state.masks)
        history.append((before, state.masks, state))
    return params, state, history, traces


def adam_moments_zero_where_grown(history):
    """For every step where masks grew, the Adam moments at grown positions are exactly 0 afterwards (with the
    skipped step) — returns the number of grown entries checked."""
    checked = 0
    for before, after, state in history:
        adam = state.inner_state[0]
        flat = lambda t: jax.tree.leaves(t, is_leaf=lambda x: x is None)
        for b, a, mu, nu in zip(flat(before), flat(after), flat(adam.mu), flat(adam.nu)):
            if b is None:
                continue
            grown = np.asarray(a & ~b)
            if grown.any():
                checked += int(grown.sum())
                assert not np.asarray(mu)[grown].any() and not np.asarray(nu)[grown].any()
    return checked


def sharded_equals_unsharded(tx, steps, atol=1e-5):
    """Runs ``tx`` on the MLP unsharded and sharded over a (4, 2) mesh of CPU devices: masks bit-identical,
    params close (XLA may fuse the partitioned elementwise optimizer update differently by an ulp)."""
    assert jax.device_count() >= 8
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    params = mlp_params()
    specs = {
        "Dense_0": {"kernel": P("x", "y"), "bias": P()},
        "Dense_1": {"kernel": P("y", "x"), "bias": P()},
        "Dense_2": {"kernel": P("x", None), "bias": P()},
    }
    sharded = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), params, specs)
    ref = run(tx, steps, params)
    got = run(tx, steps, sharded)
    jax.tree.map(np.testing.assert_array_equal, ref[1].masks, got[1].masks)
    for r, g in zip(jax.tree.leaves(ref[0]), jax.tree.leaves(got[0])):
        np.testing.assert_allclose(np.asarray(r), np.asarray(g), atol=atol)
    assert (
        got[1]
        .masks["Dense_0"]["kernel"]
        .sharding.is_equivalent_to(sharded["Dense_0"]["kernel"].sharding, 2)
    )
    return ref, got


_LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def count_lowerings(name):
    """Collects the names of the functions containing ``name`` that JAX lowers (compiles) inside the block."""
    seen = []

    def listener(event, duration, **kwargs):
        if event == _LOWERING and name in str(kwargs.get("fun_name", "")):
            seen.append(kwargs["fun_name"])

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
