"""Dynamic sparse training: static, SET, RigL, SNFS, GraNet (jaxsparse.transforms.dst).

Properties from the spec (§2.3, §3.3, §3.11–3.14): per-leaf nnz constant under drop-and-grow, grown weights and
their optimizer moments exactly zero, growth by the dense gradient passed to ``update``, determinism given the
seed, RigL(alpha=0) == static and GraNet(r=0) == GMP bit for bit, update steps change params only by drop/grow,
one compilation for a whole run, and eager argument checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxsparse
from jaxsparse.transforms.common import sparse_training
from jaxsparse.transforms.dst import (
    _drop_and_grow_rule,
    drop_fraction_schedule,
    granet,
    rigl,
    set_training,
    snfs,
    static_sparse,
)
from jaxsparse.transforms.growth import drop_and_grow, drop_scores, prune_and_regrow
from jaxsparse.transforms.pruning import gradual_magnitude_pruning

KERNELS = ("dense0", "dense1")


def mlp_params(key=0, sizes=(12, 16, 6)):
    k0, k1 = jax.random.split(jax.random.PRNGKey(key))
    return {
        "dense0": {"kernel": jax.random.normal(k0, sizes[:2]) / 3, "bias": jnp.zeros(sizes[1])},
        "dense1": {"kernel": jax.random.normal(k1, sizes[1:]) / 3, "bias": jnp.zeros(sizes[2])},
    }


def loss_fn(params, batch):
    x, y = batch
    h = jax.nn.relu(x @ params["dense0"]["kernel"] + params["dense0"]["bias"])
    out = h @ params["dense1"]["kernel"] + params["dense1"]["bias"]
    return jnp.mean((out - y) ** 2)


def batch_at(t, n=32):
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(123), t))
    x = jax.random.normal(kx, (n, 12))
    return x, jnp.tanh(x[:, :6] * 2.0) + 0.1 * jax.random.normal(ky, (n, 6))


grad_fn = jax.jit(lambda params, t: jax.grad(loss_fn)(params, batch_at(t)))


def make_step(tx, traces=None):
    @jax.jit
    def step(grads, state, params):
        if traces is not None:
            traces.append(1)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def run(tx, steps, step=None, seed_tx=None):
    """Trains with a Python loop over one jitted step; returns params, state and per-step history
    ``((masks, params, state) before, (masks, params, state) after, grads)``. ``seed_tx`` inits the state from
    another transformation (a different seed) while reusing ``step``'s compiled function."""
    params = mlp_params()
    state = (seed_tx or tx).init(params)
    step = step or make_step(tx)
    history = []
    for t in range(steps):
        grads = grad_fn(params, t)
        before = (state.masks, params, state)
        params, state = step(grads, state, params)
        history.append((before, (state.masks, params, state), grads))
    return params, state, history


RIGL_TRACES = []
CONFIGS = {
    "rigl_adamw": lambda seed=1: rigl(
        optax.adamw(1e-2, weight_decay=1e-2),
        jaxsparse.budget(0.8, "erk"),
        update_every=5,
        total_steps=40,
        drop_noise=0.0,
        seed=seed,
    ),
    "rigl_sgd_momentum": lambda: rigl(
        optax.sgd(0.05, momentum=0.9), 0.7, update_every=5, total_steps=40, seed=3
    ),
    "rigl_adam": lambda: rigl(optax.adam(1e-2), 0.7, update_every=5, total_steps=40, seed=3),
    "set": lambda: set_training(
        optax.sgd(0.1, momentum=0.9),
        0.8,
        update_every=5,
        total_steps=40,
        skip_step_on_update=False,
        seed=1,
    ),
    "snfs_per_layer": lambda: snfs(
        optax.sgd(0.05), 0.8, update_every=5, total_steps=40, redistribute=False, seed=1
    ),
    "snfs": lambda: snfs(
        optax.sgd(0.05, momentum=0.9), 0.8, update_every=5, total_steps=40, seed=2
    ),
}
RIGL_INNER = {
    "rigl_adamw": optax.adamw(1e-2, weight_decay=1e-2),
    "rigl_sgd_momentum": optax.sgd(0.05, momentum=0.9),
    "rigl_adam": optax.adam(1e-2),
}
_STEPS = {}
_RUNS = {}


def step_of(name):
    if name not in _STEPS:
        _STEPS[name] = make_step(CONFIGS[name](), RIGL_TRACES if name == "rigl_adamw" else None)
    return _STEPS[name]


