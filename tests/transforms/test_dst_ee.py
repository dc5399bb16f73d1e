"""DST-EE: c = 0 is RigL bit for bit, counters count active rounds exactly, the bonus favours never-active
connections, and the wrapper's invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _invariants import adam_moments_zero_where_grown, live, run, sharded_equals_unsharded

import jaxsparse as js
from jaxsparse.transforms.common import MaskContext
from jaxsparse.transforms.dst_ee import dst_ee

KW = dict(update_every=3, total_steps=40)


def test_zero_exploration_is_rigl_bit_for_bit():
    a = run(dst_ee(optax.adam(1e-2), 0.8, exploration=0.0, seed=4, **KW), 15)
    b = run(js.rigl(optax.adam(1e-2), 0.8, seed=4, **KW), 15)
    jax.tree.map(np.testing.assert_array_equal, a[1].masks, b[1].masks)
    jax.tree.map(np.testing.assert_array_equal, a[0], b[0])


def test_counters_count_active_rounds_and_wrapper_invariants():
    params, state, history, traces = run(
        dst_ee(optax.adam(1e-2), 0.8, exploration=1.0, seed=1, **KW), 16
    )
    expected = jax.tree.map(
        lambda m: None if m is None else np.zeros(m.shape, int),
        history[0][0],
        is_leaf=lambda x: x is None,
    )
    rounds = 0
    for before, _, st in history:
        if (
            int(st.extra.rounds) > rounds
        ):  # an update happened on this step: counters += masks before it
            rounds += 1
            expected = jax.tree.map(
                lambda e, m: None if m is None else e + np.asarray(m),
                expected,
                before,
                is_leaf=lambda x: x is None,
            )
        for e, n in zip(live(expected), live(st.extra.counts)):
            np.testing.assert_array_equal(np.asarray(n), e)
    assert rounds == 5 and len(traces) == 1
    assert adam_moments_zero_where_grown(history) > 0


def test_with_equal_gradients_a_never_active_connection_outranks_an_often_active_one():
    algo = dst_ee.rule(
        0.5,
        exploration=1.0,
        update_every=1,
        end_step=100,
        drop_fraction=0.5,
        decay="constant",
        drop_noise=0.0,
    )
    w = jnp.array([[4.0, 3.0, 2.0, 1.0]])
    masks = {"w": jnp.array([[True, True, False, False]])}
    counts = {
        "w": jnp.array([[5, 5, 5, 0]], jnp.int32)
    }  # position 2 was active for 5 rounds, 3 never
    _, extra = algo.init({"w": w}, jax.random.PRNGKey(0))
    extra = extra._replace(counts=counts, rounds=jnp.int32(5))
    ctx = MaskContext(
        masks,
        {"w": w * masks["w"]},
        {"w": jnp.ones((1, 4))},
        jnp.int32(1),
        jax.random.PRNGKey(1),
        extra,
    )
    new, _ = algo.update(ctx)
    assert new["w"].tolist() == [
        [True, False, False, True]
    ]  # drop the smallest kept (1), grow the never-active (3)


def test_sharded_equals_unsharded_and_bad_arguments():
    sharded_equals_unsharded(
        dst_ee(optax.sgd(0.1, momentum=0.9), 0.8, exploration=0.5, update_every=2, total_steps=10),
        6,
    )
    with pytest.raises(ValueError, match="exploration"):
        dst_ee.rule(0.8, exploration=-1.0, total_steps=10)
    with pytest.raises(ValueError, match="eps"):
        dst_ee.rule(0.8, eps=0.0, total_steps=10)
