"""One path model for every tree, and the smaller silent failures of the first day (issue: "nothing fails
silently", failures 1 and 6). Each test is named after the case that failed."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxsparse as js
from jaxsparse.flax import convert
from jaxsparse.posttraining import prune_linen


class _Stack(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(3)])

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return x


NAMES = [f"layers/{i}/{leaf}" for i in range(3) for leaf in ("bias", "kernel")]


# ------------------------------------------------------------------------------------------------ failure 1
def test_leaf_paths_same_for_nnx_state_split_state_and_pure_dict():
    model = _Stack(nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)
    trees = [nnx.state(model), params, nnx.to_pure_dict(nnx.state(model))]
    for tree in trees:
        assert js.leaf_paths(tree) == NAMES
    assert js.sparsity_summary(nnx.state(model)).keys() == set(NAMES)


def test_budget_exclude_anchored_pattern_matches_nnx_state():
    """Failure 1a: budget(0.9, exclude=r"layers/2/kernel$") never matched an nnx.state path ('.../value')."""
    state = nnx.state(_Stack(nnx.Rngs(0)))
    s = js.budget(0.9, exclude=r"layers/2/kernel$")(state)
    assert s["layers"][2]["kernel"] is None
    assert s["layers"][0]["kernel"] == 0.9 and s["layers"][1]["kernel"] == 0.9
    sel = js.prunable(state, include=r"layers/[01]/kernel$")
    assert [bool(x) for x in jax.tree.leaves(sel)] == [False, True, False, True, False, False]


def test_sr_ste_where_pattern_on_nnx_state_is_not_silently_dense():
    """Failure 1b: SR-STE with where=prunable(include=...$) on nnx.state trained dense (loss == dense)."""
    _, params = nnx.split(_Stack(nnx.Rngs(0)), nnx.Param)
    where = js.prunable(params, include=r"kernel$")
    masked = js.ste_nm(params, 2, 4, where=where)
    for name, a, b in zip(NAMES, jax.tree.leaves(params), jax.tree.leaves(masked)):
        if name.endswith("kernel"):
            assert int(jnp.sum(b != 0)) == 32  # 2:4 of an 8x8 kernel
        else:
            np.testing.assert_array_equal(a, b)


def test_nothing_selected_is_an_error_naming_patterns_and_paths():
    state = nnx.state(_Stack(nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"include='conv'.*'layers/0/kernel' float32\[8, 8\]"):
        js.prunable(state, include="conv")
    with pytest.raises(ValueError, match=r"`custom` pattern 'conv' matches no selected leaf"):
        js.budget(0.5, custom={"conv": 0.1})(state)


def test_to_sparse_nnx_that_converts_nothing_raises():
    """Failure 1d: to_sparse_nnx converted 0 layers without a word (masks keyed like '.../kernel/value')."""
    model = _Stack(nnx.Rngs(0))
    none_masks = jax.tree.map(lambda _: None, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with pytest.raises(ValueError, match=r"converts no layer.*'layers/0/kernel'"):
        convert.to_sparse_nnx(model, none_masks, format="nm", n=2, m=4)


# ------------------------------------------------------------------------------------------------ failure 6
@pytest.mark.parametrize(
    "sparsity", [np.float32(0.5), jnp.float32(0.5), np.float64(0.5)], ids=["np32", "jnp32", "np64"]
)
def test_numpy_and_jax_scalar_sparsity_is_accepted(sparsity):
    """Failure 6a: np.float32(0.5) / jnp.float32(0.9) were rejected with a tree-structure error."""
    params = {"w": jnp.ones((8, 8))}
    assert int(js.magnitude_masks(params, sparsity)["w"].sum()) == 32
    for tx in (
        js.gradual_magnitude_pruning(optax.sgd(0.1), sparsity, 0, 2, 1),
        js.rigl(optax.sgd(0.1), sparsity, total_steps=10),
        js.static_sparse(optax.sgd(0.1), sparsity),
    ):
        tx.init(params)


@pytest.mark.parametrize("bad", [jnp.float32(1.5), np.float32(-0.1), np.float64(np.nan)])
def test_out_of_range_array_scalar_sparsity_is_checked_eagerly(bad):
    """Failure 6a': jnp.float32(1.5) passed unchecked."""
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
        js.rigl(optax.sgd(0.1), bad, total_steps=10)
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
        js.gradual_magnitude_pruning(optax.sgd(0.1), bad, 0, 2, 1)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        js.magnitude_masks({"w": jnp.ones((4, 4))}, bad)