def run_of(name, steps=30):
    """One cached 30-step run per configuration (each compiles one step function)."""
    if name not in _RUNS:
        _RUNS[name] = run(CONFIGS[name](), steps, step=step_of(name))
    return _RUNS[name]


def kernel_masks(masks):
    return [np.asarray(masks[k]["kernel"]) for k in KERNELS]


def off_mask_zero(params, masks):
    return all(
        not np.any(np.asarray(params[k]["kernel"])[~np.asarray(masks[k]["kernel"])])
        for k in KERNELS
    )


# ----------------------------------------------------------------------------------------------- nnz invariants
@pytest.mark.parametrize("name", ["rigl_adamw", "set", "snfs_per_layer"])
def test_drop_and_grow_keeps_per_leaf_nnz_and_pruned_weights_zero(name):
    _, _, hist = run_of(name)
    n0 = [m.sum() for m in kernel_masks(hist[0][0][0])]
    changed = 0
    for (m_old, _, _), (m_new, p_new, _), _ in hist:
        assert [m.sum() for m in kernel_masks(m_new)] == n0
        assert m_new["dense0"]["bias"] is None
        assert off_mask_zero(p_new, m_new)
        changed += any((a != b).any() for a, b in zip(kernel_masks(m_old), kernel_masks(m_new)))
    assert changed >= 4  # updates at steps 5, 10, ..., 30 (end 30) actually move connections


def param_shaped_moments(inner_state, shape):
    return [
        np.asarray(x) for x in jax.tree.leaves(inner_state) if getattr(x, "shape", None) == shape
    ]


def first_update(hist, t=5):
    """The update step ``t``: state before and after, its gradient and the grown connections per kernel."""
    (m_old, p_old, s_old), (m_new, p_new, s_new), grads = hist[t]
    grown = [n & ~o for n, o in zip(kernel_masks(m_new), kernel_masks(m_old))]
    return m_old, p_old, s_old, m_new, p_new, s_new, grads, grown


