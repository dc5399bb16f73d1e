"""jaxsparse.checkpoint: one strict save/restore for every tree (issue: "nothing fails silently", failure 5).

Each failure of the old checkpoints has a test named after it: a concrete target from an eager ``tx.init`` on a
mesh, silent casts, and the documented loaders on ``nnx.state(model)``. The NumPy loader of
``docs/compressed_format.md`` is executed from the document itself.
"""

import json
import os
import pathlib
import re
import runpy
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxsparse as js
from jaxsparse import checkpoint
from jaxsparse.flax import BlockSparseLinear, NMLinear, SparsePattern, convert

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "compressed_format.md"


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _sparse_model():
    model = nnx.Module()
    model.fc = BlockSparseLinear(8, 16, block=(4, 4), capacity=5, rngs=nnx.Rngs(0))
    model.nm = NMLinear(16, 8, rngs=nnx.Rngs(1))
    return model


# ------------------------------------------------------------------------------------------------ round trips
def test_round_trip_pure_dict_with_none_masks_and_python_scalar(tmp_path):
    tree = {
        "w": jnp.arange(6.0).reshape(2, 3),
        "mask": {"w": jnp.array([[True, False, True], [False, True, True]]), "b": None},
        "half": jnp.ones(3, jnp.bfloat16),
        "scale": 0.5,
    }
    checkpoint.save(tmp_path / "c", tree)
    back = checkpoint.restore(tmp_path / "c", tree)
    _equal(back, tree)
    assert back["mask"]["b"] is None and isinstance(back["scale"], float)
    with pytest.raises(ValueError, match="already exists"):
        checkpoint.save(tmp_path / "c", tree)


def test_round_trip_nnx_state_keeps_variables(tmp_path):
    model = _sparse_model()
    state = nnx.state(model)
    checkpoint.save(tmp_path / "m", state)
    fresh = _sparse_model()
    nnx.update(fresh, jax.tree.map(jnp.zeros_like, nnx.state(fresh)))
    nnx.update(fresh, checkpoint.restore(tmp_path / "m", nnx.state(fresh)))
    _equal(nnx.to_pure_dict(nnx.state(fresh)), nnx.to_pure_dict(state))
    layout = json.loads((tmp_path / "m" / "layout.json").read_text())
    assert "fc/kernel_blocks" in layout["leaves"]  # the Variable's value is not a path level
    assert not any(k.endswith("/value") for k in layout["leaves"])


def test_round_trip_training_state_with_sparse_state(tmp_path):
    params = {"a": jax.random.normal(jax.random.PRNGKey(0), (8, 8)), "b": jnp.zeros(8)}
    tx = js.rigl(optax.adam(1e-2), 0.5, update_every=2, total_steps=10)
    state = tx.init(params)
    tree = {"params": params, "opt_state": state}
    checkpoint.save(tmp_path / "t", tree)
    back = checkpoint.restore(tmp_path / "t", tree)
    _equal(back, tree)
    assert isinstance(back["opt_state"], js.SparseState) and back["opt_state"].masks["b"] is None


