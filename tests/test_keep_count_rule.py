"""One keep/prune count rule for every API: ``keep_count(s, n) = n - floor(s * n)`` in Python doubles.

At s = 0.29 on 100 weights the double product is 28.999999999999996, so every API keeps 72 (the post-training
functions used to add 1e-9 before the floor and kept 71).
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxsparse as js
from jaxsparse.posttraining import magnitude_prune_layer, sparsegpt_prune, wanda_prune

S, ROWS, COLS = 0.29, 10, 10  # 100 weights
KEEP = js.keep_count(S, ROWS * COLS)


def _weight():
    return jax.random.normal(jax.random.PRNGKey(0), (ROWS, COLS))


def test_the_rule_itself():
    assert KEEP == 72 and js.keep_count(0.5, 10) == 5 and js.keep_count(0.0, 7) == 7
    assert js.keep_count(0.7, 10) == 3  # 0.7 * 10 is 7.000000000000001 in doubles


def test_mask_builders_agree():
    w = {"w": _weight()}
    assert int(js.magnitude_masks(w, S)["w"].sum()) == KEEP
    assert int(js.magnitude_masks(w, S, scope="global")["w"].sum()) == KEEP
    assert int(js.random_masks(jax.random.PRNGKey(1), w, S)["w"].sum()) == KEEP
    assert int(js.masks_from_scores(w, {"w": S})["w"].sum()) == KEEP


def test_post_training_agrees():
    w = _weight()
    assert int(magnitude_prune_layer(w, S)[1].sum()) == KEEP
    # per output column: keep_count(s, fan_in) in each of the COLS columns
    per_col = js.keep_count(S, ROWS)
    assert int(magnitude_prune_layer(w, S, scope="output")[1].sum()) == COLS * per_col
    assert int(wanda_prune(w, jnp.ones(ROWS), S)[1].sum()) == COLS * per_col
    x = jax.random.normal(jax.random.PRNGKey(2), (32, ROWS))
    assert int(sparsegpt_prune(w, x.T @ x, S)[1].sum()) == KEEP


@pytest.mark.parametrize(
    "make",
    [
        lambda: js.static_sparse(optax.sgd(0.1), S),
        lambda: js.rigl(optax.sgd(0.1), S, total_steps=10),
        lambda: js.set_training(optax.sgd(0.1), S, total_steps=10),
    ],
    ids=["static", "rigl", "set"],
)
def test_training_transforms_agree(make):
    assert int(make().init({"w": _weight()}).masks["w"].sum()) == KEEP


def test_gmp_at_its_final_sparsity_agrees():
    w = {"w": _weight()}
    tx = js.gradual_magnitude_pruning(optax.sgd(0.0), S, 0, 2, 1)
    state = tx.init(w)
    for _ in range(3):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, w), state, w)
        w = optax.apply_updates(w, updates)
    assert int(state.masks["w"].sum()) == KEEP
