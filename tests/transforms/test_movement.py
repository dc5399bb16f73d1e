"""Movement pruning (hard and soft) and GSM: closed forms of one step, exact counts, the magnitude reduction,
the threshold schedule, and the frozen result on the shared wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _invariants import batch_at, live, mlp_apply, mlp_params, run

import jaxsparse as js
from jaxsparse.transforms.gsm import global_sparse_momentum
from jaxsparse.transforms.movement import (
    init_movement_scores,
    movement_masked,
    movement_masks,
    movement_regularizer,
    movement_schedule,
)


def loss(tree, batch, threshold=0.5, method="topk"):
    x, y = batch
    params = movement_masked(tree["params"], tree["scores"], threshold, method)
    return jnp.mean((mlp_apply(params, x) - y) ** 2)


@pytest.mark.parametrize("method, threshold", [("topk", 0.3), ("sigmoid", 0.4)])
def test_one_sgd_step_moves_scores_by_minus_lr_g_times_w(method, threshold):
    params = mlp_params()
    scores = jax.tree.map(
        lambda s: None if s is None else jax.random.normal(jax.random.PRNGKey(s.size), s.shape),
        init_movement_scores(params),
        is_leaf=lambda x: x is None,
    )
    tree = {"params": params, "scores": scores}
    grads = jax.grad(loss)(tree, batch_at(0), threshold, method)
    effective = movement_masked(params, scores, threshold, method)
    x, y = batch_at(0)
    g_eff = jax.grad(lambda p: jnp.mean((mlp_apply(p, x) - y) ** 2))(effective)
    masks = movement_masks(scores, threshold, method)
    tx = optax.sgd(0.1)
    updates, _ = tx.update(grads, tx.init(tree), tree)
    new = optax.apply_updates(tree, updates)
    for name in params:
        w, g, m = params[name]["kernel"], g_eff[name]["kernel"], masks[name]["kernel"]
        np.testing.assert_allclose(
            new["scores"][name]["kernel"],
            scores[name]["kernel"] - 0.1 * g * w,
            rtol=1e-5,
            atol=1e-7,
        )
        np.testing.assert_allclose(grads["params"][name]["kernel"], g * m, rtol=1e-6, atol=1e-8)


def test_topk_keeps_exactly_int_v_n_and_equals_magnitude_pruning_for_scores_at_abs_w():
    params = mlp_params()
    for v in (0.1, 0.37, 0.5, 1.0):
        masks = movement_masks(jax.tree.map(jnp.abs, params), v)
        for name, m in masks.items():
            assert int(m["kernel"].sum()) == int(v * params[name]["kernel"].size)
            assert int(m["bias"].sum()) == int(v * params[name]["bias"].size)
    scores = jax.tree.map(
        lambda s, p: None if s is None else jnp.abs(p),
        init_movement_scores(params),
        params,
        is_leaf=lambda x: x is None,
    )
    mag = js.magnitude_masks(params, 0.75)
    jax.tree.map(np.testing.assert_array_equal, movement_masks(scores, 0.25), mag)


def test_sigmoid_binarizer_threshold_and_min_elements_floor():
    s = jnp.linspace(-5.0, 5.0, 1000)
    m = movement_masks({"w": s}, 0.5, "sigmoid")["w"]
    np.testing.assert_array_equal(np.asarray(m), np.asarray(s > 0))
    low = movement_masks({"w": s}, 0.9999, "sigmoid")[
        "w"
    ]  # nothing passes: the floor keeps the top int(5)+1
    assert int(low.sum()) == 6 and bool(low[-6:].all())


def test_schedule_closed_form_and_lambda_proportional_to_threshold():
    f = movement_schedule(100, 10, initial_threshold=0.0, final_threshold=0.1, final_lambda=400.0)
    for t in range(0, 101, 7):
        th, lam = (float(x) for x in f(t))
        if t <= 10:
            expected = 0.0
        elif t > 80:
            expected = 0.1
        else:
            expected = 0.1 + (0.0 - 0.1) * (1 - (t - 10) / 70) ** 3
        assert th == pytest.approx(expected, abs=1e-6)
        assert lam == pytest.approx(400.0 * th / 0.1, rel=1e-5, abs=1e-5)
    assert float(movement_regularizer({"a": jnp.zeros(3), "b": jnp.full(5, 100.0)})) == 0.75
    with pytest.raises(ValueError, match="final_threshold"):
        movement_schedule(100, 10, final_threshold=0.0)
    with pytest.raises(ValueError, match="warm-ups"):
        movement_schedule(20, 10)
    with pytest.raises(ValueError, match="method"):
        movement_masks({"w": jnp.ones(3)}, 0.5, "magnitude")


def test_hard_movement_fine_tuning_then_frozen_masks_on_the_wrapper():
    params = mlp_params()
    tree = {"params": params, "scores": init_movement_scores(params)}
    sched = movement_schedule(30, 2, final_threshold=0.2)
    opt = optax.adam(1e-2)
    state = opt.init(tree)

    @jax.jit
    def step(tree, state, t):
        th, _ = sched(t)
        g = jax.grad(loss)(tree, batch_at(t), th)
        u, state = opt.update(g, state, tree)
        return optax.apply_updates(tree, u), state

    for t in range(30):
        tree, state = step(tree, state, t)
    masks = movement_masks(tree["scores"], 0.2)
    for name, m in masks.items():
        assert int(m["kernel"].sum()) == int(0.2 * params[name]["kernel"].size)
    tx = js.fixed_masks(optax.adam(1e-2), masks)
    _, st, _, traces = run(
        tx, 5, params=tree["params"]
    )  # zeros outside the masks are checked every step
    assert sum(int(m.sum()) for m in live(st.masks)) == sum(int(m.sum()) for m in live(masks))
    assert len(traces) == 1


# ------------------------------------------------------------------------------------------------ GSM
def test_gsm_exactly_q_entries_get_the_objective_gradient():
    params = mlp_params()
    grads = jax.grad(lambda p: jnp.mean((mlp_apply(p, batch_at(0)[0]) - batch_at(0)[1]) ** 2))(
        params
    )
    tx = global_sparse_momentum(1.0, 0.1, momentum=0.0, weight_decay=0.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    n = sum(p["kernel"].size for p in params.values())
    nz = sum(int((u["kernel"] != 0).sum()) for u in updates.values())
    assert nz == int(0.1 * n)
    # the kept ones are the top |g * w| over all kernels, and biases keep their full gradient
    scores = np.concatenate(
        [np.abs(np.asarray(grads[k]["kernel"] * params[k]["kernel"])).ravel() for k in params]
    )
    kept = np.concatenate([np.asarray(updates[k]["kernel"] != 0).ravel() for k in params])
    assert scores[kept].min() >= scores[~kept].max()
    for k in params:
        np.testing.assert_array_equal(updates[k]["bias"], -grads[k]["bias"])


def test_gsm_with_ratio_one_is_momentum_sgd_with_weight_decay_and_zero_gradient_decays_geometrically():
    params = mlp_params()
    grads = jax.tree.map(jnp.cos, params)
    gsm = global_sparse_momentum(0.05, 1.0, momentum=0.9, weight_decay=1e-2)
    ref = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.05, momentum=0.9))
    s1, s2 = gsm.init(params), ref.init(params)
    for _ in range(3):
        u1, s1 = gsm.update(grads, s1, params)
        u2, s2 = ref.update(grads, s2, params)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)
    tx = global_sparse_momentum(0.1, 0.5, momentum=0.0, weight_decay=0.5)
    state, p = tx.init(params), params
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(4):
        u, state = tx.update(zeros, state, p)
        p = optax.apply_updates(p, u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b * 0.95**4, rtol=1e-5), p, params)
    with pytest.raises(ValueError, match="nonzero_ratio"):
        global_sparse_momentum(0.1, 0.0)
