"""Honest dispatch shared by the sparse kernels: platform choice and a dense-vs-sparse cost model.

Three pieces, all pure functions of static information:

* :func:`platform_switch` runs a per-platform branch inside one jitted function (``lax.platform_dependent``),
  so the same function runs XLA on CPU and lowers to Mosaic TPU or Mosaic GPU elsewhere.
* :func:`choose` decides whether a sparse kernel is worth it for a :class:`MatmulProblem` on a platform:
  a roofline estimate (:func:`estimate_seconds`) with per-platform :class:`Hardware` figures, optionally
  overridden by a table of measured choices (e.g. written by ``benchmarks/block_sparse_matmul.py``).
* :func:`check_impl` validates the user override ``impl="auto" | "dense" | "xla" | "pallas"``.

Any sparse op (block-sparse, N:M, ...) describes itself as a :class:`MatmulProblem`: how many bytes its
weight format reads, what fraction of the dense FLOPs it executes, and how efficient its kernel is per useful
FLOP relative to the dense GEMM. Hardware figures are public peak numbers, the efficiencies are estimates
(specs/kernels.md §2.5); neither was measured on an accelerator here.

Example:
  >>> import jax.numpy as jnp
  >>> p = MatmulProblem(op="block_sparse", m=4096, k=4096, n=4096, dtype=jnp.bfloat16,
  ...                   weight_bytes=0.1 * 4096 * 4096 * 2, flop_fraction=0.1, efficiency=0.7)
  >>> choose(p, "cuda")
  'sparse'
  >>> choose(p._replace(flop_fraction=0.9, weight_bytes=0.9 * 4096 * 4096 * 2), "cuda")
  'dense'
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Impl = Literal["auto", "dense", "xla", "pallas"]
IMPLS: tuple[str, ...] = ("auto", "dense", "xla", "pallas")
Choice = Literal["dense", "sparse"]
Platform = Literal["cpu", "tpu", "cuda", "rocm"]
PLATFORMS: tuple[str, ...] = ("cpu", "tpu", "cuda", "rocm")


class Hardware(NamedTuple):
    """Peak figures for the roofline; ``step_overhead_s`` is the fixed cost per kernel grid step."""

    name: str
    flops_per_s: float  # dense 16-bit matmul peak
    f32_flops_per_s: float  # float32 matmul peak
    bytes_per_s: float  # main-memory bandwidth
    launch_s: float  # per kernel launch
    step_overhead_s: float  # per grid step of a Pallas kernel


# Public peak numbers [read]; CPU figures are rough for a small shared x86 host [estimate].
HARDWARE: Mapping[str, Hardware] = types.MappingProxyType(
    {
        "cpu": Hardware("cpu (2-core host, estimate)", 1.0e11, 1.0e11, 2.0e10, 5e-6, 0.0),
        "tpu": Hardware("TPU v5e", 197e12, 98e12, 8.19e11, 5e-6, 0.35e-6),
        "cuda": Hardware("H100 SXM", 989e12, 494e12, 3.35e12, 5e-6, 0.0),
        "rocm": Hardware("MI300X", 1307e12, 654e12, 5.3e12, 5e-6, 0.0),
    }
)


class MatmulProblem(NamedTuple):
    """A ``[m, k] @ [k, n]`` product with a sparse weight, as the cost model sees it.

    Attributes:
      op: kernel family, e.g. ``"block_sparse"`` or ``"nm"`` (key for measured tables).
      m, k, n: problem size (``m`` = all batch dims flattened).
      dtype: activation/weight dtype.
      weight_bytes: bytes the sparse kernel reads for the weight, metadata included.
      flop_fraction: fraction of the dense FLOPs the sparse kernel executes (block density for block-sparse;
        1.0 for N:M without sparse tensor cores).
      efficiency: sparse kernel throughput per executed FLOP relative to the dense GEMM, in (0, 1].
      grid_steps: Pallas grid steps (for per-step overhead); 0 if not applicable.
      config: extra hashable detail for measured tables (e.g. the block size).
    """

    op: str
    m: int
    k: int
    n: int
    dtype: Any
    weight_bytes: float
    flop_fraction: float
    efficiency: float
    grid_steps: int = 0
    config: tuple = ()


def estimate_seconds(problem: MatmulProblem, hardware: Hardware) -> tuple[float, float]:
    """Roofline estimates ``(dense_seconds, sparse_seconds)``."""
    p = problem
    itemsize = jnp.dtype(p.dtype).itemsize
    peak = hardware.f32_flops_per_s if itemsize >= 4 else hardware.flops_per_s
    flops = 2.0 * p.m * p.k * p.n
    act_bytes = itemsize * (p.m * p.k + p.m * p.n)
    dense = (
        max(flops / peak, (act_bytes + itemsize * p.k * p.n) / hardware.bytes_per_s)
        + hardware.launch_s
    )
    sparse_compute = flops * p.flop_fraction / (peak * max(p.efficiency, 1e-6))
    sparse_memory = (act_bytes + p.weight_bytes) / hardware.bytes_per_s
    sparse = (
        max(sparse_compute, sparse_memory)
        + hardware.launch_s
        + p.grid_steps * hardware.step_overhead_s
    )
    return dense, sparse


def table_key(problem: MatmulProblem, platform: str) -> tuple:
    """Key of a measured-choice table: op, platform, sizes, dtype name, config, density rounded to 1%."""
    return (
        problem.op,
        platform,
        problem.m,
        problem.k,
        problem.n,
        jnp.dtype(problem.dtype).name,
        tuple(problem.config),
        round(problem.flop_fraction, 2),
    )


def choose(
    problem: MatmulProblem,
    platform: str,
    *,
    measured: Mapping[tuple, str] | None = None,
    margin: float = 1.1,
) -> Choice:
    """``"sparse"`` if the sparse kernel is expected to beat dense ``jnp.dot`` by ``margin``, else ``"dense"``.

    A ``measured`` table (keys from :func:`table_key`, values ``"dense"``/``"sparse"``) wins over the model.
    """
    if platform not in HARDWARE:
        raise ValueError(f"platform must be one of {tuple(HARDWARE)}; got {platform!r}.")
    if measured is not None:
        hit = measured.get(table_key(problem, platform))
        if hit is not None:
            if hit not in ("dense", "sparse"):
                raise ValueError(f"measured table values must be 'dense' or 'sparse'; got {hit!r}.")
            return hit  # type: ignore[return-value]
    dense_s, sparse_s = estimate_seconds(problem, HARDWARE[platform])
    return "sparse" if sparse_s * margin < dense_s else "dense"


def check_impl(impl: str) -> str:
    """Validate a user override; returns it unchanged."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")
    return impl


