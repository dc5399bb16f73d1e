"""Shared dispatch: cost model decisions, measured-table override, user override, platform switch."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.extend.core import Primitive
from jax.interpreters import mlir

from pallas_kernels import dispatch
from pallas_kernels.block_sparse import (
    block_mask_of,
    block_sparse_from_dense,
    block_sparse_to_dense,
    bsr_matmul,
    plan,
    sparse_problem,
)
from pallas_kernels.nm import nm_matmul, pack_nm, unpack_nm
from pallas_kernels.nm import plan as nm_plan


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


def _product(backend, static, v):
    return v + static if backend == "xla" else jnp.sin(v)


def test_run_plan_runs_default_on_cpu_and_selects_branch_when_lowering():
    p = dispatch.Plan(branches=(("default", "xla"), ("tpu", "dense")))
    f = jax.jit(lambda x: dispatch.run_plan(p, _product, 1.0, x))
    assert float(f(1.0)) == 2.0
    assert "sine" in f.trace(1.0).lower(lowering_platforms=("tpu",)).as_text()
    assert "sine" not in f.trace(1.0).lower(lowering_platforms=("cpu",)).as_text()
    one = dispatch.Plan(branches=(("default", "xla"), ("tpu", "xla")))
    assert "cond" not in str(
        jax.make_jaxpr(lambda x: dispatch.run_plan(one, _product, 3.0, x))(1.0)
    )


_broken_p = Primitive("broken_on_cuda")
_broken_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(_broken_p, lambda ctx, x: [x], platform="cpu")
mlir.register_lowering(_broken_p, lambda ctx, x: [x], platform="tpu")


def _raise_lowering(ctx, x):
    raise NotImplementedError("this kernel cannot lower here")


mlir.register_lowering(_broken_p, _raise_lowering, platform="cuda")


def _kernels(backend, static, v):
    if backend == "xla":
        return v + 1.0
    if backend == "trace_fails":
        raise TypeError("load() takes 1 positional argument but 2 were given")
    if backend == "lower_fails":
        return _broken_p.bind(v) * 3.0
    return v * 2.0  # "good"


@pytest.mark.parametrize("failure", ["trace_fails", "lower_fails"])
def test_a_branch_that_cannot_be_built_never_breaks_another_platform(failure):
    """The issue: a Mosaic GPU kernel that failed to trace (0.12 API change) or lower (bank-conflict
    check) broke impl='auto' on CPU. Every other platform keeps its branch; the broken one runs XLA."""
    p = dispatch.Plan(branches=(("default", "xla"), ("tpu", "good"), ("cuda", failure)))
    f = jax.jit(lambda x: dispatch.run_plan(p, _kernels, None, x))
    with pytest.warns(RuntimeWarning, match=f"the {failure} kernel cannot be built for cuda"):
        assert float(f(1.0)) == 2.0  # CPU: the default branch
    tpu = f.trace(1.0).lower(lowering_platforms=("tpu",)).as_text()
    assert "multiply" in tpu  # v * 2.0: the good kernel
    cuda = f.trace(1.0).lower(lowering_platforms=("cuda",)).as_text()
    assert "add" in cuda and "multiply" not in cuda  # the XLA fallback, not the broken kernel
    with pytest.raises(RuntimeError, match="cannot be built for cuda"):
        dispatch.run_plan(p, _kernels, None, jnp.ones(()), strict="cuda")


def test_cpu_only_process_builds_no_kernel_branch():
    assert dispatch.target_platforms() == ("cpu",)
    sparse = _weight(4096, 4096, 128, 128, 0.05)
    assert plan(64, sparse).branches == (("default", plan(64, sparse).backend("cpu")),)
    w_nm = pack_nm(jnp.zeros((4096, 256), jnp.bfloat16))
    assert nm_plan(1, w_nm).branches == (("default", nm_plan(1, w_nm).backend("cpu")),)


@pytest.mark.parametrize("op", ["block_sparse", "nm"])
def test_auto_on_cpu_works_whatever_the_accelerator_kernels_do(monkeypatch, op):
    """Broken TPU and GPU kernels (raising at trace time): impl='auto' on CPU still runs, with or without
    their branches built, and still lowers for the other accelerator through XLA."""
    from pallas_kernels.block_sparse import api as bs_api
    from pallas_kernels.nm import api as nm_api

    def broken(*args, **kwargs):
        raise TypeError("an API this jax version does not have")

    api = bs_api if op == "block_sparse" else nm_api
    for name in ("tpu", "mosaic_gpu"):
        kernel = api._KERNELS[name]
        monkeypatch.setitem(
            api._KERNELS,
            name,
            kernel._replace(forward=broken, grad_x=broken, unsupported_reason=lambda *a, **k: None),
        )
    monkeypatch.setattr(dispatch, "choose", lambda *a, **k: "sparse")  # kernels wherever they run
    if op == "block_sparse":
        w = _weight(256, 256, 128, 128, 0.5, jnp.float32)
        w = block_sparse_from_dense(
            jnp.ones((256, 256)), block_mask_of(w), block=(128, 128), capacity=w.capacity
        )
        fn, ref = bsr_matmul, lambda x: x @ block_sparse_to_dense(w)
    else:
        w = pack_nm(jnp.ones((256, 128)))
        fn, ref = nm_matmul, lambda x: x @ unpack_nm(w)
    x = jnp.ones((2, 256))
    everywhere = ("cpu", "tpu", "cuda")
    chosen = (bs_api.plan if op == "block_sparse" else nm_api.plan)(2, w, platforms=everywhere)
    assert {chosen.backend("tpu"), chosen.backend("cuda")} == {
        "tpu",
        "mosaic_gpu",
    }  # the broken ones
    for platforms in (None, everywhere):
        f = jax.jit(lambda x, w, p=platforms: fn(x, w, impl="auto", platforms=p))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            np.testing.assert_allclose(f(x, w), ref(x), rtol=1e-5)
            np.testing.assert_allclose(
                jax.grad(lambda x: jnp.sum(f(x, w)))(x),
                jax.grad(lambda x: jnp.sum(ref(x)))(x),
                rtol=1e-5,
            )
            if platforms:
                text = f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
                assert "mosaic_gpu" not in text


def test_both_ops_share_impl_semantics_and_plan_type():
    w = _weight(512, 512, 128, 128, 0.25, jnp.float32)
    w_nm = pack_nm(jnp.zeros((512, 512)))
    for impl in ("dense", "xla"):
        a = plan(8, w, impl=impl, platforms=("cpu", "tpu", "cuda"))
        b = nm_plan(8, w_nm, impl=impl, platforms=("cpu", "tpu", "cuda"))
        assert type(a) is type(b) is dispatch.Plan
        assert a == b == dispatch.Plan(branches=(("default", impl), ("tpu", impl), ("cuda", impl)))
    with pytest.raises(ValueError, match="platforms must hold names from"):
        plan(8, w, platforms=("metal",))
    with pytest.raises(ValueError, match="gpu_backend must be None, 'mosaic_gpu' or 'triton'"):
        nm_plan(8, w_nm, gpu_backend="cutlass")


def test_kernel_backend_by_platform_and_override():
    assert dispatch.kernel_backend("cpu") is None
    assert dispatch.kernel_backend("tpu") == "tpu"
    assert dispatch.kernel_backend("cuda") == "mosaic_gpu"  # no local device: assume sm90+
    assert dispatch.kernel_backend("cuda", "triton") == "triton"
    assert dispatch.kernel_backend("rocm") == "triton"
    assert dispatch.hardware_for("cuda", "triton").name.startswith("A100")
    assert dispatch.HARDWARE["cuda_sm80"].flops_per_s == 312e12
    assert dispatch.HARDWARE["cuda_sm80"].bytes_per_s == 2.0e12


def test_a_triton_kernel_plugs_in_with_one_registry_entry(monkeypatch):
    """sm80-sm89/ROCm run 'triton'; on sm90 it takes over where Mosaic GPU cannot (float32 here)."""
    from pallas_kernels.block_sparse import api as bs_api

    triton = bs_api._KERNELS["tpu"]._replace(unsupported_reason=lambda *a: None)
    monkeypatch.setitem(bs_api._KERNELS, "triton", triton)
    w = _weight(512, 512, 128, 128, 0.25, jnp.float32)
    p = plan(8, w, impl="xla", platforms=("cpu", "cuda", "rocm"))  # impl overrides still win
    assert p.backend("cuda") == p.backend("rocm") == "xla"
    monkeypatch.setattr(dispatch, "choose", lambda *a, **k: "sparse")
    p = plan(8, w, platforms=("cpu", "cuda", "rocm"))
    assert (p.backend("cuda"), p.backend("rocm")) == ("triton", "triton")  # f32: no Mosaic GPU
    bf16 = _weight(512, 512, 128, 128, 0.25, jnp.bfloat16)
    assert plan(8, bf16, platforms=("cpu", "cuda")).backend("cuda") == "mosaic_gpu"
    assert (
        plan(8, bf16, platforms=("cpu", "cuda"), gpu_backend="triton").backend("cuda") == "triton"
    )


def test_densify_cost_counts_in_the_dense_option():
    """Issue: auto picked 'dense' for a stored sparse weight and paid a densify per call it never priced."""
    held = _problem(m=16, density=0.5, dtype=jnp.float32, k=1024, n=1024)
    stored = held._replace(densify_bytes=0.5 * 1024 * 1024 * 4 + 2 * 1024 * 1024 * 4)
    hw = dispatch.HARDWARE["cpu"]
    dense_held, sparse = dispatch.estimate_seconds(held, hw)
    dense_stored, sparse_same = dispatch.estimate_seconds(stored, hw)
    assert sparse == sparse_same
    assert dense_stored - dense_held == pytest.approx(stored.densify_bytes / hw.bytes_per_s)
    w = _weight(1024, 1024, 128, 128, 0.5, jnp.float32)
    assert sparse_problem(16, w, "xla").densify_bytes >= 2 * 1024 * 1024 * 4


def test_measured_table_nearest_point_and_the_committed_table():
    p = _problem(m=16, density=0.1, k=1024, n=1024)
    key = dispatch.table_key(p, "cpu")
    table = {key: "dense"}
    assert dispatch.choose(p._replace(m=24), "cpu", measured=table) == "dense"  # within 2x: nearest
    model = dispatch.choose(p._replace(m=64), "cpu", measured={})
    assert dispatch.choose(p._replace(m=64), "cpu", measured=table) == model  # 4x away: the model
    assert dispatch.choose(p._replace(flop_fraction=0.3), "cpu", measured=table) == dispatch.choose(
        p._replace(flop_fraction=0.3), "cpu", measured={}
    )
    for key, choice in dispatch.MEASURED.items():
        assert (
            choice in ("dense", "sparse") and key[1] == "cpu" and key[0] in ("block_sparse", "nm")
        )


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
    everywhere = ("cpu", "tpu", "cuda")
    p = plan(4096, sparse, platforms=everywhere)
    assert (p.backend("tpu"), p.backend("cuda")) == ("tpu", "mosaic_gpu")
    assert set(dict(plan(4096, dense_ish, platforms=everywhere).branches).values()) == {"dense"}
    # a TPU-untileable block size never selects the TPU kernel
    small_blocks = _weight(4096, 4096, 32, 32, 0.05)
    assert plan(4096, small_blocks, platforms=everywhere).backend("tpu") in ("xla", "dense")
    # user overrides win over the model
    xla = plan(4096, dense_ish, impl="xla", platforms=everywhere)
    assert set(dict(xla.branches).values()) == {"xla"}
    assert set(dict(plan(16, sparse, impl="dense", platforms=everywhere).branches).values()) == {
        "dense"
    }


def test_sparse_problem_describes_capacity_not_live_blocks():
    w = _weight(512, 512, 128, 128, 0.25)
    p = sparse_problem(64, w, "tpu")
    assert p.flop_fraction == pytest.approx(w.capacity / 16)
    assert p.weight_bytes >= w.capacity * 128 * 128 * 2
    assert p.grid_steps == w.capacity  # one M block of 64 rows
