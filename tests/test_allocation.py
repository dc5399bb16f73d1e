"""Prunable-leaf selection and layer-wise budgets (uniform, ER, ERK): exact totals and the spec's properties."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jaxsparse as js


def shapes_tree(shapes):
    return {
        f"layer_{i}": {
            "kernel": jax.ShapeDtypeStruct(s, jnp.float32),
            "bias": jax.ShapeDtypeStruct(s[-1:], jnp.float32),
        }
        for i, s in enumerate(shapes)
    }


shape_lists = st.lists(st.tuples(st.integers(2, 64), st.integers(2, 64)), min_size=1, max_size=5)


@given(shape_lists, st.floats(0.05, 0.98), st.sampled_from(["uniform", "er", "erk"]))
def test_budget_total_is_exact(shapes, sparsity, dist):
    params = shapes_tree(shapes)
    sp = js.budget(sparsity, dist)(params)
    kernels = [(sp[f"layer_{i}"]["kernel"], math.prod(s)) for i, s in enumerate(shapes)]
    assert all(sp[f"layer_{i}"]["bias"] is None for i in range(len(shapes)))
    zeros = sum((s or 0.0) * n for s, n in kernels)
    total = sum(n for _, n in kernels)
    assert zeros == pytest.approx(sparsity * total, rel=1e-9, abs=1e-6)
    assert all(s is None or 0.0 < s < 1.0 for s, _ in kernels)
    # realised counts are within one weight per leaf of the target
    realised = sum(n - js.keep_count(s, n) if s is not None else 0 for s, n in kernels)
    assert abs(realised - sparsity * total) <= len(shapes)


@given(shape_lists, st.floats(0.1, 0.95))
def test_erk_power_zero_is_uniform(shapes, sparsity):
    params = shapes_tree(shapes)
    erk = js.budget(sparsity, "erk", erk_power_scale=0.0)(params)
    for i in range(len(shapes)):
        assert erk[f"layer_{i}"]["kernel"] == pytest.approx(sparsity)


def test_erk_layout_invariant_and_monotone():
    hwio = {
        "c": jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.float32),
        "d": jax.ShapeDtypeStruct((512, 256), jnp.float32),
        "e": jax.ShapeDtypeStruct((256, 10), jnp.float32),
    }
    oihw = {"c": jax.ShapeDtypeStruct((32, 16, 3, 3), jnp.float32), "d": hwio["d"], "e": hwio["e"]}
    a, b = js.budget(0.8, "erk")(hwio), js.budget(0.8, "erk")(oihw)
    assert a == pytest.approx(b)
    # larger sum/prod => denser
    assert a["d"] > a["c"] > (a["e"] or 0.0)


def test_erk_redistributes_overflowing_layers():
    params = {
        "big": jax.ShapeDtypeStruct((1000, 1000), jnp.float32),
        "tiny": jax.ShapeDtypeStruct((4, 2), jnp.float32),
    }
    sp = js.budget(0.5, "erk")(params)
    assert sp["tiny"] is None  # would exceed density 1: made dense, the rest re-solved
    assert (1 - sp["big"]) * 1e6 + 8 == pytest.approx(0.5 * (1e6 + 8))


def test_custom_map_and_layer_options():
    params = shapes_tree([(8, 8), (8, 8), (8, 4)])
    sp = js.budget(0.5, "uniform", custom={"layer_1": 0.25}, first_layer_dense=True)(params)
    assert (
        sp["layer_0"]["kernel"] is None
        and sp["layer_1"]["kernel"] == 0.25
        and sp["layer_2"]["kernel"] == 0.5
    )
    sel = js.prunable(
        {f"Dense_{i}": {"kernel": jnp.ones((2, 2))} for i in (0, 2, 10)}, last_layer_dense=True
    )
    assert sel == {
        "Dense_0": {"kernel": True},
        "Dense_2": {"kernel": True},
        "Dense_10": {"kernel": False},
    }
    sel = js.prunable({"emb": jnp.ones((4, 4)), "k": jnp.ones((4, 4))}, exclude="emb")
    assert sel == {"emb": False, "k": True}


def test_linen_and_nnx_params():
    linen = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)]).init(
        jax.random.PRNGKey(0), jnp.ones((1, 4))
    )
    sp = js.budget(0.5)(linen)
    assert sp["params"]["layers_0"]["kernel"] == 0.5 and sp["params"]["layers_0"]["bias"] is None
    model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    masks = js.magnitude_masks(state, 0.75)
    kept = [m for m in jax.tree.leaves(masks) if m is not None]
    assert len(kept) == 1 and int(kept[0].sum()) == 8


def test_traced_uniform_sparsity_under_vmap():
    params = {"w": jnp.arange(1.0, 101.0).reshape(10, 10)}
    counts = jax.vmap(lambda s: js.magnitude_masks(params, s)["w"].sum())(
        jnp.array([0.0, 0.5, 0.9])
    )
    assert counts.tolist() == [100, 50, 10]


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: js.budget(1.0), ValueError, r"`sparsity` must be in \[0, 1\); got 1.0"),
        (lambda: js.budget(-0.1), ValueError, "got -0.1"),
        (lambda: js.budget(0.5, "erdos"), ValueError, "`distribution` must be one of"),
        (lambda: js.budget(0.5)({}), ValueError, "empty pytree"),
        (lambda: js.budget(0.5)({"b": jnp.ones(3)}), ValueError, "no leaf of `params` is selected"),
        (
            lambda: js.budget(0.5, predicate=lambda n, x: True)({"i": jnp.ones((2, 2), jnp.int32)}),
            TypeError,
            "leaf 'i' with dtype int32",
        ),
        (
            lambda: js.budget(0.5, include="[")({"w": jnp.ones((2, 2))}),
            ValueError,
            "`include` must be regular",
        ),
        (lambda: js.budget(0.5, custom={"w": 1.5}), ValueError, "custom"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