@pytest.mark.parametrize("name", ["rigl_sgd_momentum", "rigl_adam", "rigl_adamw"])
def test_rigl_update_step_only_drops_and_grows_and_zeroes_new_moments(name):
    _, _, hist = run_of(name)
    (m_old, p_old, s_old), _, grads = hist[5]  # step 5 is a mask update
    # Moments at pruned positions are normally ~0 already (they saw masked gradients); make every moment nonzero
    # so that the reset is visible.
    bump = lambda x: x + 1.0 if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2 else x
    s_old = s_old._replace(inner_state=jax.tree.map(bump, s_old.inner_state))
    p_new, s_new = step_of(name)(grads, s_old, p_old)
    grown = [n & ~o for n, o in zip(kernel_masks(s_new.masks), kernel_masks(m_old))]
    assert sum(g.sum() for g in grown) > 0
    # The optimizer's statistics take one step on the masked gradient, with grown entries reset and given none
    # (the documented skip semantics: no weight update, moments of kept weights still see this gradient).
    grown_tree = jax.tree.map(
        lambda new, old: None if new is None else new & ~old,
        s_new.masks,
        m_old,
        is_leaf=lambda x: x is None,
    )
    no_grad = jax.tree.map(
        lambda m, g: None if m is None else m & ~g,
        s_new.masks,
        grown_tree,
        is_leaf=lambda x: x is None,
    )
    reset = optax.tree_map_params(
        RIGL_INNER[name],
        lambda x, g: jnp.where(g, 0.0, x) if g.shape == x.shape else x,
        s_old.inner_state,
        jax.tree.map(
            lambda g, p: jnp.zeros((), bool) if g is None else g,
            grown_tree,
            p_old,
            is_leaf=lambda x: x is None,
        ),
        transform_non_params=lambda x: x,
    )
    masked = jax.tree.map(
        lambda m, g: g if m is None else jnp.where(m, g, 0.0),
        no_grad,
        grads,
        is_leaf=lambda x: x is None,
    )
    expected_state = RIGL_INNER[name].update(masked, reset, p_old)[1]
    for k, g, new in zip(KERNELS, grown, kernel_masks(s_new.masks)):
        old_p, new_p = np.asarray(p_old[k]["kernel"]), np.asarray(p_new[k]["kernel"])
        # skip_step_on_update: kept weights unchanged, dropped -> 0, grown start at exactly 0
        np.testing.assert_array_equal(new_p, np.where(new, old_p, 0.0))
        assert np.all(new_p[g] == 0.0)
        moments = param_shaped_moments(s_new.inner_state, old_p.shape)
        expected = param_shaped_moments(expected_state, old_p.shape)
        assert moments and len(moments) == len(expected)
        for exp_mom, mom in zip(expected, moments):
            assert np.all(mom[g] == 0.0)
            np.testing.assert_allclose(mom, exp_mom, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(p_new["dense0"]["bias"], p_old["dense0"]["bias"])


def test_without_skip_grown_weights_take_a_first_step_from_zero_moments():
    _, _, hist = run_of("set")  # SET with skip_step_on_update=False, sgd(0.1, momentum=0.9)
    _, _, _, _, p_new, s_new, grads, grown = first_update(hist)
    assert sum(g.sum() for g in grown) > 0
    for k, g in zip(KERNELS, grown):
        trace = param_shaped_moments(s_new.inner_state, g.shape)[0]
        gk = np.asarray(grads[k]["kernel"])
        np.testing.assert_array_equal(trace[g], gk[g])  # momentum restarted: trace = 0.9 * 0 + g
        np.testing.assert_allclose(np.asarray(p_new[k]["kernel"])[g], -0.1 * gk[g], rtol=1e-6)


def test_rigl_grows_by_dense_gradient_passed_to_update():
    """Reference drop/grow in NumPy from the same params and the gradient jax.grad gives at them (dense)."""
    _, _, hist = run_of("rigl_adamw")  # drop_noise=0.0
    for t in (5, 10):
        m_old, p_old, _, m_new, _, _, grads, _ = first_update(hist, t)
        f = float(drop_fraction_schedule(0.3, 30)(t))
        for k, old, new in zip(KERNELS, kernel_masks(m_old), kernel_masks(m_new)):
            g = np.abs(np.asarray(grads[k]["kernel"])).ravel()
            assert (
                np.count_nonzero(g[~old.ravel()]) > 0.5 * (~old).sum()
            )  # dense: nonzero at pruned positions
            w = np.abs(np.asarray(p_old[k]["kernel"])).ravel()
            n_drop = int(np.floor(np.float32(old.sum()) * np.float32(f)))
            assert n_drop > 0
            active = np.flatnonzero(old.ravel())
            kept = active[np.argsort(-w[active], kind="stable")][: old.sum() - n_drop]
            rest = np.setdiff1d(np.arange(g.size), kept)
            grow = rest[np.argsort(-g[rest], kind="stable")][:n_drop]
            expect = np.zeros(g.size, bool)
            expect[kept] = True
            expect[grow] = True
            np.testing.assert_array_equal(new.ravel(), expect)


def test_snfs_redistribution_conserves_total_nnz_and_follows_momentum():
    _, state, hist = run_of("snfs")
    total0 = sum(m.sum() for m in kernel_masks(hist[0][0][0]))
    per_leaf = set()
    for _, (m_new, p_new, _), _ in hist:
        assert sum(m.sum() for m in kernel_masks(m_new)) == total0
        assert off_mask_zero(p_new, m_new)
        per_leaf.add(tuple(int(m.sum()) for m in kernel_masks(m_new)))
    assert len(per_leaf) > 1  # redistribution moved connections between leaves
    # the EMA of dense gradients lives in the state, for pruned leaves only
    assert (
        isinstance(state.extra, jaxsparse.SNFSState)
        and state.extra.momentum["dense0"]["kernel"].shape == (12, 16)
        and state.extra.momentum["dense0"]["bias"] is None
    )


def test_snfs_redistribution_allots_by_mean_momentum():
    from jaxsparse.transforms.dst import _redistributed_counts

    masks = {"a": jnp.arange(100).reshape(10, 10) < 20, "b": jnp.arange(100).reshape(10, 10) < 20}
    mom = {"a": jnp.full((10, 10), 3.0), "b": jnp.full((10, 10), 1.0)}
    keep, grow = jax.jit(_redistributed_counts, static_argnums=3)(masks, mom, jnp.float32(0.5), 3)
    assert (int(keep["a"]), int(keep["b"])) == (10, 10)
    assert (int(grow["a"]), int(grow["b"])) == (15, 5)  # 20 dropped, shared 3:1


def test_snfs_without_redistribution_grows_top_momentum():
    _, _, hist = run_of("snfs_per_layer")
    checked = 0
    for t in (5, 10, 15):
        m_old, _, _, m_new, _, s_new, _, grown = first_update(hist, t)
        for k, old, new, g in zip(KERNELS, kernel_masks(m_old), kernel_masks(m_new), grown):
            ema = np.abs(np.asarray(s_new.extra.momentum[k]["kernel"]))
            if g.any():  # every grown position beats every position left off
                assert ema[g].min() >= ema[~new & ~old].max()
                checked += 1
    assert checked


def test_set_growth_ignores_gradients():
    _, _, hist = run_of("set")
    (m_old, params, state), _, _ = hist[5]
    step = step_of("set")
    g1 = jax.tree.map(jnp.ones_like, params)
    g2 = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(9), p.shape), params)
    s1, s2 = step(g1, state, params)[1], step(g2, state, params)[1]
    for a, b, old in zip(kernel_masks(s1.masks), kernel_masks(s2.masks), kernel_masks(m_old)):
        np.testing.assert_array_equal(a, b)
        assert (a != old).any()