# ------------------------------------------------------------------------------------------------ strictness
def test_restore_dtype_mismatch_is_an_error_not_a_cast(tmp_path):
    """Failure 5b: restore silently cast f32 -> bf16 and a bool mask -> f32."""
    tree = {"w": jnp.ones((2, 2)), "mask": jnp.ones((2, 2), bool)}
    checkpoint.save(tmp_path / "c", tree)
    with pytest.raises(
        ValueError, match=r"leaf 'w': checkpoint has .*float32.*target has .*bfloat16"
    ):
        checkpoint.restore(tmp_path / "c", {**tree, "w": jnp.ones((2, 2), jnp.bfloat16)})
    with pytest.raises(ValueError, match=r"leaf 'mask': checkpoint has .*bool.*never casts"):
        checkpoint.restore(tmp_path / "c", {**tree, "mask": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"leaf 'w': .*\[2, 2\].*\[2, 3\]"):
        checkpoint.restore(tmp_path / "c", {**tree, "w": jnp.ones((2, 3))})


def test_restore_structure_mismatch_is_an_error(tmp_path):
    tree = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    checkpoint.save(tmp_path / "c", tree)
    with pytest.raises(
        ValueError, match=r"only in the target \['v'\], only in the checkpoint \['w'\]"
    ):
        checkpoint.restore(tmp_path / "c", {"v": jnp.ones((2, 2)), "b": jnp.zeros(2)})
    with pytest.raises(ValueError, match="no layout.json"):
        checkpoint.restore(tmp_path, tree)


def test_compressed_layer_mismatch_names_the_layer(tmp_path):
    model = _sparse_model()
    checkpoint.save(tmp_path / "m", nnx.state(model))
    other = nnx.Module()
    other.fc = BlockSparseLinear(8, 16, block=(4, 4), capacity=6, rngs=nnx.Rngs(0))
    other.nm = NMLinear(16, 8, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"layer 'fc': checkpoint has capacity=5"):
        checkpoint.restore(tmp_path / "m", nnx.state(other))


def test_convert_save_restore_layout_are_deprecated_aliases(tmp_path):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        save, restore, layout = convert.save, convert.restore, convert.layout
    assert save is checkpoint.save and restore is checkpoint.restore and layout is checkpoint.layout
    assert len(w) == 3 and all(issubclass(x.category, DeprecationWarning) for x in w)
    assert "jaxsparse.checkpoint.save" in str(w[0].message)


# ------------------------------------------------------------------------------------------------ on a mesh
_PROGRAM = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jaxsparse as js

def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))

def setup():
    m = mesh()
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"fc1": {"kernel": jax.random.normal(k1, (16, 32)), "bias": jnp.zeros(32)},
              "fc2": {"kernel": jax.random.normal(k2, (32, 8)), "bias": jnp.zeros(8)}}
    specs = {"fc1": {"kernel": P("a", "b"), "bias": P("b")}, "fc2": {"kernel": P("a", "b"), "bias": P("b")}}
    params = jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(m, s)), params, specs)
    tx = js.rigl(optax.adamw(1e-2), js.budget(0.8, "erk"), update_every=3, total_steps=40)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 16))

    def loss(p):
        h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
        return jnp.mean((h @ p["fc2"]["kernel"] + p["fc2"]["bias"]) ** 2)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    return params, tx, step

def run(params, state, step, n):
    for _ in range(n):
        params, state = step(params, state)
    return params, state

def record(params, state):
    leaves = jax.tree.leaves((params, state.masks, state.step, state.inner_state))
    return {str(i): np.asarray(x) for i, x in enumerate(leaves)}

def resume(directory, out):
    params, tx, step = setup()
    target = {"params": params, "state": tx.init(params)}  # the documented concrete target
    restored = js.checkpoint.restore(directory, target)
    params, state = run(restored["params"], restored["state"], step, 10)
    np.savez(out, **record(params, state))
"""


def _program(tmp_path):
    path = tmp_path / "program.py"
    path.write_text(textwrap.dedent(_PROGRAM))
    return runpy.run_path(str(path)), path


def test_restore_eager_init_target_on_mesh_resumes_bit_exactly_in_fresh_process(tmp_path):
    """Failure 5a: a concrete target from an eager tx.init failed at the first step on a mesh."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    prog, path = _program(tmp_path)
    params, tx, step = prog["setup"]()
    params, state = prog["run"](params, tx.init(params), step, 5)
    checkpoint.save(tmp_path / "ckpt", {"params": params, "state": state})
    expected = prog["record"](*prog["run"](params, state, step, 10))
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = (
        f"import runpy; runpy.run_path({str(path)!r})['resume']"
        f"({str(tmp_path / 'ckpt')!r}, {str(tmp_path / 'out.npz')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    got = np.load(tmp_path / "out.npz")
    assert sorted(got.files, key=int) == sorted(expected, key=int)
    for k, v in expected.items():
        np.testing.assert_array_equal(got[k], v)


def test_restore_abstract_target_with_shardings_on_mesh(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    prog, _ = _program(tmp_path)
    params, tx, step = prog["setup"]()
    params, state = prog["run"](params, tx.init(params), step, 4)
    tree = {"params": params, "state": state}
    checkpoint.save(tmp_path / "ckpt", tree)
    mesh = prog["mesh"]()
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=x.sharding if x.ndim else replicated
        ),
        tree,
    )
    back = checkpoint.restore(tmp_path / "ckpt", abstract)
    _equal(back, tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(abstract)):
        assert a.sharding == b.sharding
    p1, s1 = prog["run"](back["params"], back["state"], step, 3)
    p2, s2 = prog["run"](params, state, step, 3)
    _equal((p1, s1.masks), (p2, s2.masks))


