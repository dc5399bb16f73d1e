"""nm_matmul: Pallas kernels (interpret modes) and XLA path == dense masked reference, forward and gradients;
dispatch rule; cross-lowering for TPU and CUDA from CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compat, dispatch
from pallas_kernels.nm import nm_matmul, pack_nm, plan, sparse_problem, unpack_nm
from pallas_kernels.nm.reference import nm_matmul_dense_masked
from pallas_kernels.nm.tpu import nm_dx_tpu, nm_matmul_tpu

NMS = [(2, 4), (1, 4), (2, 8), (4, 8)]
DTYPES = [jnp.float32, jnp.bfloat16]
K, N = 256, 128
ACCEL = ("cpu", "tpu", "cuda")  # build every branch, to lower for each from this CPU host


def _tol(dtype):
    return 1e-4 if dtype == jnp.float32 else 2e-2


def _close(a, b, dtype, scale=None):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = scale if scale is not None else max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=_tol(dtype), atol=_tol(dtype) * scale)


def _problem(n, m, dtype, batch, k=K, cols=N, seed=0):
    rng = np.random.default_rng(seed)
    w_nm = pack_nm(jnp.asarray(rng.standard_normal((k, cols)), dtype), n=n, m=m)
    x = jnp.asarray(rng.standard_normal((*batch, k)), dtype)
    return x, w_nm


def _ref(x, w_nm):
    """Dense masked reference in f32 (inputs already rounded to their dtype)."""
    return jnp.matmul(
        x.astype(jnp.float32),
        unpack_nm(w_nm).astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )


# ------------------------------------------------------------------------------------ forward, interpret
@pytest.mark.parametrize("batch", [(1,), (2, 3)], ids=["rows1", "rows2x3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("nm", NMS, ids=lambda nm: f"{nm[0]}of{nm[1]}")
def test_forward_pallas_interpret(nm, dtype, batch):
    x, w_nm = _problem(*nm, dtype, batch)
    y = nm_matmul(x, w_nm, impl="pallas", interpret="hlo")
    assert y.shape == (*batch, N) and y.dtype == dtype
    _close(y, _ref(x, w_nm), dtype)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
def test_multi_tile_grid_with_padding(nm):
    """Several K / N / row tiles (accumulation across grid steps) on shapes that need zero padding."""
    n, m = nm
    rng = np.random.default_rng(1)
    w_nm = pack_nm(
        jnp.asarray(rng.standard_normal((m * 40, 72)), jnp.float32), n=n, m=m, pack_tile=16
    )
    x = jnp.asarray(rng.standard_normal((13, m * 40)), jnp.float32)
    blocks = (8, 16, 32)  # grid 2 x 3 x 3; G=40 -> 48, N=72 -> 96, rows 13 -> 16 padded
    y = nm_matmul_tpu(x, w_nm, interpret=True, blocks=blocks)
    _close(y, _ref(x, w_nm), jnp.float32)
    dy = jnp.asarray(np.random.default_rng(2).standard_normal((13, 72)), jnp.float32)
    dx = nm_dx_tpu(dy, w_nm, interpret=True, blocks=blocks)
    _close(dx, dy @ unpack_nm(w_nm).T, jnp.float32)


# ---------------------------------------------------------------------------------- gradients, interpret
def _loss_grads(fn, x, w_nm, dy):
    def loss(x, values):
        return jnp.sum(fn(x, w_nm.replace(values=values)).astype(jnp.float32) * dy)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w_nm.values)


@pytest.mark.parametrize(
    "case",
    [
        ((2, 4), jnp.float32),
        ((1, 4), jnp.float32),
        ((2, 8), jnp.float32),
        ((4, 8), jnp.float32),
        ((2, 4), jnp.bfloat16),
    ],
    ids=["2of4-f32", "1of4-f32", "2of8-f32", "4of8-f32", "2of4-bf16"],
)
def test_gradients_pallas_interpret(case):
    (n, m), dtype = case
    x, w_nm = _problem(n, m, dtype, (2, 5), seed=3)
    dy = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, N)), jnp.float32)
    gx, gv = _loss_grads(lambda x, w: nm_matmul(x, w, impl="pallas", interpret="hlo"), x, w_nm, dy)
    rx, rv = _loss_grads(
        lambda x, w: nm_matmul_dense_masked(x.astype(jnp.float32), w),
        x.astype(jnp.float32),
        w_nm.replace(values=w_nm.values.astype(jnp.float32)),
        dy,
    )
    assert gx.dtype == x.dtype and gv.dtype == w_nm.values.dtype and gv.shape == w_nm.values.shape
    _close(gx, rx, dtype)
    _close(gv, rv, dtype)


def test_xla_path_forward_and_gradients_exact():
    """impl='auto' on CPU runs the XLA branch: same as the plain dense masked product."""
    x, w_nm = _problem(2, 4, jnp.float32, (3, 4), seed=5)
    dy = jnp.asarray(np.random.default_rng(6).standard_normal((3, 4, N)), jnp.float32)
    for impl in ("auto", "xla", "dense"):
        y = jax.jit(lambda x, w: nm_matmul(x, w, impl=impl))(x, w_nm)
        _close(y, _ref(x, w_nm), jnp.float32)
        g = _loss_grads(lambda x, w: nm_matmul(x, w, impl=impl), x, w_nm, dy)
        r = _loss_grads(nm_matmul_dense_masked, x, w_nm, dy)
        for a, b in zip(g, r):
            _close(a, b, jnp.float32)


def test_1d_input_and_preferred_element_type():
    x, w_nm = _problem(2, 4, jnp.bfloat16, (), seed=7)
    y = nm_matmul(x, w_nm, impl="pallas", interpret="hlo", preferred_element_type=jnp.float32)
    assert y.shape == (N,) and y.dtype == jnp.float32
    _close(y, _ref(x, w_nm), jnp.bfloat16)


# ------------------------------------------------------------------------------------ TPU interpret mode
def test_tpu_interpret_mode_forward_and_dx():
    """TPU interpret mode also catches out-of-bounds block reads and non-consecutive output revisits."""
    rng = np.random.default_rng(8)
    w_nm = pack_nm(
        jnp.asarray(rng.standard_normal((4 * 64, 256)), jnp.float32), n=2, m=4, pack_tile=32
    )
    x = jnp.asarray(rng.standard_normal((16, 4 * 64)), jnp.float32)
    blocks = (8, 32, 128)  # grid 2 x 2 x 2 (fwd) and 2 x 2 x 2 (dx)
    dy = jnp.asarray(np.random.default_rng(9).standard_normal((16, 256)), jnp.float32)
    with compat.tpu_interpret_guard():
        y = nm_matmul_tpu(x, w_nm, interpret="tpu", blocks=blocks)
        dx = nm_dx_tpu(dy, w_nm, interpret="tpu", blocks=blocks)
    _close(y, _ref(x, w_nm), jnp.float32)
    _close(dx, dy @ unpack_nm(w_nm).T, jnp.float32)


def test_tpu_interpret_mode_gradients_bf16():
    x, w_nm = _problem(2, 4, jnp.bfloat16, (4,), seed=10)
    dy = jnp.asarray(np.random.default_rng(11).standard_normal((4, N)), jnp.float32)
    with compat.tpu_interpret_guard():
        gx, gv = _loss_grads(
            lambda x, w: nm_matmul(x, w, impl="pallas", interpret="tpu"), x, w_nm, dy
        )
    rx, rv = _loss_grads(
        nm_matmul_dense_masked,
        x.astype(jnp.float32),
        w_nm.replace(values=w_nm.values.astype(jnp.float32)),
        dy,
    )
    _close(gx, rx, jnp.bfloat16)
    _close(gv, rv, jnp.bfloat16)


# ------------------------------------------------------------------------------------------- dispatch
def test_dispatch_rule_memory_bound_only():
    """Cost model: the kernel only saves weight bytes (and the per-call decompression of the dense option),
    so it is picked for few rows and dense at 4096 rows."""
    w_nm = pack_nm(jnp.zeros((4096, 4096), jnp.bfloat16))
    for platform, kernel in (("tpu", "tpu"), ("cuda", "mosaic_gpu")):
        hw = dispatch.HARDWARE[platform]
        t1, t16, t256, t4k = (
            dispatch.estimate_seconds(sparse_problem(r, w_nm, kernel), hw)
            for r in (1, 16, 256, 4096)
        )
        assert t1[1] < t1[0] and t16[1] < t16[0]  # fewer bytes to read
        assert (
            t4k[1] > t4k[0]
        )  # no FLOP savings: compute bound, the decompression no longer matters
        assert t256[1] / t256[0] > t16[1] / t16[0]  # the advantage shrinks with the rows
        # 2:4 bf16 reads 0.5625x the dense weight bytes; dense also decompresses (reads it, writes K*N)
        assert t1[0] / t1[1] <= (1 + 0.5625 + 1) / 0.5625 + 1e-9
    # the plan per platform branch
    assert plan(1, w_nm, platforms=ACCEL).backend("tpu") == "tpu"
    assert plan(4096, w_nm, platforms=ACCEL).backend("tpu") == "dense"
    assert plan(1, w_nm).branches == (
        ("default", plan(1, w_nm).backend("cpu")),
    )  # CPU host: one branch
    assert plan(1, w_nm, impl="pallas", interpret="tpu").branches == (("default", "interpret_tpu"),)
    with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU"):
        plan(1, w_nm, impl="pallas")
    with pytest.raises(ValueError, match="needs impl='pallas'"):
        plan(1, w_nm, impl="auto", interpret="hlo")


# ------------------------------------------------------------------------------------------- lowering
def _lowered_text(fn, *args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _abstract_problem(rows, k=4096, cols=4096, n=2, m=4, dtype=jnp.bfloat16):
    """Shapes only (lowering needs no data): x and an NMWeight of ShapeDtypeStructs."""
    w = jax.eval_shape(lambda: pack_nm(jnp.zeros((k, cols), dtype), n=n, m=m))
    return jax.ShapeDtypeStruct((rows, k), dtype), w


def test_cross_lowering_tpu_forward_and_grad():
    x, w_nm = _abstract_problem(8)
    fwd = _lowered_text(lambda x, w: nm_matmul(x, w, platforms=ACCEL), x, w_nm, platform="tpu")
    assert "tpu_custom_call" in fwd and "nm2_4_matmul" in fwd

    def loss(x, values, meta):
        return jnp.sum(
            nm_matmul(x, w_nm.replace(values=values, meta=meta), platforms=ACCEL).astype(
                jnp.float32
            )
        )

    grad = _lowered_text(jax.grad(loss, argnums=(0, 1)), x, w_nm.values, w_nm.meta, platform="tpu")
    assert "nm2_4_matmul_dx" in grad
    # 4096 rows: the dispatch rule picks the XLA path, no kernel in the program
    big = _lowered_text(
        lambda x, w: nm_matmul(x, w, platforms=ACCEL),
        _abstract_problem(4096)[0],
        w_nm,
        platform="tpu",
    )
    assert "tpu_custom_call" not in big


def test_cross_lowering_cuda_forward_and_grad():
    x, w_nm = _abstract_problem(8)
    fwd = _lowered_text(lambda x, w: nm_matmul(x, w, platforms=ACCEL), x, w_nm, platform="cuda")
    assert "mosaic_gpu" in fwd

    def loss(x, values, meta):
        return jnp.sum(
            nm_matmul(x, w_nm.replace(values=values, meta=meta), platforms=ACCEL).astype(
                jnp.float32
            )
        )

    grad = _lowered_text(jax.grad(loss, argnums=(0, 1)), x, w_nm.values, w_nm.meta, platform="cuda")
    assert "mosaic_gpu" in grad  # the dx kernel (the forward output is unused by grad)
    big = _lowered_text(
        lambda x, w: nm_matmul(x, w, platforms=ACCEL),
        _abstract_problem(4096)[0],
        w_nm,
        platform="cuda",
    )
    assert "mosaic_gpu" not in big  # FLOP bound: dense jnp.dot
    f32 = _lowered_text(
        lambda x, w: nm_matmul(x, w, platforms=ACCEL),
        *_abstract_problem(8, dtype=jnp.float32),
        platform="cuda",
    )
    # the wgmma kernel is 16-bit only: the Triton kernel takes f32 where it lowers (jax 0.10 from this
    # host; 0.11+ needs compat.triton_lowering_target, else the XLA path with a RuntimeWarning)
    assert "mosaic_gpu" not in f32


# ------------------------------------------------------------------------------ Mosaic GPU interpret mode
@pytest.mark.parametrize(
    "case",
    [((2, 4), (1,)), ((2, 8), (2, 3)), ((4, 8), (5,))],
    ids=["2of4-rows1", "2of8-rows2x3", "4of8-rows5"],
)
def test_forward_mosaic_gpu_interpret(case):
    (n, m), batch = case
    x, w_nm = _problem(n, m, jnp.bfloat16, batch, k=512, cols=128, seed=12)
    y = nm_matmul(x, w_nm, impl="pallas", interpret="mosaic_gpu")
    assert y.shape == (*batch, 128) and y.dtype == jnp.bfloat16
    _close(y, _ref(x, w_nm), jnp.bfloat16)


def test_gradients_mosaic_gpu_interpret():
    x, w_nm = _problem(2, 4, jnp.bfloat16, (3,), k=256, cols=128, seed=13)
    dy = jnp.asarray(np.random.default_rng(14).standard_normal((3, 128)), jnp.float32)
    gx, gv = _loss_grads(
        lambda x, w: nm_matmul(x, w, impl="pallas", interpret="mosaic_gpu"), x, w_nm, dy
    )
    rx, rv = _loss_grads(
        nm_matmul_dense_masked,
        x.astype(jnp.float32),
        w_nm.replace(values=w_nm.values.astype(jnp.float32)),
        dy,
    )
    _close(gx, rx, jnp.bfloat16)
    _close(gv, rv, jnp.bfloat16)


def test_mosaic_gpu_dx_two_plane_chunks():
    """2:8 input gradient: 8 planes split over 2 CTAs along the plane axis (4 accumulators each)."""
    from pallas_kernels.nm.mosaic_gpu import nm_dx_mosaic_gpu

    _, w_nm = _problem(2, 8, jnp.bfloat16, (1,), k=512, cols=128, seed=15)
    dy = jnp.asarray(np.random.default_rng(16).standard_normal((3, 128)), jnp.bfloat16)
    dx = nm_dx_mosaic_gpu(dy, w_nm, interpret=compat.mosaic_gpu_interpret_params())
    _close(dx, dy.astype(jnp.float32) @ unpack_nm(w_nm).astype(jnp.float32).T, jnp.bfloat16)


@pytest.mark.parametrize("nm", [(1, 4), (2, 8), (4, 8)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
def test_cross_lowering_all_patterns(nm):
    """Forward + gradient lower to Mosaic TPU (bf16 and f32) and Mosaic GPU (bf16) for the other patterns."""
    n, m = nm
    for platform, dtype, marker in (
        ("tpu", jnp.bfloat16, "tpu_custom_call"),
        ("tpu", jnp.float32, "tpu_custom_call"),
        ("cuda", jnp.bfloat16, "mosaic_gpu"),
    ):
        x, w_nm = _abstract_problem(8, n=n, m=m, dtype=dtype)

        def loss(x, values, meta, w_nm=w_nm):
            return jnp.sum(
                nm_matmul(x, w_nm.replace(values=values, meta=meta), platforms=ACCEL).astype(
                    jnp.float32
                )
            )

        fwd = _lowered_text(
            lambda x, w: nm_matmul(x, w, platforms=ACCEL), x, w_nm, platform=platform
        )
        grad = _lowered_text(
            jax.grad(loss, argnums=(0, 1)), x, w_nm.values, w_nm.meta, platform=platform
        )
        assert marker in fwd and marker in grad, (
            platform,
            dtype,
        )  # grad: the dx kernel (y itself is unused)
        if platform == "tpu":
            assert f"nm{n}_{m}_matmul" in fwd and f"nm{n}_{m}_matmul_dx" in grad


def test_mosaic_gpu_rejects_what_it_cannot_tile():
    x, w_nm = _problem(2, 4, jnp.float32, (1,), k=256, cols=128)
    with pytest.raises(ValueError, match="float32 is not supported by the Mosaic-GPU N:M kernel"):
        nm_matmul(x, w_nm, impl="pallas", interpret="mosaic_gpu")
    x, w_nm = _problem(2, 4, jnp.bfloat16, (1,), k=256, cols=96)
    with pytest.raises(ValueError, match="N=96 is not a multiple of the 64-column tile"):
        nm_matmul(x, w_nm, impl="pallas", interpret="mosaic_gpu")


@pytest.mark.parametrize("rows, nm", [(1, (2, 4)), (2, (2, 4)), (4, (1, 4)), (1, (4, 8))])
def test_sparse_xla_gather_path_forward_and_gradients(rows, nm):
    """impl='xla' is the sparse XLA reference: gather the kept activations (n/m of the FLOPs) while
    rows * n <= m; values and gradients equal the dense masked product."""
    from pallas_kernels.nm import reference

    x, w_nm = _problem(*nm, jnp.float32, (rows,), seed=17)
    assert reference.pick_strategy(rows, w_nm) == "gather"
    jaxpr = str(jax.make_jaxpr(lambda x, w: nm_matmul(x, w, impl="xla"))(x, w_nm))
    assert "gather" in jaxpr and f"f32[{K},{N}]" not in jaxpr  # no dense (K, N) weight is built
    dy = jnp.asarray(np.random.default_rng(18).standard_normal((rows, N)), jnp.float32)
    _close(nm_matmul(x, w_nm, impl="xla"), _ref(x, w_nm), jnp.float32)
    g = _loss_grads(lambda x, w: nm_matmul(x, w, impl="xla"), x, w_nm, dy)
    r = _loss_grads(nm_matmul_dense_masked, x, w_nm, dy)
    for a, b in zip(g, r):
        _close(a, b, jnp.float32)


def test_removed_names_warn_and_keep_their_old_behaviour():
    import pallas_kernels
    from pallas_kernels import nm
    from pallas_kernels.nm.masks import nm_mask

    w = jnp.array([[-5.0], [1.0], [2.0], [3.0]])
    with pytest.warns(DeprecationWarning, match=r"pallas_kernels.nm_mask is deprecated"):
        old_top = pallas_kernels.nm_mask
    with pytest.warns(DeprecationWarning, match=r"pallas_kernels.nm.nm_mask is deprecated"):
        old = nm.nm_mask
    assert old is old_top
    assert old(w, 2, 4)[:, 0].tolist() == [True, False, False, True]  # ranks |w|
    assert nm_mask(w, 2, 4, axis=0)[:, 0].tolist() == [False, False, True, True]  # ranks the score
    for name in ("nm_problem", "use_nm_kernel", "nm_cost_model"):
        with pytest.warns(DeprecationWarning, match=f"pallas_kernels.nm.{name} is deprecated"):
            getattr(nm, name)
    kw = dict(k=4096, n_out=4096, n=2, m=4, dtype=jnp.bfloat16)
    with pytest.warns(DeprecationWarning):
        assert nm.use_nm_kernel("tpu", rows=1, **kw) and not nm.use_nm_kernel(
            "tpu", rows=4096, **kw
        )
    with pytest.raises(AttributeError, match="has no attribute 'nm_masks'"):
        nm.nm_masks  # noqa: B018


def test_one_nm_mask_for_jaxsparse_and_the_kernels():
    import jaxsparse
    from pallas_kernels.nm.masks import nm_mask

    assert jaxsparse.nm_mask is nm_mask
    w = jax.random.normal(jax.random.key(3), (64, 8))
    packed = unpack_nm(pack_nm(w, n=2, m=4))
    assert bool((packed == jnp.where(nm_mask(jnp.abs(w), 2, 4, axis=0), w, 0)).all())


@pytest.mark.parametrize("platforms", [None, ACCEL], ids=["this-host", "all-branches"])
def test_auto_on_cpu_for_bf16_4096_2of4_traces_and_lowers_for_cpu(platforms):
    """The reported failure: on jax 0.12 this traced the Mosaic GPU branch on a CPU host and raised
    (plgpu.load's signature), or failed lowering it (bank-conflict check)."""
    x, w_nm = _abstract_problem(8)
    text = _lowered_text(lambda x, w: nm_matmul(x, w, platforms=platforms), x, w_nm, platform="cpu")
    assert "mosaic_gpu" not in text and "tpu_custom_call" not in text
