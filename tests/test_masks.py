"""Mask constructors: exact counts, tie-breaking, traced k, N:M validity, blocks; against NumPy oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxsparse as js


def np_topk(score, k):
    """Oracle: stable sort on (-score, index)."""
    flat = np.asarray(score, np.float32).ravel()
    order = np.lexsort((np.arange(flat.size), -flat))
    mask = np.zeros(flat.size, bool)
    mask[order[: max(0, min(k, flat.size))]] = True
    return mask.reshape(np.shape(score))


@given(st.integers(1, 300), st.integers(-2, 320), st.integers(0, 2**31 - 1), st.booleans())
def test_topk_matches_oracle(size, k, seed, quantise):
    x = np.random.default_rng(seed).normal(size=size).astype(np.float32)
    if quantise:  # many ties
        x = np.round(x * 2) / 2
    got = np.asarray(jax.jit(js.topk_mask)(x, k))
    np.testing.assert_array_equal(got, np_topk(x, k))
    assert got.sum() == max(0, min(k, size))


def test_topk_special_values():
    x = jnp.array([jnp.nan, -jnp.inf, -0.0, 0.0, 1.0, jnp.inf, -1.0])
    assert js.topk_mask(x, 1).tolist() == [False, False, False, False, False, True, False]
    # -0.0 and +0.0 tie, so the lower index wins; NaN ranks last.
    assert js.topk_mask(x, 3).tolist() == [False, False, True, False, True, True, False]
    assert js.topk_mask(x, 6).tolist() == [False, True, True, True, True, True, True]


def test_topk_traced_k_under_vmap():
    x = jax.random.normal(jax.random.PRNGKey(0), (50,))
    ks = jnp.array([0, 1, 7, 50])
    masks = jax.vmap(js.topk_mask, in_axes=(None, 0))(x, ks)
    assert masks.sum(axis=1).tolist() == [0, 1, 7, 50]


@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=4), st.integers(0, 200), st.integers(0, 1000)
)
def test_global_topk_matches_concatenated_oracle(sizes, k, seed):
    rng = np.random.default_rng(seed)
    leaves = [
        np.round(rng.normal(size=n) * 3).astype(np.float32) for n in sizes
    ]  # ties across leaves
    tree = {f"l{i}": x for i, x in enumerate(leaves)}
    got = js.global_topk_masks(tree, k)
    expected = np_topk(np.concatenate([tree[f"l{i}"] for i in range(len(sizes))]), k)
    np.testing.assert_array_equal(
        np.concatenate([np.asarray(got[f"l{i}"]) for i in range(len(sizes))]), expected
    )


def test_topk_masks_per_leaf_and_none():
    tree = {"a": jnp.arange(6.0), "b": None, "c": -jnp.arange(4.0)}
    m = js.topk_masks(tree, {"a": 2, "b": None, "c": 3})
    assert m["b"] is None
    assert m["a"].tolist() == [False] * 4 + [True] * 2
    assert m["c"].tolist() == [True, True, True, False]


@given(
    st.sampled_from([(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (1, 16), (5, 16)]),
    st.integers(1, 5),
    st.integers(1, 6),
    st.integers(0, 99),
)
def test_nm_mask_exact_n_per_group(nm, groups, cols, seed):
    n, m = nm
    w = np.random.default_rng(seed).normal(size=(groups * m, cols)).astype(np.float32)
    w[0, 0] = w[1, 0]  # a tie inside a group
    mask = np.asarray(js.nm_mask(w, n, m))
    assert (mask.reshape(groups, m, cols).sum(axis=1) == n).all()
    # the kept entries are the n largest of each group (oracle per group)
    for g in range(groups):
        for c in range(cols):
            np.testing.assert_array_equal(
                mask[g * m : (g + 1) * m, c], np_topk(w[g * m : (g + 1) * m, c], n)
            )


def test_nm_mask_conv_axis_and_last_axis():
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 5))  # HWIO, groups along I
    mask = js.nm_mask(w, 2, 4)
    assert (mask.reshape(3, 3, 2, 4, 5).sum(axis=3) == 2).all()
    mask_last = js.nm_mask(w[..., :4], 1, 4, axis=-1)
    assert (mask_last.sum(axis=-1) == 1).all()


@pytest.mark.parametrize("pool", ["l1", "l2", "max"])
def test_block_mask_counts_and_structure(pool):
    w = jax.random.normal(jax.random.PRNGKey(2), (16, 12))
    mask = np.asarray(js.block_mask(w, (4, 3), 5, pool))
    blocks = mask.reshape(4, 4, 4, 3).transpose(0, 2, 1, 3).reshape(16, 12)
    assert set(blocks.sum(axis=1).tolist()) <= {0, 12} and blocks.all(axis=1).sum() == 5
    scores = np.asarray(js.block_scores(w, (4, 3), pool)).ravel()
    np.testing.assert_array_equal(blocks.all(axis=1), np_topk(scores, 5))


def test_random_mask_exact_and_deterministic():
    key = jax.random.PRNGKey(3)
    a, b = js.random_mask(key, (20, 30), 77), js.random_mask(key, (20, 30), 77)
    assert int(a.sum()) == 77 and bool((a == b).all())
    assert not bool((a == js.random_mask(jax.random.PRNGKey(4), (20, 30), 77)).all())


def test_apply_masks_and_grad():
    params = {"w": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([4.0])}
    masks = {"w": jnp.array([True, False, True]), "b": None}
    assert js.apply_masks(params, masks)["w"].tolist() == [1.0, 0.0, 3.0]
    g = jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(js.apply_masks(p, masks))))(
        params
    )
    assert g["w"].tolist() == [1.0, 0.0, 1.0] and g["b"].tolist() == [1.0]


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: js.nm_mask(jnp.ones((8, 2)), 5, 4), ValueError, "n=5, m=4"),
        (lambda: js.nm_mask(jnp.ones((8, 2)), 0, 4), ValueError, "`n` must be >= 1"),
        (lambda: js.nm_mask(jnp.ones((32, 2)), 2, 32), ValueError, "`m` must be <= 16"),
        (
            lambda: js.nm_mask(jnp.ones((6, 2)), 2, 4),
            ValueError,
            "length 6 .* not divisible by m=4",
        ),
        (lambda: js.block_mask(jnp.ones((4, 4)), (8, 2), 1), ValueError, "larger than"),
        (lambda: js.block_mask(jnp.ones((6, 4)), (4, 2), 1), ValueError, "must divide"),
        (lambda: js.topk_mask(jnp.arange(4), 2), TypeError, "floating-point"),
        (lambda: js.topk_mask(jnp.ones(4, jnp.complex64), 2), TypeError, "floating-point"),
        (
            lambda: js.apply_masks({"a": jnp.ones(2)}, {"b": None}),
            ValueError,
            "same tree structure",
        ),
        (
            lambda: js.block_mask(jnp.ones((4, 4)), (2, 2), 1, pool="mean"),
            ValueError,
            "`pool` must be one of",
        ),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_global_topk_on_sharded_leaves_needs_no_gather():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    tree = {
        "x": jax.random.normal(jax.random.PRNGKey(0), (64, 32)),
        "y": jax.random.normal(jax.random.PRNGKey(1), (32, 16)),
    }
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P("a", "b"))) for k, v in tree.items()}
    fn = jax.jit(js.global_topk_masks)
    hlo = fn.lower(sharded, 1000).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    got = fn(sharded, 1000)
    jax.tree.map(np.testing.assert_array_equal, got, fn(tree, 1000))
    assert got["x"].sharding.spec == P("a", "b")


@given(
    st.sampled_from([(1, 4), (2, 4), (2, 8), (3, 8)]),
    st.sampled_from([0, 1, 2]),
    st.integers(0, 99),
)
def test_nm_mask_ties_nan_and_any_axis_match_oracle(nm, axis, seed):
    n, m = nm
    shape = [2, 3, 4]
    shape[axis] = 2 * m
    rng = np.random.default_rng(seed)
    w = rng.integers(-3, 4, size=shape).astype(np.float32)  # many ties, +-0
    w[tuple(rng.integers(0, s) for s in shape)] = np.nan
    got = np.moveaxis(np.asarray(js.nm_mask(w, n, m, axis=axis)), axis, -1).reshape(-1, 2, m)
    ref = np.nan_to_num(np.moveaxis(w, axis, -1), nan=-np.inf).reshape(-1, 2, m)
    for row, ref_row in zip(got.reshape(-1, m), ref.reshape(-1, m)):
        np.testing.assert_array_equal(row, np_topk(ref_row, n))


def test_random_scores_uniform_deterministic_and_key_dependent():
    tree = {"w": jnp.zeros((300, 400)), "b": None}
    a = np.asarray(js.random_scores(jax.random.PRNGKey(0), tree)["w"]).ravel()
    assert js.random_scores(jax.random.PRNGKey(0), tree)["b"] is None
    np.testing.assert_array_equal(
        a, np.asarray(js.random_scores(jax.random.PRNGKey(0), tree)["w"]).ravel()
    )
    b = np.asarray(js.random_scores(jax.random.PRNGKey(1), tree)["w"]).ravel()
    assert np.mean(a == b) < 1e-3
    counts, _ = np.histogram(a, bins=20, range=(0.0, 1.0))
    chi2 = np.sum((counts - a.size / 20) ** 2 / (a.size / 20))
    assert chi2 < 50  # 19 degrees of freedom; p < 1e-3 above ~43.8
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.01  # neighbouring entries are not correlated


@settings(max_examples=10, deadline=None)
@given(
    shapes=st.lists(st.sampled_from([(4, 6), (6, 4), (3, 4, 5), (8,)]), min_size=1, max_size=5),
    sparsity=st.sampled_from([0.0, 0.3, 0.75, 0.9]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_masks_are_the_top_k_of_random_scores(shapes, sparsity, seed):
    """``random_masks`` (hashed and selected per group of equal shapes) keeps exactly the per-leaf top-k of
    ``random_scores`` for the same key, dense (``None``) leaves included in the seed order."""
    params = {f"l{i}": jnp.zeros(s) for i, s in enumerate(shapes)}
    params["dense"] = jnp.zeros((4, 6))
    per_leaf = {k: (None if k == "dense" else sparsity) for k in params}
    key = jax.random.PRNGKey(seed)
    got = js.random_masks(key, params, per_leaf)
    want = js.masks_from_scores(js.random_scores(key, params), per_leaf)
    assert got["dense"] is None
    for k in params:
        if k != "dense":
            assert got[k].dtype == jnp.bool_ and (np.asarray(got[k]) == np.asarray(want[k])).all()
            assert int(got[k].sum()) == js.keep_count(sparsity, params[k].size)


def test_random_masks_of_stacked_leaves_match_random_scores_per_slice():
    params = {"layers": jnp.zeros((3, 8, 4)), "head": jnp.zeros((8, 4))}
    b = js.budget(0.5, layer_axis={"layers": 0})
    key = jax.random.PRNGKey(3)
    got = js.random_masks(key, params, b)
    want = js.masks_from_scores(
        js.random_scores(key, params),
        js.leaf_sparsities(b, params),
        layer_axes=js.layer_axes(b, params),
    )
    for k in params:
        assert (np.asarray(got[k]) == np.asarray(want[k])).all()
    assert np.asarray(got["layers"]).reshape(3, -1).sum(1).tolist() == [16, 16, 16]
