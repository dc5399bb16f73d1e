"""The one place for jax-version-specific Pallas calls (jax 0.10.2 through 0.12.x; the supported range is
checked at import by ``jaxsparse``).

Kernels import Pallas entry points that moved or changed between releases from this module only, so a
version bump touches one file. Keep every shim small and named after what it does.

Known drift handled here:

* ``InterpretGPUParams`` (Mosaic-GPU interpret mode) is only importable from a private path in 0.10.2.
* ``plgpu.kernel`` takes ``out_type``/``scratch_types`` from 0.10.2 on (``out_shape``/``scratch_shapes``
  before). Inside it, ``pl.program_id`` no longer works: use ``lax.axis_index`` with the grid names.
* Mosaic-GPU lowering semantics: Lane by default in 0.10.x, Warpgroup by default in 0.11.x.
* ``plgpu.load(ref, idx, *, layout, optimized)`` became ``plgpu.load(ref, *, layout, optimized)`` (0.12).
* Mosaic GPU 0.12 checks shared-memory transfers for bank conflicts: a WGMMA-layout array stored to an
  untiled SMEM ref fails to lower, so kernels give their output SMEM the tiling + swizzle transforms.
* Triton backend: opt-in through ``compiler_params``; deprecated in 0.11.0.

Example:
  >>> from pallas_kernels import compat
  >>> compat.interpret_params("hlo")
  True
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

__all__ = [
    "cost_estimate",
    "interpret_params",
    "mosaic_gpu_interpret_params",
    "mosaic_gpu_kernel",
    "mosaic_gpu_lane_params",
    "mosaic_gpu_load",
    "reset_tpu_interpret_state",
    "tpu_compiler_params",
    "tpu_interpret_guard",
    "tpu_interpret_params",
    "triton_compiler_params",
    "triton_load",
    "triton_lowering_target",
    "triton_store",
]


def interpret_params(mode: str) -> Any:
    """The ``interpret`` value of a Pallas call for an interpret mode: ``"hlo"`` and ``"triton"`` (``True``,
    the HLO interpreter), ``"tpu"`` (TPU interpret mode) or ``"mosaic_gpu"`` (Mosaic-GPU interpret mode).

    Example:
      >>> interpret_params("hlo")
      True
    """
    if mode in ("hlo", "triton"):
        return True
    if mode == "tpu":
        return tpu_interpret_params()
    if mode == "mosaic_gpu":
        return mosaic_gpu_interpret_params()
    raise ValueError(f"mode must be 'hlo', 'tpu', 'mosaic_gpu' or 'triton'; got {mode!r}.")


# --------------------------------------------------------------------------------------------- TPU
def tpu_compiler_params(dimension_semantics: tuple[str, ...]) -> Any:
    """Mosaic-TPU compiler params with the given grid dimension semantics ("parallel"/"arbitrary")."""
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


def tpu_interpret_params(*, detect_races: bool = False) -> Any:
    """TPU interpret mode: raises on out-of-bounds block reads and non-consecutive output revisits."""
    return pltpu.InterpretParams(
        detect_races=detect_races, out_of_bounds_reads="raise", uninitialized_memory="nan"
    )


def reset_tpu_interpret_state() -> None:
    """Clear TPU-interpret global state; call after a kernel raised inside TPU interpret mode."""
    pltpu.reset_tpu_interpret_mode_state()


# ------------------------------------------------------------------------------------- Mosaic GPU
def mosaic_gpu_interpret_params() -> Any:
    """Mosaic-GPU interpret mode params (CPU emulation of ``plgpu.kernel``)."""
    try:  # public in later releases
        from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams  # type: ignore[attr-defined]
    except ImportError:  # jax 0.10.x: private path
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


def mosaic_gpu_kernel(
    body, *, out_type, scratch_types, grid, grid_names, compiler_params=None, interpret=None
):
    """``plgpu.kernel`` with the 0.10.2+ keyword names; ``interpret`` None compiles for the GPU."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kwargs = dict(grid=grid, grid_names=grid_names)
    if compiler_params is not None:
        kwargs["compiler_params"] = compiler_params
    if interpret is not None:
        kwargs["interpret"] = interpret
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch_types, **kwargs)


# ------------------------------------------------------------------------------------------ Triton
def triton_compiler_params(*, num_warps: int = 4, num_stages: int = 2) -> Any:
    """Selects the (deprecated in 0.11) Pallas-Triton GPU backend for a ``pallas_call``."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def triton_load(ref, *, mask=None, other=None) -> Any:
    """Masked load from a (sliced) ref inside a Triton-backend kernel; also runs in interpret mode."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.load(ref, mask=mask, other=other)


def triton_store(ref, value, *, mask=None) -> None:
    """Masked store into a (sliced) ref inside a Triton-backend kernel; also runs in interpret mode."""
    from jax.experimental.pallas import triton as pltriton

    pltriton.store(ref, value, mask=mask)


def triton_lowering_target(device_kind: str = "NVIDIA A100") -> contextlib.AbstractContextManager:
    """Context for lowering Triton kernels on a host without that GPU (cross-lowering, AOT).

    jax >= 0.11 reads the target GPU from the device or, failing that, an abstract mesh's device kind (an
    unknown kind raises); jax 0.10 falls back to sm90 by itself, so this is a no-op there. Build only abstract
    values (``jax.ShapeDtypeStruct``) inside the context: concrete arrays need a real device.
    """
    from jax.experimental.pallas import triton as pltriton

    if not hasattr(pltriton, "get_gpu_info"):  # jax 0.10: no GPU info lookup
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("_triton",), abstract_device=device)
    )


# ------------------------------------------------------------------------------------------ common
def cost_estimate(*, flops: int, bytes_accessed: int, transcendentals: int = 0) -> Any:
    """``pl.CostEstimate`` for XLA's scheduler."""
    return pl.CostEstimate(
        flops=int(flops), bytes_accessed=int(bytes_accessed), transcendentals=int(transcendentals)
    )


@contextlib.contextmanager
def tpu_interpret_guard():
    """Context manager: resets TPU-interpret state if the body raises, then re-raises."""
    try:
        yield
    except Exception:
        reset_tpu_interpret_state()
        raise


def mosaic_gpu_lane_params() -> Any:
    """Mosaic-GPU compiler params pinned to Lane lowering semantics (0.10.x default; 0.11 defaults to
    Warpgroup), for kernels that place register layouts explicitly with :func:`mosaic_gpu_load`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


def mosaic_gpu_load(ref, *, layout: str, interpret: bool) -> Any:
    """Whole-ref load into registers with a named ``plgpu.Layout`` (bank conflicts allowed).

    The Mosaic-GPU interpreter does not run ``plgpu.load``, and layouts do not matter there: it gets ``ref[...]``.
    """
    if interpret:
        return ref[...]
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kwargs = dict(layout=getattr(plgpu.Layout, layout), optimized=False)
    if "idx" in inspect.signature(plgpu.load).parameters:  # jax <= 0.11: load(ref, idx, *, ...)
        return plgpu.load(ref, tuple(slice(None) for _ in ref.shape), **kwargs)
    return plgpu.load(ref, **kwargs)  # jax 0.12: load(ref, *, layout, optimized)