def test_masks_deterministic_given_seed():
    step = step_of("rigl_adamw")
    make = CONFIGS["rigl_adamw"]
    _, sa, _ = run(make(7), 16, step=step, seed_tx=make(7))
    _, sb, _ = run(make(7), 16, step=step, seed_tx=make(7))
    _, sc, _ = run(make(8), 16, step=step, seed_tx=make(8))
    for a, b in zip(kernel_masks(sa.masks), kernel_masks(sb.masks)):
        np.testing.assert_array_equal(a, b)
    assert any((a != c).any() for a, c in zip(kernel_masks(sa.masks), kernel_masks(sc.masks)))


def test_static_mask_independent_of_weights_and_exact_counts():
    tx = static_sparse(optax.sgd(0.1), jaxsparse.budget(0.8, "erk"), seed=5)
    m1 = tx.init(mlp_params(0)).masks
    m2 = tx.init(mlp_params(1)).masks
    sp = jaxsparse.budget(0.8, "erk")(mlp_params(0))
    for k, a, b in zip(KERNELS, kernel_masks(m1), kernel_masks(m2)):
        np.testing.assert_array_equal(a, b)
        assert a.sum() == jaxsparse.keep_count(sp[k]["kernel"], a.size)


# ----------------------------------------------------------------------------------------------- reductions
def final(tx, steps, traces=None):
    params, state, _ = run(tx, steps, step=make_step(tx, traces))
    return params, state