# ------------------------------------------------------------------------------------------------ docs loader
def _doc_numpy_code():
    """The NumPy code blocks of docs/compressed_format.md (the PyTorch block needs torch: not run)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    return [b for b in blocks if "import torch" not in b]


def _doc_namespace():
    ns = {}
    for block in _doc_numpy_code():
        exec(compile(block, str(DOC), "exec"), ns)
    return ns


def _check_layers_with_doc_loader(directory, dense_kernels):
    ns = _doc_namespace()
    arrays, layout = ns["load"](str(directory))
    assert set(layout["layers"]) == set(dense_kernels)
    for name, want in dense_kernels.items():
        layer = layout["layers"][name]
        if layer["format"] == "block_sparse":
            got = ns["block_dense"](arrays, layer)
        else:
            got = ns["nm_dense"](
                ns["get"](arrays, layer, "kernel_values"),
                ns["get"](arrays, layer, "meta"),
                layer["n"],
                layer["m"],
                layer["pack_tile"],
                layer["bits"],
            )
        np.testing.assert_array_equal(got, np.asarray(want))
    return arrays, layout


def test_documented_numpy_loader_reads_nnx_state(tmp_path):
    """Failure 5c: the documented loader crashed on nnx.state(model) (layout paths missed the value level)."""
    model = _sparse_model()
    checkpoint.save(tmp_path / "m", nnx.state(model))
    arrays, _ = _check_layers_with_doc_loader(
        tmp_path / "m", {"fc": model.fc.todense(), "nm": model.nm.todense()}
    )
    np.testing.assert_array_equal(arrays["fc"]["bias"], np.asarray(model.fc.bias[...]))


def test_documented_numpy_loader_reads_pure_dict_and_training_state(tmp_path):
    model = _sparse_model()
    _, params, pattern = nnx.split(model, nnx.Param, SparsePattern)
    pure = {"params": nnx.to_pure_dict(params), "pattern": nnx.to_pure_dict(pattern)}
    checkpoint.save(tmp_path / "pure", pure)
    dense = {"fc": model.fc.todense(), "nm": model.nm.todense()}
    _check_layers_with_doc_loader(tmp_path / "pure", dense)
    tx = optax.adamw(1e-3)
    train = {"params": params, "pattern": pattern, "opt": tx.init(params), "step": jnp.int32(3)}
    checkpoint.save(tmp_path / "train", train)
    arrays, layout = _check_layers_with_doc_loader(tmp_path / "train", dense)
    assert int(arrays["step"]) == 3 and "opt/0/mu/fc/kernel_blocks" in layout["leaves"]


def test_documented_torch_loader_indexes_like_the_numpy_one():
    """torch is not installed: the PyTorch block must use the same fields as the tested NumPy helpers."""
    torch_block = next(
        b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if "import torch" in b
    )
    for field in ("col_ptr", "row_idx", "kernel_blocks", "nnz"):
        assert f'get(arrays, L, "{field}")' in torch_block
    assert "[:nnz].transpose(0, 2, 1)" in torch_block and "size=(N, K)" in torch_block