def test_python_float_leaf_in_params_works_with_budgets_and_training():
    """Failure 6c: a Python-float leaf broke every budget API ('float' object has no attribute 'dtype')."""
    params = {"w": jnp.ones((8, 8)), "temperature": 1.5}
    s = js.budget(0.5, "erk")(params)
    assert s["temperature"] is None and s["w"] == 0.5
    tx = js.rigl(optax.sgd(0.1), js.budget(0.5, "erk"), total_steps=10)
    state = tx.init(params)
    assert state.masks["temperature"] is None and int(state.masks["w"].sum()) == 32


@pytest.mark.parametrize(
    "mask, err",
    [
        (jnp.ones((4, 4)), TypeError),  # a float mask
        (jnp.ones((4, 1), bool), ValueError),  # broadcasts over (4, 4)
        (jnp.ones((1,), bool), ValueError),
    ],
    ids=["float", "4x1", "1"],
)
def test_apply_masks_rejects_float_and_broadcasting_masks(mask, err):
    """Failure 6d: apply_masks accepted a float mask, a (4, 1) mask and a (1,) mask."""
    with pytest.raises(err, match="mask of leaf 'w'"):
        js.apply_masks({"w": jnp.ones((4, 4))}, {"w": mask})


def test_zero_size_leaves_erk_gmp_and_flops():
    """Failure 6e: zero-size leaves gave a bare ZeroDivisionError in ERK, GMP and stats.flops."""
    params = {"w": jnp.ones((8, 8)), "empty": jnp.ones((0, 4))}
    s = js.budget(0.5, "erk")(params)
    assert s["empty"] is None
    tx = js.gradual_magnitude_pruning(optax.sgd(0.1), js.budget(0.5, "erk"), 0, 2, 1)
    assert tx.init(params).masks["empty"] is None
    assert js.flops(params) == (128.0, 128.0)
    with pytest.raises(ValueError, match=r"leaf 'empty' of shape \(0, 4\) was selected"):
        js.prunable(params, predicate=lambda name, leaf: True)
    with pytest.raises(ValueError, match=r"no leaf .* 'empty' float32\[0, 4\]"):
        js.budget(0.5, "erk")({"empty": jnp.ones((0, 4))})


def test_magnitude_masks_on_int_params_names_the_dtype():
    """Failure 6f: magnitude_masks on int params only said 'no leaf selected'."""
    with pytest.raises(ValueError, match=r"floating point.*'w' int32\[4, 4\]"):
        js.magnitude_masks({"w": jnp.ones((4, 4), jnp.int32)}, 0.5)


def test_prune_linen_given_nnx_state_is_a_type_error():
    """Failure 6g: prune_linen given an nnx.State raised a bare AssertionError."""
    state = nnx.state(_Stack(nnx.Rngs(0)))
    with pytest.raises(TypeError, match=r"Linen variables.*prune_nnx"):
        prune_linen(nn.Dense(8), state, [jnp.ones((2, 8))], progress=False)


def test_flat_reexports_promised_by_the_readme():
    """Failure 6h: js.stats, js.checkpoint, js.lottery, js.imp_masks, js.sparsity_summary were absent."""
    for name in ("stats", "checkpoint", "lottery", "imp_masks", "sparsity_summary", "leaf_paths"):
        assert hasattr(js, name), name


@pytest.mark.parametrize("leaves", [4, 64])
def test_gmp_initial_equals_final_sparsity_on_128x128_kernels(leaves):
    """Failure 6i: sparsity=0.8, initial_sparsity=0.8 raised 'initial_sparsity (0.8) must be <= the final
    sparsity (0.8)' on trees of 128x128 kernels (float round-off in the weighted mean)."""
    params = {f"k{i}": jax.ShapeDtypeStruct((128, 128), jnp.float32) for i in range(leaves)}
    rule = js.gradual_magnitude_pruning.rule(0.8, 0, 10, 2, initial_sparsity=0.8)
    concrete = {"k0": jnp.ones((128, 128))} if leaves == 4 else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks, _ = jax.eval_shape(lambda p: rule.init(p, jax.random.PRNGKey(0)), params)
    assert all(m.dtype == jnp.bool_ for m in jax.tree.leaves(masks))
    if concrete is not None:
        m, _ = rule.init(concrete, jax.random.PRNGKey(0))
        assert int(m["k0"].sum()) == 128 * 128 - int(0.8 * 128 * 128)