def test_rigl_with_zero_drop_fraction_equals_static_in_one_compilation():
    steps, traces = 300, []
    p_static, s_static = final(static_sparse(optax.adam(1e-2), 0.8, seed=11), steps)
    rigl0 = rigl(
        optax.adam(1e-2),
        0.8,
        drop_fraction=0.0,
        update_every=50,
        total_steps=steps,
        skip_step_on_update=False,
        seed=11,
    )
    p_rigl, s_rigl = final(rigl0, steps, traces)
    assert len(traces) == 1  # 300 steps, update steps at 50, 100, 150, 200 included
    # Same masks at every step and the same arithmetic; XLA fuses RigL's (no-op) moment reset into the Adam update,
    # which can move the last bit of a float32, so params are compared to float32 rounding.
    for a, b in zip(jax.tree.leaves(p_static), jax.tree.leaves(p_rigl)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(kernel_masks(s_static.masks), kernel_masks(s_rigl.masks)):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(
        jax.tree.leaves(p_static)[1], jax.tree.leaves(mlp_params())[1]
    )  # it trained


def test_one_compilation_while_masks_change():
    run_of("rigl_adamw")
    test_masks_deterministic_given_seed()
    assert (
        len(RIGL_TRACES) == 1
    )  # every run of the rigl_adamw step, mask updates included, reused one trace
    _, _, hist = run_of("rigl_adamw")
    assert any(
        (a != b).any() for a, b in zip(kernel_masks(hist[0][0][0]), kernel_masks(hist[-1][1][0]))
    )


def test_granet_without_regrowth_equals_gmp():
    steps = 60
    gmp = gradual_magnitude_pruning(
        optax.sgd(0.05, momentum=0.9), 0.8, begin_step=0, end_step=40, frequency=10, scope="global"
    )
    gra = granet(
        optax.sgd(0.05, momentum=0.9),
        0.8,
        prune_end_step=40,
        regrow_end_step=steps,
        update_every=10,
        drop_fraction=0.0,
        scope="global",
    )
    p_gmp, s_gmp = final(gmp, steps)
    p_gra, s_gra = final(gra, steps)
    for a, b in zip(kernel_masks(s_gmp.masks), kernel_masks(s_gra.masks)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(p_gmp), jax.tree.leaves(p_gra)
    ):  # float32 rounding, see the RigL/static test
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    nnz = sum(m.sum() for m in kernel_masks(s_gra.masks))
    assert nnz == 192 + 96 - int(np.floor(0.8 * 192)) - int(np.floor(0.8 * 96))


def test_granet_prunes_to_target_then_regrowth_keeps_per_leaf_nnz():
    tx = granet(
        optax.sgd(0.05, momentum=0.9), 0.8, total_steps=60, prune_end_step=20, update_every=5
    )
    _, _, hist = run(tx, 50)
    target = sum(s - int(np.floor(0.8 * s)) for s in (192, 96))
    moved, nnz = 0, []
    for t, ((m_old, _, _), (m_new, p_new, _), _) in enumerate(hist):
        assert off_mask_zero(p_new, m_new)
        nnz.append(sum(m.sum() for m in kernel_masks(m_new)))
        if t > 20:
            assert nnz[-1] == target
            assert [m.sum() for m in kernel_masks(m_new)] == [m.sum() for m in kernel_masks(m_old)]
            moved += any((a != b).any() for a, b in zip(kernel_masks(m_old), kernel_masks(m_new)))
    assert all(a >= b for a, b in zip(nnz, nnz[1:]))  # density never increases
    assert moved >= 2  # regeneration keeps running after pruning ends


# ----------------------------------------------------------------------------------------------- primitives
def test_drop_fraction_schedule_closed_forms():
    t = np.array([0, 25, 50, 100, 150])
    cos = [float(drop_fraction_schedule(0.3, 100)(s)) for s in t]
    np.testing.assert_allclose(
        cos, 0.15 * (1 + np.cos(np.pi * np.minimum(t, 100) / 100)), atol=1e-7
    )
    lin = [float(drop_fraction_schedule(0.5, 100, "linear")(s)) for s in t]
    np.testing.assert_allclose(lin, 0.5 * (1 - np.minimum(t, 100) / 100), atol=1e-7)
    assert float(drop_fraction_schedule(0.2, None, "constant")(10**6)) == pytest.approx(0.2)


@jax.jit
def _random_drop_and_grow(seed, k, fraction, shape_like):
    kw, km, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape = shape_like.shape
    mask = jaxsparse.random_mask(km, shape, k)
    w = jnp.where(mask, jax.random.normal(kw, shape), 0.0)
    g = jax.random.normal(kg, shape)
    return mask, w, g, drop_and_grow({"w": mask}, {"w": w}, {"w": jnp.abs(g)}, fraction)["w"]


@given(
    shape=st.sampled_from([(7,), (5, 9)]),
    density=st.floats(0.05, 0.95),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_drop_and_grow_properties(shape, density, fraction, seed):
    n = int(np.prod(shape))
    k = max(1, int(round(density * n)))
    mask, w, g, new = _random_drop_and_grow(seed, k, jnp.float32(fraction), jnp.zeros(shape))
    new = np.asarray(new)
    old, w, g = np.asarray(mask), np.abs(np.asarray(w)), np.abs(np.asarray(g))
    assert new.sum() == old.sum()
    n_drop = int(np.floor(np.float32(k) * np.float32(fraction)))
    dropped = old & ~new
    if dropped.any() and n_drop < k:
        # only weights outside the top-(k - n_drop) magnitudes can leave (a just-dropped one may be regrown)
        assert w[dropped].max() <= np.sort(w[old])[::-1][k - n_drop - 1]
    grown = new & ~old
    if grown.any() and (~new & ~old).any():
        assert g[grown].min() >= g[~new & ~old].max()
    assert (new & ~old).sum() <= n_drop


def test_prune_and_regrow_counts_traced():
    m = {"w": jnp.array([True, True, True, False, False, False])}
    s = drop_scores({"w": jnp.array([3.0, 1.0, 2.0, 0.0, 0.0, 0.0])}, m)
    f = jax.jit(
        lambda nk, ng: prune_and_regrow(m, s, {"w": nk}, {"w": jnp.arange(6.0)}, {"w": ng})[0]["w"]
    )
    assert f(2, 1).tolist() == [True, False, True, False, False, True]
    assert f(1, 3).tolist() == [True, False, False, True, True, True]


# ----------------------------------------------------------------------------------------------- bad input
INNER = optax.sgd(0.1)


@pytest.mark.parametrize(
    "build, exc, words",
    [
        (
            lambda: rigl(INNER, 0.8, total_steps=100, drop_fraction=1.5),
            ValueError,
            ["drop_fraction", "1.5", "[0, 1]"],
        ),
        (
            lambda: set_training(INNER, 0.8, total_steps=100, drop_fraction=-0.1),
            ValueError,
            ["drop_fraction", "-0.1"],
        ),
        (
            lambda: rigl(INNER, 0.8, total_steps=100, drop_fraction="a lot"),
            TypeError,
            ["drop_fraction", "a lot"],
        ),
        (
            lambda: rigl(INNER, 0.8, total_steps=100, update_every=0),
            ValueError,
            ["update_every", ">= 1", "0"],
        ),
        (
            lambda: snfs(INNER, 0.8, total_steps=100, update_every=2.5),
            TypeError,
            ["update_every", "2.5"],
        ),
        (
            lambda: rigl(INNER, 0.8, begin_step=50, end_step=10),
            ValueError,
            ["end_step", "10", "begin_step", "50"],
        ),
        (
            lambda: granet(INNER, 0.8, begin_step=50, prune_end_step=10, regrow_end_step=100),
            ValueError,
            ["end_step", "10"],
        ),
        (lambda: rigl(INNER, 0.8), ValueError, ["total_steps", "end_step"]),
        (lambda: rigl(INNER, 0.8, total_steps=0), ValueError, ["total_steps", "0"]),
        (
            lambda: sparse_training(INNER, _drop_and_grow_rule(0.8, grow="magic", end_step=10)),
            ValueError,
            ["grow", "magic", "gradient"],
        ),
        (
            lambda: rigl(INNER, 0.8, total_steps=100, decay="exp"),
            ValueError,
            ["decay", "exp", "cosine"],
        ),
        (lambda: set_training(INNER, 0.8, decay="exp"), ValueError, ["decay", "exp", "constant"]),
        (lambda: set_training(INNER, 0.8, decay="cosine"), ValueError, ["total_steps", "end_step"]),
        (lambda: rigl(INNER, 1.0, total_steps=100), ValueError, ["sparsity", "1.0", "[0, 1)"]),
        (lambda: static_sparse(INNER, -0.2), ValueError, ["sparsity", "-0.2"]),
        (lambda: static_sparse(INNER, True), TypeError, ["sparsity", "True"]),
        (lambda: snfs(INNER, 0.8, total_steps=100, momentum=1.0), ValueError, ["momentum", "1.0"]),
        (
            lambda: rigl(INNER, 0.8, total_steps=100, drop_noise=-1.0),
            ValueError,
            ["drop_noise", "-1.0"],
        ),
        (
            lambda: sparse_training(
                INNER, _drop_and_grow_rule(0.8, grow="random", redistribute=True, end_step=9)
            ),
            ValueError,
            ["redistribute"],
        ),
        (
            lambda: granet(INNER, 0.5, total_steps=100, initial_sparsity=0.7),
            ValueError,
            ["initial_sparsity", "0.7"],
        ),
        (lambda: granet(INNER, 0.5, total_steps=100, scope="row"), ValueError, ["scope", "row"]),
    ],
)
def test_bad_arguments_fail_at_construction(build, exc, words):
    with pytest.raises(exc) as info:
        build()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_update_gates():

    gate = rigl.rule(0.8, total_steps=1000).is_update  # every 100 steps after step 0, until 750
    assert np.flatnonzero(np.asarray(gate(jnp.arange(1001)))).tolist() == [
        100,
        200,
        300,
        400,
        500,
        600,
        700,
    ]
    forever = set_training.rule(0.8, decay="constant", update_every=7).is_update
    assert bool(forever(7 * 10**6)) and not bool(forever(0))


def test_budget_leaving_a_layer_empty_fails_at_init():
    params = {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 4))}
    tx = static_sparse(INNER, lambda p: {"w": 0.5, "v": 1.0})
    with pytest.raises(ValueError, match=r"leaves leaf 'v' \(shape \(4, 4\)\) with no weights"):
        tx.init(params)
