"""The RigL / SET update on a mesh of 8 CPU devices: bit-identical to the single-device update, and the compiled,
sharded step gathers no parameter (mask rules are elementwise ops plus scalar all-reduced counts)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse
from jaxsparse.transforms.dst import rigl, set_training

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")

SHAPES = {"dense0": (64, 32), "dense1": (32, 16)}
SPECS = {"dense0": P("x", "y"), "dense1": P("y", "x")}


def params_and_grads():
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        k: {"kernel": jax.random.normal(ks[i], s), "bias": jnp.zeros(s[1])}
        for i, (k, s) in enumerate(SHAPES.items())
    }
    grads = {
        k: {"kernel": jax.random.normal(ks[2 + i], s), "bias": jnp.ones(s[1])}
        for i, (k, s) in enumerate(SHAPES.items())
    }
    return params, grads


def shard(tree, mesh):
    return {
        k: {
            "kernel": jax.device_put(v["kernel"], NamedSharding(mesh, SPECS[k])),
            "bias": jax.device_put(v["bias"], NamedSharding(mesh, P())),
        }
        for k, v in tree.items()
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda: rigl(
            optax.adam(1e-2), jaxsparse.budget(0.8, "erk"), update_every=1, total_steps=10, seed=3
        ),
        lambda: set_training(
            optax.sgd(0.1, momentum=0.9), 0.9, update_every=1, total_steps=10, seed=3
        ),
    ],
    ids=["rigl", "set"],
)
def test_sharded_update_equals_single_device_and_gathers_no_parameter(make):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    tx = make()
    params, grads = params_and_grads()
    state = tx.init(params)
    state = state._replace(step=jnp.ones((), jnp.int32))  # step 1 is a mask-update step
    params = jaxsparse.apply_masks(
        params, state.masks
    )  # pruned weights are zero from the first step on

    single = jax.jit(tx.update)
    u1, s1 = single(grads, state, params)

    sp, sg = shard(params, mesh), shard(grads, mesh)
    s_state = tx.init(sp)._replace(step=jnp.ones((), jnp.int32))
    assert s_state.masks["dense0"]["kernel"].sharding.is_equivalent_to(
        sp["dense0"]["kernel"].sharding, 2
    )
    sharded = jax.jit(tx.update)
    compiled = sharded.lower(sg, s_state, sp).compile()
    u2, s2 = compiled(sg, s_state, sp)

    for k in SHAPES:
        m0 = np.asarray(state.masks[k]["kernel"])
        assert (
            np.asarray(s1.masks[k]["kernel"]) != m0
        ).any()  # the update really moved connections
        np.testing.assert_array_equal(
            np.asarray(s1.masks[k]["kernel"]), np.asarray(s2.masks[k]["kernel"])
        )
        np.testing.assert_array_equal(np.asarray(u1[k]["kernel"]), np.asarray(u2[k]["kernel"]))
        assert u2[k]["kernel"].sharding.is_equivalent_to(sp[k]["kernel"].sharding, 2)
        assert s2.masks[k]["kernel"].sharding.is_equivalent_to(sp[k]["kernel"].sharding, 2)
    for a, b in zip(jax.tree.leaves(s1.inner_state), jax.tree.leaves(s2.inner_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    hlo = compiled.as_text()
    assert "all-reduce" in hlo  # the per-shard counts of the top-k bisection are combined...
    assert (
        "all-gather" not in hlo and "all-to-all" not in hlo
    )  # ...but no parameter (or part of one) is gathered


def test_gather_detection_sees_a_sort():
    """Control for the HLO check above: a sort over a sharded parameter does gather it."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    w = jax.device_put(jnp.ones(SHAPES["dense0"]), NamedSharding(mesh, SPECS["dense0"]))
    hlo = jax.jit(lambda w: jnp.sort(w.ravel()).reshape(w.shape)).lower(w).compile().as_text()
    assert "all-gather" in hlo or "all-to-all" in hlo


@pytest.mark.parametrize("n_leaves", [2, 6])
def test_topk_tie_pass_is_one_loop_for_all_sharded_leaves(n_leaves):
    """Ties at the threshold (equal scores) force the tie-breaking pass: it is one loop with one all-reduce per
    pass for all leaves of a shape, so the compiled HLO has the same collectives for 2 and for 6 leaves, and
    still no gather."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("x", "y"))
    sharding = NamedSharding(mesh, P("x", "y"))
    scores = {
        f"w{i}": jax.device_put(jnp.ones((64, 32)).at[0, 0].set(2.0), sharding)
        for i in range(n_leaves)
    }
    ks = {k: 7 for k in scores}
    compiled = jax.jit(jaxsparse.topk_masks).lower(scores, ks).compile()
    out = compiled(scores, ks)
    for k in scores:
        m = np.asarray(out[k])
        assert m.sum() == 7 and m[0, 0] and m.ravel()[1:7].all()  # the 2.0, then ties by flat index
    hlo = compiled.as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    n_reduce = hlo.count("all-reduce(") + hlo.count("all-reduce-start(")
    assert 0 < n_reduce <= 8, n_reduce  # a handful for the whole pytree, not one (or more) per leaf