INTERPRET_MODES: tuple[str, ...] = ("hlo", "tpu", "mosaic_gpu")
PALLAS_KIND = {
    "tpu": "tpu",
    "cuda": "mosaic_gpu",
}  # platform -> the Pallas kernel family that runs there


def check_interpret(
    impl: str, interpret: str | None, mosaic_gpu_reason: Callable[[], str | None]
) -> None:
    """Validate an interpret-mode request; ``mosaic_gpu_reason()`` says why the Mosaic GPU kernel can't run, if so."""
    if interpret is None:
        return
    if interpret not in INTERPRET_MODES:
        raise ValueError(f"interpret must be None or one of {INTERPRET_MODES}; got {interpret!r}.")
    if impl != "pallas":
        raise ValueError(
            f"interpret={interpret!r} runs the Pallas kernels, so it needs impl='pallas'; "
            f"got impl={impl!r}."
        )
    if interpret == "mosaic_gpu":
        reason = mosaic_gpu_reason()
        if reason:
            raise ValueError(f"interpret='mosaic_gpu' cannot run: {reason}.")


def check_pallas_available(impl: str) -> str:
    """The default platform; raises when ``impl='pallas'`` has no compiled kernel there."""
    current = default_platform()
    if impl == "pallas" and current not in PALLAS_KIND:
        raise ValueError(
            f"impl='pallas' needs a TPU or CUDA GPU, but the default backend is {current!r}; pass "
            f"interpret='hlo'|'tpu'|'mosaic_gpu' to run the kernels in interpret mode, or use impl='xla'."
        )
    return current


def default_platform() -> str:
    """The platform of JAX's default backend, with GPUs named ``cuda``/``rocm``."""
    backend = jax.default_backend()
    if backend == "gpu":
        try:
            return (
                jax.devices()[0].client.platform_version.lower().startswith("rocm")
                and "rocm"
                or "cuda"
            )
        except Exception:  # pragma: no cover - best effort
            return "cuda"
    return backend


def platform_switch(
    *args: Any,
    default: Callable[..., Any],
    tpu: Callable[..., Any] | None = None,
    cuda: Callable[..., Any] | None = None,
    rocm: Callable[..., Any] | None = None,
) -> Any:
    """Run the branch for the platform the surrounding computation is lowered for.

    All branches are traced; only the lowering platform's branch is compiled. Branches left ``None`` use
    ``default``. Note: lowering for several platforms at once that include ``cpu`` fails if a branch holds a
    compiled (non-interpret) Pallas kernel (specs/kernels.md §3.3 item 8).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> jax.jit(lambda x: platform_switch(x, default=lambda v: v + 1, tpu=lambda v: v * 2))(1.0)
      Array(2., dtype=float32, weak_type=True)
    """
    branches = {
        name: fn for name, fn in (("tpu", tpu), ("cuda", cuda), ("rocm", rocm)) if fn is not None
    }
    if not branches:
        return default(*args)
    return lax.platform_dependent(*args, default=default, **branches)
