"""The composition contract of the sparse wrapper with optax and Flax (issue: "nothing fails silently").

The sparse transform produces the final updates; the wrong order (a transformation after it) raises at the
next step instead of silently losing sparsity. Each test is named after the composition it checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import jaxsparse as js

KEY = jax.random.PRNGKey(0)


def _params():
    k1, k2 = jax.random.split(KEY)
    return {
        "a": {"kernel": jax.random.normal(k1, (8, 4)), "bias": jnp.zeros(4)},
        "b": {"kernel": jax.random.normal(k2, (4, 4)), "bias": jnp.zeros(4)},
    }


def _grads(params, t):
    return jax.tree.map(lambda p: jnp.cos(p + 0.1 * t) + 0.05, params)


def _run(tx, steps=6, params=None, jit=True):
    params = _params() if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for t in range(steps):
        updates, state = update(_grads(params, t), state, params)
        params = optax.apply_updates(params, updates)
    jax.block_until_ready(params)
    return params, state


def _gmp(inner, sparsity=0.5):
    return js.gradual_magnitude_pruning(inner, sparsity, begin_step=0, end_step=2, frequency=1)


def _masks(state):
    """The SparseState inside any wrapper state."""
    found = []

    def visit(x):
        if isinstance(x, js.SparseState):
            found.append(x)
            return True
        return False

    jax.tree.leaves(state, is_leaf=visit)
    assert len(found) == 1
    return found[0]


def _assert_exact_zeros(params, masks):
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=lambda x: x is None)):
        if m is not None:
            assert int(jnp.sum((p != 0) & ~m)) == 0
            assert int(jnp.sum(~m)) > 0


# ------------------------------------------------------------------------------------------------ wrong order
def test_chain_sparse_then_scale_by_learning_rate_raises():
    """Failure 2a: chain(gmp(scale_by_adam), scale_by_learning_rate) left 0 of 32 pruned weights at zero."""
    tx = optax.chain(_gmp(optax.scale_by_adam()), optax.scale_by_learning_rate(1e-2))
    with pytest.raises(Exception, match="outside the masks are not exactly zero"):
        _run(tx)


def test_chain_sparse_then_add_decayed_weights_raises():
    """Failure 2b: chain(rigl(adam), add_decayed_weights) left ~1e-38 instead of 0 at pruned weights."""
    tx = optax.chain(
        js.rigl(optax.adam(1e-2), 0.5, update_every=2, total_steps=10),
        optax.add_decayed_weights(1e-1),
    )
    with pytest.raises(Exception, match="must produce the final updates"):
        _run(tx)


# ------------------------------------------------------------------------------------------------ right orders
def test_sparse_of_chain_keeps_exact_zeros():
    inner = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.add_decayed_weights(1e-1),
        optax.scale_by_adam(),
        optax.scale_by_learning_rate(1e-2),
    )
    params, state = _run(_gmp(inner))
    _assert_exact_zeros(params, state.masks)


def test_chain_clip_then_sparse_keeps_exact_zeros():
    tx = optax.chain(optax.clip_by_global_norm(0.5), _gmp(optax.adamw(1e-2, weight_decay=0.1)))
    params, state = _run(tx)
    _assert_exact_zeros(params, _masks(state).masks)


def test_inject_hyperparams_on_inner_optimizer():
    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1)
    tx = js.rigl(inner, 0.5, update_every=2, total_steps=10)
    params, state = _run(tx)
    _assert_exact_zeros(params, state.masks)
    assert int(state.masks["a"]["kernel"].sum()) == 16  # exact per-leaf count through growth
    assert float(state.inner_state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


def test_inject_hyperparams_on_sparse_transform_traced_sparsity():
    """Failure 6b: inject_hyperparams(gradual_magnitude_pruning) failed with a tree-structure error."""
    tx = optax.inject_hyperparams(
        js.gradual_magnitude_pruning,
        static_args=("begin_step", "end_step", "frequency", "initial_sparsity", "power", "scope"),
    )(optax.sgd(1e-2), sparsity=0.75, begin_step=0, end_step=2, frequency=1)
    params, state = _run(tx)
    masks = _masks(state).masks
    assert int(masks["a"]["kernel"].sum()) == 8 and int(masks["b"]["kernel"].sum()) == 4
    _assert_exact_zeros(params, masks)
    # the sparsity is a hyperparameter: change it in the state and the next pruning follows it
    assert float(state.hyperparams["sparsity"]) == 0.75


def test_multisteps_outside_sparse_schedules_count_optimizer_steps():
    k = 3
    tx = optax.MultiSteps(_gmp(optax.adam(1e-2)), every_k_schedule=k)
    params, state = _run(tx, steps=3 * k)
    sparse = _masks(state)
    assert int(sparse.step) == 3  # one sparse step per optimizer step (k micro-batches)
    _assert_exact_zeros(params, sparse.masks)


def test_sparse_outside_multisteps_schedules_count_calls():
    k = 3
    tx = _gmp(optax.MultiSteps(optax.adam(1e-2), every_k_schedule=k))
    params, state = _run(tx, steps=3 * k)
    assert int(state.step) == 3 * k
    _assert_exact_zeros(params, state.masks)


def _nan_at(t):
    return lambda params, step: jax.tree.map(
        lambda g: jnp.where(step == t, jnp.nan, g), _grads(params, step)
    )


def _run_with_nan(tx, nan_step, steps=6):
    params = _params()
    state = tx.init(params)

    @jax.jit
    def step(params, state, t):
        grads = _nan_at(nan_step)(params, t)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    history = []
    for t in range(steps):
        params, state = step(params, state, jnp.int32(t))
        history.append((params, state))
    return history


def test_apply_if_finite_outside_sparse_skips_whole_step():
    tx = optax.apply_if_finite(
        js.rigl(optax.adam(1e-2), 0.5, update_every=2, total_steps=10), max_consecutive_errors=5
    )
    hist = _run_with_nan(tx, nan_step=2)
    (p1, s1), (p2, s2) = hist[1], hist[2]
    same = jax.tree.map(
        lambda a, b: bool(jnp.array_equal(a, b)), (p1, _masks(s1)), (p2, _masks(s2))
    )
    assert all(jax.tree.leaves(same))  # nothing moved on the NaN step, sparse step counter included
    assert int(s2.notfinite_count) == 1
    final_p, final_s = hist[-1]
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(final_p))
    _assert_exact_zeros(final_p, _masks(final_s).masks)


def test_apply_if_finite_inside_sparse_keeps_masks_on_nan_step():
    """Failure 3b: with sparse_training(apply_if_finite(adam), rigl) the mask rule still ran on NaN."""
    tx = js.rigl(
        optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=5),
        0.5,
        update_every=2,
        total_steps=10,
    )
    hist = _run_with_nan(tx, nan_step=2)  # step 2 is a mask-update step
    (p1, s1), (p2, s2) = hist[1], hist[2]
    for a, b in zip(jax.tree.leaves(s1.masks), jax.tree.leaves(s2.masks)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)
    assert int(s2.step) == 3
    final_p, final_s = hist[-1]
    _assert_exact_zeros(final_p, final_s.masks)
    assert int(final_s.masks["a"]["kernel"].sum()) == 16


# ------------------------------------------------------------------------------------------------ Flax
class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def test_nnx_optimizer_rigl_first_step_and_exact_counts():
    """Failure 1c: with nnx.Optimizer the first step crashed (init saw Variables, update saw arrays)."""
    model = _MLP(nnx.Rngs(0))
    tx = js.rigl(
        optax.adam(1e-2),
        js.budget(0.75, exclude=r"fc2/kernel$"),
        update_every=2,
        total_steps=20,
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(KEY, (4, 8))

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        opt.update(model, grads)
        return loss

    for _ in range(5):
        step(model, opt)
    masks = _masks(nnx.as_pure(opt.opt_state) if hasattr(nnx, "as_pure") else opt.opt_state).masks
    assert masks["fc2"]["kernel"] is None  # the anchored exclude matched the NNX path
    assert int(masks["fc1"]["kernel"].sum()) == 32
    kernel = model.fc1.kernel[...]
    assert int(jnp.sum((kernel != 0) & ~masks["fc1"]["kernel"])) == 0


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(jax.nn.relu(nn.Dense(16)(x)))


def test_linen_train_state_gmp():
    model = _LinenMLP()
    x = jax.random.normal(KEY, (4, 8))
    params = model.init(KEY, x)["params"]
    tx = js.gradual_magnitude_pruning(
        optax.adam(1e-2), js.budget(0.5, exclude=r"Dense_1/kernel$"), 0, 2, 1
    )
    ts = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    @jax.jit
    def step(ts):
        grads = jax.grad(lambda p: jnp.mean(ts.apply_fn({"params": p}, x) ** 2))(ts.params)
        return ts.apply_gradients(grads=grads)

    for _ in range(4):
        ts = step(ts)
    masks = ts.opt_state.masks
    assert masks["Dense_1"]["kernel"] is None
    assert int(masks["Dense_0"]["kernel"].sum()) == 32  # Dense_0 is the (16, 4) layer, built first
    _assert_exact_zeros(ts.params, masks)


# ------------------------------------------------------------------------------------------------ dispatch cost
@pytest.mark.parametrize(
    "make",
    [
        lambda: _gmp(optax.adam(1e-2)),
        lambda: js.rigl(optax.adam(1e-2), 0.5, update_every=2, total_steps=10),
        lambda: js.rigl(optax.adam(1e-2), 0.5, update_every=2, total_steps=10, packed_masks=True),
    ],
    ids=["gmp", "rigl", "rigl_packed"],
)
def test_step_has_no_side_effects_so_jax_keeps_its_fast_dispatch(make):
    """The wrong-order check must not put a side effect in the step: JAX dispatches a program with one (e.g. a
    ``jax.debug.callback``, even in a branch that never runs) by its Python path, which measured 1.71x a dense
    step on chains of 64 and 256 small kernels (``benchmarks/check_overhead.py``). The check itself still raises
    (the wrong-order tests above)."""
    tx, params = make(), _params()
    jaxpr = jax.make_jaxpr(tx.update)(_grads(params, 0), tx.init(params), params)
    assert not jaxpr.effects
    assert "pure_callback" in str(jaxpr)  # the check is in the program
