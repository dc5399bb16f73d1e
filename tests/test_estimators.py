"""Forward-time estimators: N:M invariants, reductions between methods, exact gradients, schedules, bad input."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxsparse as js
from jaxsparse import estimators as E
from jaxsparse.masks import nm_mask

NM = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (5, 16), (16, 16)]


def _groups(x, m, axis=-2):
    x = np.moveaxis(np.asarray(x), axis, -1)
    return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def _nnz_per_group(x, m, axis=-2):
    return (_groups(x, m, axis) != 0).sum(-1)


def _params(key, shapes):
    keys = jax.random.split(key, len(shapes))
    return {f"l{i}": jax.random.normal(k, s) for i, (k, s) in enumerate(zip(keys, shapes))}


# ------------------------------------------------------------------------------------------------ STE
@functools.partial(jax.jit, static_argnums=(2, 3))
def _ste_and_grad(p, c, n, m):
    out = E.ste_nm(p, n, m)
    g = jax.grad(lambda q: jnp.sum(E.ste_nm(q, n, m)["kernel"] * c) + jnp.sum(q["bias"]))(p)
    return out, g


@given(nm=st.sampled_from(NM), conv=st.booleans(), seed=st.integers(0, 99))
def test_ste_exactly_n_per_group_and_identity_gradient(nm, conv, seed):
    n, m = nm
    shape = (3, 2, 2 * m, 3) if conv else (3 * m, 5)
    p = {"kernel": jax.random.normal(jax.random.PRNGKey(seed), shape), "bias": jnp.ones(shape[-1])}
    c = jax.random.normal(jax.random.PRNGKey(seed + 1), shape)
    out, g = _ste_and_grad(p, c, n, m)
    assert (_nnz_per_group(out["kernel"], m) == n).all()
    assert (out["bias"] == p["bias"]).all()
    kept = np.asarray(out["kernel"] != 0)
    assert (np.asarray(out["kernel"])[kept] == np.asarray(p["kernel"])[kept]).all()
    # kept entries are the n largest |w| per group
    a = _groups(np.abs(p["kernel"]), m)
    k = _groups(kept, m)
    assert (np.where(k, a, np.inf).min(-1) >= np.where(k, -np.inf, a).max(-1)).all()
    assert (g["kernel"] == c).all() and (g["bias"] == 1).all()


def test_ste_other_axis_and_where():
    p = {
        "a": jax.random.normal(jax.random.PRNGKey(0), (8, 12)),
        "b": jax.random.normal(jax.random.PRNGKey(1), (6, 6)),
    }
    out = E.ste_nm(p, 1, 4, axis=-1, where={"a": True, "b": False})
    assert (_nnz_per_group(out["a"], 4, axis=-1) == 1).all()
    assert (out["b"] == p["b"]).all()


def test_ste_jits_and_vmaps():
    p = {"w": jax.random.normal(jax.random.PRNGKey(0), (5, 8, 4))}
    f = jax.jit(lambda q: E.ste_nm(q, 2, 4, where={"w": True}))
    assert (f(p)["w"] == E.ste_nm(p, 2, 4)["w"]).all()
    per = jax.vmap(lambda w: E.ste_nm({"w": w}, 2, 4)["w"])(p["w"])
    assert (per == E.ste_nm(p, 2, 4)["w"]).all()


# ------------------------------------------------------------------------------------------------ transposable
def _brute_force_best(block, n, m):
    best = -np.inf
    for rows in itertools.product(itertools.combinations(range(m), n), repeat=m):
        pat = np.zeros((m, m), bool)
        for i, r in enumerate(rows):
            pat[i, list(r)] = True
        if (pat.sum(0) == n).all():
            best = max(best, block[pat].sum())
    return best


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2), (3, 4), (2, 8), (4, 8), (3, 16)])
def test_transposable_masks_are_nm_along_both_axes(n, m):
    w = jax.random.normal(jax.random.PRNGKey(m + n), (2 * m, 3 * m))
    out = E.ste_nm({"w": w}, n, m, transposable=True)["w"]
    assert (_nnz_per_group(out, m, axis=-2) == n).all()
    assert (_nnz_per_group(out, m, axis=-1) == n).all()
    assert (_nnz_per_group(out.T, m, axis=-2) == n).all()


def test_transposable_2_4_is_the_best_block_pattern():
    w = np.abs(np.asarray(jax.random.normal(jax.random.PRNGKey(3), (4, 8))))
    mask = np.asarray(E.transposable_nm_mask(w, 2, 4))
    for j in range(2):
        blk, mk = w[:, 4 * j : 4 * j + 4], mask[:, 4 * j : 4 * j + 4]
        assert np.isclose(blk[mk].sum(), _brute_force_best(blk, 2, 4), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ gradient annealing
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_annealed_nm_gradient_is_alpha_g_on_masked(alpha):
    p = _params(jax.random.PRNGKey(0), [(8, 6), (3, 3, 4, 2)])
    c = _params(jax.random.PRNGKey(1), [(8, 6), (3, 3, 4, 2)])
    loss = lambda f: lambda q: sum(jnp.sum(f(q)[k] * c[k]) for k in q)
    g = jax.jit(jax.grad(loss(lambda q: E.annealed_nm(q, alpha, 2, 4))))(p)
    masks = E.nm_masks(p, 2, 4)
    for k in p:
        expect = jnp.where(masks[k], c[k], jnp.float32(alpha) * c[k])
        assert (g[k] == expect).all()
    out = E.annealed_nm(p, alpha, 2, 4)
    assert all((out[k] == E.ste_nm(p, 2, 4)[k]).all() for k in p)
    if alpha == 1.0:  # reduces to STE
        g_ste = jax.grad(loss(lambda q: E.ste_nm(q, 2, 4)))(p)
        assert all((g[k] == g_ste[k]).all() for k in p)
    if alpha == 0.0:  # reduces to hard masking with fixed masks
        hard = jax.grad(loss(lambda q: {k: q[k] * masks[k] for k in q}))(p)
        assert all((g[k] == hard[k]).all() for k in p)


def test_annealed_topk_exact_count_and_gradient():
    p = {"w": jax.random.normal(jax.random.PRNGKey(0), (20, 10)), "b": jnp.ones(10)}
    out = E.annealed_topk(p, 0.25, 0.8)
    assert int((out["w"] != 0).sum()) == 40 and (out["b"] == 1).all()
    g = jax.grad(lambda q: jnp.sum(E.annealed_topk(q, 0.25, 0.8)["w"]))(p)["w"]
    assert set(np.unique(np.asarray(g)).tolist()) == {0.25, 1.0}
    assert ((g == 1.0) == (out["w"] != 0)).all()


def test_autosparse_threshold_gradients():
    w = jax.random.normal(jax.random.PRNGKey(0), (16, 8)) * 0.1
    p, th = {"w": w, "b": jnp.ones(8)}, E.init_thresholds({"w": w, "b": jnp.ones(8)}, init=-3.0)
    assert th["b"] is None
    c = jax.random.normal(jax.random.PRNGKey(1), w.shape)
    tau = jax.nn.sigmoid(-3.0)
    kept = jnp.abs(w) > tau
    assert 0 < int(kept.sum()) < w.size

    def loss(q, t, alpha):
        return jnp.sum(E.autosparse_threshold(q, t, alpha)["w"] * c)

    gw, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, th, 0.3)
    assert (gw["w"] == jnp.where(kept, c, jnp.float32(0.3) * c)).all()
    # alpha = 0: exactly the true derivative of sign(w) * relu(|w| - sigmoid(s))
    true = lambda q, t: jnp.sum(
        jnp.sign(q["w"]) * jax.nn.relu(jnp.abs(q["w"]) - jax.nn.sigmoid(t["w"])) * c
    )
    gw0, gt0 = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, th, 0.0)
    tw, tt = jax.jit(jax.grad(true, argnums=(0, 1)))(p, th)
    assert np.allclose(gw0["w"], tw["w"]) and np.allclose(gt0["w"], tt["w"], rtol=1e-5)
    out = E.autosparse_threshold(p, th, 0.3)["w"]
    assert ((out != 0) == kept).all()


# ------------------------------------------------------------------------------------------------ PGF mask decay
def test_decayed_nm_reductions_and_backwards():
    p = _params(jax.random.PRNGKey(2), [(16, 4), (2, 2, 8, 3)])
    c = _params(jax.random.PRNGKey(3), [(16, 4), (2, 2, 8, 3)])
    hard, masks = E.ste_nm(p, 2, 4), E.nm_masks(p, 2, 4)
    zero = E.decayed_nm(p, 0.0, 2, 4)
    one = E.decayed_nm(p, 1.0, 2, 4)
    for k in p:
        assert (zero[k] == hard[k]).all()
        assert (one[k] == p[k]).all()
    loss = lambda beta, backward: (
        lambda q: sum(jnp.sum(E.decayed_nm(q, beta, 2, 4, backward=backward)[k] * c[k]) for k in q)
    )
    g_ste = jax.jit(jax.grad(loss(0.4, "ste")))(p)
    g_scaled = jax.jit(jax.grad(loss(0.4, "scaled")))(p)
    g_true = jax.jit(
        jax.grad(lambda q: sum(jnp.sum(jnp.where(masks[k], q[k], 0.4 * q[k]) * c[k]) for k in q))
    )(p)
    for k in p:
        assert (g_ste[k] == c[k]).all()
        assert np.allclose(g_scaled[k], g_true[k])
        assert (g_scaled[k] == jnp.where(masks[k], c[k], jnp.float32(0.4) * c[k])).all()


def test_mask_decay_schedules_closed_form_and_one_compile():
    lin = js.mask_decay_schedule("linear", 2e-3, begin_step=100, end_step=900)
    exp = js.mask_decay_schedule("exponential", 5e-3, begin_step=100, end_step=900)
    for t in [0, 50, 100, 101, 350, 599, 600, 601, 899, 900, 5000]:
        s = max(t - 100, 0)
        want_lin = 0.0 if t >= 900 else max(0.0, 1 - 2e-3 * s)
        want_exp = 0.0 if t >= 900 else math.exp(-5e-3 * s)
        assert abs(float(lin(t)) - want_lin) < 1e-6 and abs(float(exp(t)) - want_exp) < 1e-6
    betas = np.array([float(lin(t)) for t in range(0, 1000, 7)])
    assert (np.diff(betas) <= 0).all()
    default = js.mask_decay_schedule("linear", end_step=50)
    assert float(default(25)) == 0.5 and float(default(50)) == 0.0

    traces = []

    @jax.jit
    def step(params, t):
        traces.append(1)
        return jax.grad(lambda q: jnp.sum(E.decayed_nm(q, lin(t), 2, 4)["w"] ** 2))(params)

    p = {"w": jnp.ones((8, 8))}
    for t in (0, 300, 950):
        step(p, jnp.int32(t))
    assert len(traces) == 1


# ------------------------------------------------------------------------------------------------ PGF structure decay
@pytest.mark.parametrize("kind", ["stepwise", "geometric"])
@pytest.mark.parametrize("n,m", [(1, 8), (2, 4), (1, 4)])
def test_structure_decay_frames_and_target(kind, n, m):
    sd = E.structure_decay(n, m, begin_step=10, end_step=10 + 20 * 4, kind=kind)
    frames = sd.frames
    assert frames[-1] == (n, m)
    dens = [a / b for a, b in frames]
    if kind == "stepwise":
        assert all(b == m for _, b in frames) and all(x > y for x, y in zip(dens, dens[1:]))
    else:
        assert all(abs(d - n / m) < 1e-12 for d in dens) and all(b <= 16 for _, b in frames)
    p = {"w": jax.random.normal(jax.random.PRNGKey(0), (32, 6)), "b": jnp.ones(6)}
    f = jax.jit(lambda q, t: E.structure_decayed_nm(q, t, sd))
    assert (f(p, 0)["w"] == p["w"]).all()  # dense phase before begin_step
    span = (sd.end_step - sd.begin_step) / len(frames)
    for i, (nn, mm) in enumerate(frames):
        t = int(sd.begin_step + i * span + span / 2)
        assert int(sd.frame_index(t)) == i
        assert (_nnz_per_group(f(p, t)["w"], mm) == nn).all()
    for t in (sd.end_step, sd.end_step + 1000):
        assert (f(p, t)["w"] == E.ste_nm(p, n, m)["w"]).all()
    assert f._cache_size() == 1
    g = jax.grad(lambda q: jnp.sum(E.structure_decayed_nm(q, 50, sd)["w"]))(p)["w"]
    assert (g == 1).all()


# ------------------------------------------------------------------------------------------------ S-STE
@functools.partial(jax.jit, static_argnums=(2, 3))
def _soft_pair(p, d, n, m):
    scales = E.init_sste_scale(p, n, m)
    out = E.soft_nm(p, scales, n, m)
    out2 = E.soft_nm({"w": p["w"] + d, "b": p["b"]}, scales, n, m)
    return scales, out, out2, nm_mask(jnp.abs(p["w"]), n, m)


@given(nm=st.sampled_from([(2, 4), (1, 4), (1, 2), (2, 8), (4, 4)]), seed=st.integers(0, 99))
def test_soft_nm_at_most_n_and_continuous(nm, seed):
    n, m = nm
    p = {"w": jax.random.normal(jax.random.PRNGKey(seed), (4 * m, 6)), "b": jnp.ones(6)}
    d = 1e-4 * jax.random.normal(jax.random.PRNGKey(seed + 7), p["w"].shape)
    scales, out, out2, hard = _soft_pair(p, d, n, m)
    assert scales["b"] is None
    assert (_nnz_per_group(out["w"], m) <= n).all()
    assert (out["b"] == 1).all()
    if n == m:
        assert float(scales["w"]) == 1.0 and (out["w"] == p["w"]).all()
    else:
        assert float(scales["w"]) > 1.0  # shrinkage is compensated
        # nonzeros sit on the hard N:M mask
        assert not np.asarray(out["w"] != 0)[~np.asarray(hard)].any()
    lip = 2 * float(scales["w"])  # |S(w) - S(w')| <= 2 max |w - w'| within a group
    assert (
        float(jnp.max(jnp.abs(out2["w"] - out["w"])))
        <= lip * float(jnp.max(jnp.abs(d))) * 1.01 + 1e-6
    )


def test_soft_nm_straight_through_and_frozen_scale():
    p = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 4))}
    scales = E.init_sste_scale(p)
    gp, gs = jax.grad(lambda q, s: jnp.sum(E.soft_nm(q, s)["w"] * 3.0), argnums=(0, 1))(p, scales)
    assert (gp["w"] == 3.0).all() and float(gs["w"]) == 0.0
    w, s = np.asarray(p["w"]), np.asarray(E._soft_threshold(p["w"], 2, 4, 0))
    assert np.isclose(float(scales["w"]), (w * s).sum() / (s * s).sum(), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ schedules
def test_gradient_annealing_schedule_closed_form():
    sched = js.gradient_annealing_schedule(200, alpha0=0.5, begin_step=100)
    cos_sched = js.gradient_annealing_schedule(200, alpha0=0.5, begin_step=100, kind="cosine")
    for t in [0, 100, 120, 150, 199, 200, 1000]:
        u = min(max((t - 100) / 100, 0), 1)
        c = (1 + math.cos(math.pi * u)) / 2
        sg = 1 - 1 / (1 + math.exp(-(-6 + 12 * u)))
        want = 0.0 if t >= 200 else 0.5 * max(c, sg)
        assert abs(float(sched(t)) - want) < 1e-6
        assert abs(float(cos_sched(t)) - (0.0 if t >= 200 else 0.5 * c)) < 1e-6
    vals = np.array([float(sched(t)) for t in range(0, 260, 3)])
    assert (np.diff(vals) <= 1e-7).all() and vals[-1] == 0.0


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_messages():
    p = {"enc": {"kernel": jnp.ones((6, 4))}}
    with pytest.raises(ValueError, match=r"`n` must be <= `m`; got n=5, m=4"):
        E.ste_nm(p, 5, 4)
    with pytest.raises(ValueError, match=r"`m` must be <= 16; got m=32"):
        E.ste_nm(p, 2, 32)
    with pytest.raises(ValueError, match=r"enc/kernel.*length 6.*not divisible by m=4"):
        E.ste_nm(p, 2, 4)
    with pytest.raises(TypeError, match="`n` must be an int"):
        E.nm_masks(p, 2.0, 4)
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]; got 1.5"):
        E.annealed_nm({"w": jnp.ones((4, 4))}, 1.5)
    with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\]; got -0.1"):
        E.decayed_nm({"w": jnp.ones((4, 4))}, -0.1)
    with pytest.raises(ValueError, match="`backward` must be one of"):
        E.decayed_nm({"w": jnp.ones((4, 4))}, 0.5, backward="sideways")
    with pytest.raises(ValueError, match=r"`end_step` is required for kind='exponential'"):
        js.mask_decay_schedule("exponential", 1e-3)
    with pytest.raises(ValueError, match=r"`decay_coef` must be a finite float > 0.*got 0.0"):
        js.mask_decay_schedule("linear", 0.0)
    with pytest.raises(ValueError, match=r"`end_step` \(5\) must be > `begin_step` \(5\)"):
        js.mask_decay_schedule("linear", 0.1, begin_step=5, end_step=5)
    with pytest.raises(ValueError, match=r"one step per frame.*never reached"):
        E.structure_decay(1, 8, end_step=3)
    with pytest.raises(ValueError, match=r"`kind` must be one of"):
        E.structure_decay(1, 8, end_step=30, kind="fine")
    with pytest.raises(ValueError, match=r"`end_step` \(10\) must be > `begin_step` \(10\)"):
        js.gradient_annealing_schedule(10, begin_step=10)
    with pytest.raises(ValueError, match=r"`alpha0` must be in \[0, 1\]"):
        js.gradient_annealing_schedule(10, alpha0=2.0)
    with pytest.raises(ValueError, match=r"transposable=True.*second-to-last"):
        E.ste_nm({"w": jnp.ones((8, 8))}, 2, 4, axis=-1, transposable=True)
    with pytest.raises(ValueError, match=r"'w'.*axis 1 has length 6"):
        E.ste_nm({"w": jnp.ones((8, 6))}, 2, 4, transposable=True)
    with pytest.raises(ValueError, match=r"`where` and `params` must have the same tree structure"):
        E.ste_nm({"w": jnp.ones((8, 8))}, 2, 4, where={"v": True})
    with pytest.raises(TypeError, match="StructureDecay"):
        E.structure_decayed_nm({"w": jnp.ones((8, 8))}, 0, (1, 8))
