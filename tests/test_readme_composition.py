"""The README's "Composing with optax and Flax" section runs: its python blocks are executed as written, and
each composition of its table behaves as the table says."""

import pathlib
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxsparse as js

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _section():
    text = README.read_text()
    start = text.index("## Composing with optax and Flax")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_readme_composition_section_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", _section(), re.S)
    assert blocks, "the section must hold its NNX example"
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)
    assert "nnx.value_and_grad" in blocks[0] and "nnx.Optimizer" in blocks[0]
    assert float(ns["loss"]) < 10.0


def _params():
    return {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 8)), "b": jnp.zeros(8)}


def _run(tx, steps=4):
    params = _params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
        updates, state = update(jax.tree.map(lambda p: jnp.cos(p + t), params), state, params)
        params = optax.apply_updates(params, updates)
    return jax.block_until_ready(params)


def _rigl(inner):
    return js.rigl(inner, 0.5, update_every=2, total_steps=20)


def test_readme_table_rows_that_raise():
    for tx in (
        optax.chain(_rigl(optax.scale_by_adam()), optax.scale_by_learning_rate(1e-3)),
        optax.chain(_rigl(optax.adam(1e-3)), optax.add_decayed_weights(1e-4)),
    ):
        with pytest.raises(Exception, match="must produce the final updates"):
            _run(tx)


def test_readme_table_rows_that_work():
    for tx in (
        _rigl(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))),
        optax.chain(optax.clip_by_global_norm(1.0), _rigl(optax.adamw(1e-3))),
        _rigl(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)),
        optax.inject_hyperparams(
            js.gradual_magnitude_pruning,
            static_args=("begin_step", "end_step", "frequency", "initial_sparsity", "power"),
        )(optax.adam(1e-3), sparsity=0.5, begin_step=0, end_step=2, frequency=1),
    ):
        params = _run(tx)
        assert int(jnp.sum(params["w"] == 0)) == 32
