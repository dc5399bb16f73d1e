"""OWL layer-wise sparsity: the closed-form ratios, the outlier count, and the driver option (NNX and Linen)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from jaxsparse.posttraining import OWL, outlier_ratio, owl_sparsities, prune_linen, prune_nnx


def test_outlier_ratio_counts_scores_above_threshold_times_mean():
    w = jnp.array([[1.0, 1.0], [1.0, 10.0], [1.0, 1.0], [1.0, 1.0]])
    # scores |w| * sqrt([1, 1, 4, 1]): mean = (1+1+1+10+2+2+1+1)/8 = 2.375; > 2 * 2.375 only the 10
    assert outlier_ratio([w], [jnp.array([1.0, 1.0, 4.0, 1.0])], threshold=2.0) == 1 / 8
    # a block of two kernels shares one mean: the second kernel's small scores lower it
    r = outlier_ratio([w, jnp.full((4, 2), 0.1)], [jnp.ones(4)] * 2, threshold=2.0)
    assert r == 1 / 16


@given(
    st.lists(st.floats(0.0, 0.2), min_size=2, max_size=8),
    st.sampled_from([0.3, 0.5, 0.7]),
    st.sampled_from([0.0, 0.04, 0.08]),
)
def test_owl_sparsities_mean_range_and_order(ratios, sparsity, lam):
    out = owl_sparsities(dict(enumerate(ratios)), sparsity, lam)
    s = np.array([out[i] for i in range(len(ratios))])
    assert abs(s.mean() - sparsity) < 1e-9
    assert (np.abs(s - sparsity) <= 2 * lam + 1e-9).all()
    d = np.array(ratios)
    if d.max() > d.min():
        assert s.max() - s.min() == pytest.approx(2 * lam)  # the ends are 2*lam apart exactly
    for i in range(len(d)):
        for j in range(len(d)):
            if d[i] > d[j]:
                assert s[i] < s[j] + 1e-12  # more outliers, lower sparsity


def test_owl_sparsities_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lam"):
        owl_sparsities({"a": 0.0, "b": 1.0}, 0.9, lam=0.2)  # 0.9 + 0.2 >= 1
    with pytest.raises(ValueError, match="lam"):
        owl_sparsities({"a": 0.0}, 0.5, lam=1.5)
    with pytest.raises(ValueError, match="ratios"):
        owl_sparsities({}, 0.5)
    with pytest.raises(ValueError, match="threshold"):
        outlier_ratio([jnp.ones((2, 2))], [jnp.ones(2)], threshold=0.0)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def _batches():
    return [jax.random.normal(jax.random.PRNGKey(i), (32, 16)) for i in range(2)]


def _planted():
    """5 of fc1's 32 output columns are 50x its typical weight (15.6% outliers), so OWL prunes fc1 less."""
    model = MLP(nnx.Rngs(0))
    k = model.fc1.kernel[...]
    model.fc1.kernel[...] = k.at[:, :5].set(10.0)
    return model


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_nnx_owl_exact_per_layer_sparsity(method):
    res = prune_nnx(
        _planted(), _batches(), method=method, sparsity=0.5, owl=OWL(lam=0.1), progress=False
    )
    r = res.report
    assert r["fc1"]["outlier_ratio"] > r["fc2"]["outlier_ratio"]
    assert r["fc1"]["target_sparsity"] == pytest.approx(0.4)
    assert r["fc2"]["target_sparsity"] == pytest.approx(0.6)
    # exact counts: floor(s * fan_in) per output column (wanda) or floor(s * size) over the layer
    per_column = method == "wanda"
    assert int((~res.masks["fc1"]).sum()) == (6 * 32 if per_column else 204)  # 0.4 * 16, 0.4 * 512
    assert int((~res.masks["fc2"]).sum()) == (19 * 16 if per_column else 307)  # 0.6 * 32, 0.6 * 512


def test_prune_nnx_owl_one_block_is_uniform():
    uniform = prune_nnx(_planted(), _batches(), method="wanda", sparsity=0.5, progress=False)
    res = prune_nnx(
        _planted(),
        _batches(),
        method="wanda",
        sparsity=0.5,
        owl=OWL(block=lambda name: "all"),
        progress=False,
    )
    for name in ("fc1", "fc2"):
        assert res.report[name]["target_sparsity"] == 0.5
        np.testing.assert_array_equal(res.masks[name], uniform.masks[name])


def test_prune_nnx_owl_rejects_nm_and_missing_batches():
    with pytest.raises(ValueError, match="N:M"):
        prune_nnx(MLP(nnx.Rngs(0)), _batches(), sparsity=(2, 4), owl=OWL(), progress=False)
    with pytest.raises(ValueError, match="batches"):
        prune_nnx(MLP(nnx.Rngs(0)), [], method="magnitude", owl=OWL(), progress=False)
    with pytest.raises(TypeError, match="owl"):
        prune_nnx(MLP(nnx.Rngs(0)), _batches(), owl={"lam": 0.1}, progress=False)


def test_prune_linen_owl_matches_nnx():
    class LinenMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, name="fc2")(jax.nn.relu(nn.Dense(32, name="fc1")(x)))

    nnx_model = _planted()
    variables = {
        "params": {
            n: {
                "kernel": getattr(nnx_model, n).kernel[...],
                "bias": getattr(nnx_model, n).bias[...],
            }
            for n in ("fc1", "fc2")
        }
    }
    a = prune_nnx(nnx_model, _batches(), sparsity=0.5, owl=OWL(lam=0.1), progress=False)
    b = prune_linen(
        LinenMLP(), variables, _batches(), sparsity=0.5, owl=OWL(lam=0.1), progress=False
    )
    for n in ("fc1", "fc2"):
        assert a.report[n]["target_sparsity"] == b.report[n]["target_sparsity"]
        np.testing.assert_array_equal(a.masks[n], b.masks[n])
