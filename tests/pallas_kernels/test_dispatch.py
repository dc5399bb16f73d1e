"""Shared dispatch: cost model decisions, measured-table override, user override, platform switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pallas_kernels import dispatch
from pallas_kernels.block_sparse import block_sparse_from_dense, plan, sparse_problem


def _problem(m=4096, density=0.1, efficiency=0.7, dtype=jnp.bfloat16, k=4096, n=4096):
    return dispatch.MatmulProblem(
        op="block_sparse",
        m=m,
        k=k,
        n=n,
        dtype=dtype,
        weight_bytes=density * k * n * 2,
        flop_fraction=density,
        efficiency=efficiency,
        config=(128, 128),
    )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_low_density_large_batch_picks_sparse_and_high_density_picks_dense(platform):
    assert dispatch.choose(_problem(density=0.1), platform) == "sparse"
    assert dispatch.choose(_problem(density=0.9), platform) == "dense"
    # a kernel far less efficient than its density saving is not worth it
    assert dispatch.choose(_problem(density=0.5, efficiency=0.3), platform) == "dense"


@given(
    st.sampled_from(["cpu", "tpu", "cuda"]),
    st.sampled_from([1, 16, 256, 4096]),
    st.floats(0.01, 1.0),
    st.floats(0.05, 1.0),
)
def test_sparse_estimate_is_monotone_in_density_and_dense_does_not_depend_on_it(
    platform, m, density, eff
):
    hw = dispatch.HARDWARE[platform]
    dense_a, sparse_a = dispatch.estimate_seconds(
        _problem(m=m, density=density, efficiency=eff), hw
    )
    dense_b, sparse_b = dispatch.estimate_seconds(
        _problem(m=m, density=min(1.0, density * 1.5), efficiency=eff), hw
    )
    assert dense_a == dense_b
    assert sparse_b >= sparse_a
    # at full density with a perfect kernel, sparse can never be cheaper than dense
    dense_full, sparse_full = dispatch.estimate_seconds(
        _problem(m=m, density=1.0, efficiency=1.0), hw
    )
    assert sparse_full >= dense_full


def test_measured_table_overrides_the_model():
    p = _problem(density=0.1)
    key = dispatch.table_key(p, "cuda")
    assert dispatch.choose(p, "cuda", measured={key: "dense"}) == "dense"
    assert dispatch.choose(p, "cuda", measured={}) == "sparse"
    with pytest.raises(
        ValueError, match="measured table values must be 'dense' or 'sparse'; got 'fast'"
    ):
        dispatch.choose(p, "cuda", measured={key: "fast"})


def test_bad_platform_and_impl_are_rejected():
    with pytest.raises(ValueError, match=r"platform must be one of .* got 'metal'"):
        dispatch.choose(_problem(), "metal")
    with pytest.raises(
        ValueError, match=r"impl must be one of \('auto', 'dense', 'xla', 'pallas'\); got 'sparse'"
    ):
        dispatch.check_impl("sparse")
    assert dispatch.check_impl("pallas") == "pallas"


def test_platform_switch_runs_default_on_cpu_and_selects_branch_when_lowering():
    f = jax.jit(
        lambda x: dispatch.platform_switch(x, default=lambda v: v + 1.0, tpu=lambda v: jnp.sin(v))
    )
    assert float(f(1.0)) == 2.0
    assert "sine" in f.trace(1.0).lower(lowering_platforms=("tpu",)).as_text()
    assert "sine" not in f.trace(1.0).lower(lowering_platforms=("cpu",)).as_text()
    assert float(dispatch.platform_switch(1.0, default=lambda v: v * 3.0)) == 3.0


def _weight(k, n, bk, bn, density, dtype=jnp.bfloat16):
    kb, nb = k // bk, n // bn
    mask = np.zeros((kb, nb), bool)
    mask.flat[: max(1, int(round(density * kb * nb)))] = True
    return block_sparse_from_dense(
        jnp.zeros((k, n), dtype), mask, block=(bk, bn), capacity=int(mask.sum())
    )


def test_block_sparse_plan_is_honest_per_platform():
    sparse = _weight(4096, 4096, 128, 128, 0.05)
    dense_ish = _weight(4096, 4096, 128, 128, 1.0)
    assert dict(plan(4096, sparse).branches) == {
        "default": dict(plan(4096, sparse).branches)["default"],
        "tpu": "tpu",
        "cuda": "mosaic_gpu",
    }
    assert set(dict(plan(4096, dense_ish).branches).values()) == {"dense"}
    # a TPU-untileable block size never selects the TPU kernel
    small_blocks = _weight(4096, 4096, 32, 32, 0.05)
    assert dict(plan(4096, small_blocks).branches)["tpu"] in ("xla", "dense")
    # user overrides win over the model
    assert set(dict(plan(4096, dense_ish, impl="xla").branches).values()) == {"xla"}
    assert set(dict(plan(16, sparse, impl="dense").branches).values()) == {"dense"}


def test_sparse_problem_describes_capacity_not_live_blocks():
    w = _weight(512, 512, 128, 128, 0.25)
    p = sparse_problem(64, w, "tpu")
    assert p.flop_fraction == pytest.approx(w.capacity / 16)
    assert p.weight_bytes >= w.capacity * 128 * 128 * 2
    assert p.grid_steps == w.capacity  # one M block of 64 rows
