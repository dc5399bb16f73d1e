"""The layer-by-layer driver: sequential calibration on pruned outputs, NNX and Linen, sharded batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from jaxsparse.posttraining import (
    hessian_from_stats,
    init_activation_stats,
    sparsegpt_prune,
    update_activation_stats,
    wanda_prune,
)
from jaxsparse.posttraining.driver import prune_linen, prune_nnx


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 16, rngs=rngs)
        self.out = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(32, name="fc1")(x))
        x = jax.nn.relu(nn.Dense(16, name="fc2")(x))
        return nn.Dense(8, name="out")(x)


def batches(n=4, seed=0):
    x = jax.random.normal(jax.random.PRNGKey(seed), (n, 32, 16)) * jnp.exp(jnp.linspace(-1, 1, 16))
    return [x[i] for i in range(n)]


def manual_sequential(kernels, biases, xs, prune):
    """Reference: prune layer l on the inputs produced by layers < l after they were pruned."""
    out_k = []
    hs = [x for x in xs]
    for i, (k, b) in enumerate(zip(kernels, biases)):
        stats = init_activation_stats(k.shape[0])
        for h in hs:
            stats = update_activation_stats(stats, h)
        kp = prune(k, stats)
        out_k.append(kp)
        hs = [h @ kp + b for h in hs]
        if i < len(kernels) - 1:
            hs = [jax.nn.relu(h) for h in hs]
    return out_k


def test_nnx_driver_calibrates_on_pruned_outputs():
    model = MLP(nnx.Rngs(0))
    xs = batches()
    res = prune_nnx(model, xs, method="wanda", sparsity=0.5, progress=False)
    assert list(res.masks) == ["fc1", "fc2", "out"]  # call order
    layers = [model.fc1, model.fc2, model.out]
    ref = manual_sequential(
        [layer.kernel[...] for layer in layers],
        [layer.bias[...] for layer in layers],
        xs,
        lambda k, s: wanda_prune(k, s.sq_sum, 0.5)[0],
    )
    got = [res.model.fc1.kernel[...], res.model.fc2.kernel[...], res.model.out.kernel[...]]
    for g, r, m in zip(got, ref, res.masks.values()):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6)
        assert np.all(np.asarray(g)[~np.asarray(m)] == 0)
        assert np.all(np.asarray(m).sum(0) == m.shape[0] // 2)
    assert float(jnp.mean(model.fc1.kernel[...] == 0)) < 0.01  # input model untouched
    # "all" computes every layer's statistics on the dense model: differs after the first layer
    res_all = prune_nnx(model, xs, method="wanda", sparsity=0.5, groups="all", progress=False)
    np.testing.assert_array_equal(np.asarray(res_all.masks["fc1"]), np.asarray(res.masks["fc1"]))
    assert not np.array_equal(np.asarray(res_all.masks["fc2"]), np.asarray(res.masks["fc2"]))


def test_linen_driver_sparsegpt_nm_matches_manual():
    net = LinenMLP()
    xs = batches(seed=1)
    variables = net.init(jax.random.PRNGKey(0), xs[0])
    res = prune_linen(
        net,
        variables,
        xs,
        method="sparsegpt",
        sparsity=(2, 4),
        blocksize=8,
        layers=lambda n: n != "out",
        progress=False,
    )
    assert list(res.masks) == ["fc1", "fc2"]
    p = variables["params"]
    ref = manual_sequential(
        [p["fc1"]["kernel"], p["fc2"]["kernel"]],
        [p["fc1"]["bias"], p["fc2"]["bias"]],
        xs,
        lambda k, s: sparsegpt_prune(k, hessian_from_stats(s), (2, 4), blocksize=8)[0],
    )
    for name, r in zip(["fc1", "fc2"], ref):
        np.testing.assert_allclose(
            np.asarray(res.model["params"][name]["kernel"]), np.asarray(r), atol=1e-5
        )
    np.testing.assert_array_equal(
        np.asarray(res.model["params"]["out"]["kernel"]), np.asarray(p["out"]["kernel"])
    )
    groups = np.asarray(res.masks["fc2"]).reshape(8, 4, 16).sum(1)
    assert np.all(groups == 2)


def test_driver_with_sharded_batches_equals_single_device():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    xs = batches(n=2, seed=2)
    model = MLP(nnx.Rngs(1))
    single = prune_nnx(model, xs, method="sparsegpt", sparsity=0.5, blocksize=16, progress=False)
    sharded_xs = [jax.device_put(x, spec) for x in xs]
    assert len(sharded_xs[0].sharding.device_set) == 8
    multi = prune_nnx(
        model, sharded_xs, method="sparsegpt", sparsity=0.5, blocksize=16, progress=False
    )
    for n in single.masks:
        np.testing.assert_array_equal(np.asarray(single.masks[n]), np.asarray(multi.masks[n]))
    np.testing.assert_allclose(
        np.asarray(single.model.fc2.kernel[...]), np.asarray(multi.model.fc2.kernel[...]), atol=1e-4
    )


def test_driver_dsnot_and_magnitude_keep_counts():
    model = MLP(nnx.Rngs(2))
    xs = [x + 1.0 for x in batches(seed=3)]
    for method in ["dsnot"]:
        res = prune_nnx(
            model,
            xs,
            method=method,
            sparsity=(2, 4),
            progress=False,
            dsnot_options=dict(update_threshold=0.0),
        )
        for m in res.masks.values():
            assert np.all(np.asarray(m).reshape(m.shape[0] // 4, 4, -1).sum(1) == 2)
    wanda = prune_nnx(model, xs, method="wanda", sparsity=0.5, progress=False)
    dsnot = prune_nnx(
        model,
        xs,
        method="dsnot",
        sparsity=0.5,
        progress=False,
        dsnot_options=dict(update_threshold=0.0),
    )
    assert any(
        not np.array_equal(np.asarray(wanda.masks[n]), np.asarray(dsnot.masks[n]))
        for n in wanda.masks
    )
    for n in wanda.masks:
        np.testing.assert_array_equal(
            np.asarray(dsnot.masks[n]).sum(0), np.asarray(wanda.masks[n]).sum(0)
        )


def test_driver_bad_inputs():
    model = MLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`batches\[0\]`.*\(32, 12\)"):
        prune_nnx(model, [jnp.ones((32, 12))], progress=False)
    with pytest.raises(ValueError, match=r"`method` must be one of.*'obs'"):
        prune_nnx(model, batches(), method="obs", progress=False)
    with pytest.raises(ValueError, match=r"2:3.*layer 'fc1'.*in_features=16"):
        prune_nnx(model, batches(), sparsity=(2, 3), progress=False)
    with pytest.raises(ValueError, match=r"`batches` must be a non-empty sequence"):
        prune_nnx(model, iter(batches()), progress=False)
    with pytest.warns(
        UserWarning, match=r"fc2: 8 calibration tokens for 32 input features.*dampening"
    ):
        prune_nnx(
            model,
            [batches()[0][:8]],
            method="sparsegpt",
            layers=lambda n: n == "fc2",
            progress=False,
        )
