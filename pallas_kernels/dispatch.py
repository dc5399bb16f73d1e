"""Honest dispatch shared by the sparse kernels: which backend runs on which platform, and why.

One rule set for :func:`~pallas_kernels.block_sparse.bsr_matmul` and :func:`~pallas_kernels.nm.nm_matmul`:

* ``impl`` means the same for both ops (:data:`IMPLS`): ``"dense"`` densifies the stored weight and calls
  ``jnp.dot``; ``"xla"`` runs the op's sparse XLA reference; ``"pallas"`` runs the Pallas kernel of the
  current platform (raises if it cannot) and the kernel or the XLA reference elsewhere; ``"auto"`` asks
  :func:`choose` per platform whether the sparse path (kernel where one runs, else the XLA reference) beats
  ``"dense"`` -- and ``"dense"`` includes densifying the stored weight on every call.
* :func:`make_plan` turns that into a :class:`Plan`: one ``(platform, backend)`` pair per platform. Branches
  are built only for the platforms this process can run on (:func:`target_platforms`) unless the caller asks
  for others (``platforms=`` on both ops, e.g. to export for TPU from a CPU host), so a CPU-only process
  never traces a TPU or GPU kernel.
* :func:`run_plan` is the one branch switcher (``lax.platform_dependent``). Every kernel branch is first
  traced and lowered for its own platform, once per shape; a branch that fails (a JAX version whose Pallas
  API moved, a layout the compiler rejects) is replaced by the XLA reference on that platform with a
  ``RuntimeWarning``, so it can never break another platform. Only ``impl="pallas"`` on the current
  platform re-raises.
* :func:`choose` is a roofline (:func:`estimate_seconds` with per-platform :class:`Hardware` figures),
  overridden by measured choices: :data:`MEASURED` holds the ones ``benchmarks/block_sparse_matmul.py`` and
  ``benchmarks/nm_matmul.py`` measured on this project's CPU host (nearest measured point of the same op,
  dtype and kernel configuration).

GPU kernel families (:func:`kernel_backend`): TPU runs ``"tpu"`` (Mosaic TPU); CUDA sm90+ runs
``"mosaic_gpu"`` (``"triton"`` where the Mosaic GPU kernel cannot run the problem) and sm80-sm89
``"triton"``; ROCm runs ``"triton"``. An op runs a family only if it has a kernel for it in its registry
(``_KERNELS`` of the op's ``api`` module); anything else takes the XLA path.

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

import functools
import math
import types
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _measured

__all__ = [
    "HARDWARE",
    "IMPLS",
    "INTERPRET_MODES",
    "MEASURED",
    "PLATFORMS",
    "Hardware",
    "Impl",
    "Interpret",
    "MatmulProblem",
    "Plan",
    "check_impl",
    "choose",
    "default_platform",
    "estimate_seconds",
    "hardware_for",
    "kernel_backend",
    "make_plan",
    "run_plan",
    "table_key",
    "target_platforms",
]

Impl = Literal["auto", "dense", "xla", "pallas"]
IMPLS: tuple[str, ...] = ("auto", "dense", "xla", "pallas")
Interpret = Literal["hlo", "tpu", "mosaic_gpu", "triton"]
INTERPRET_MODES: tuple[str, ...] = ("hlo", "tpu", "mosaic_gpu", "triton")
PLATFORMS: tuple[str, ...] = ("cpu", "tpu", "cuda", "rocm")
"""Platforms a plan can hold a branch for (``lax.platform_dependent`` names)."""

Choice = Literal["dense", "sparse"]


class Hardware(NamedTuple):
    """Peak figures for the roofline; ``step_overhead_s`` is the fixed cost per kernel grid step."""

    name: str
    flops_per_s: float  # dense 16-bit matmul peak
    f32_flops_per_s: float  # float32 matmul peak
    bytes_per_s: float  # main-memory bandwidth
    launch_s: float  # per kernel launch
    step_overhead_s: float  # per grid step of a Pallas kernel


# Public peak numbers [read]; CPU figures are rough for a small shared x86 host [estimate]; the measured
# table (MEASURED) overrides the model where it has a point.
HARDWARE: Mapping[str, Hardware] = types.MappingProxyType(
    {
        "cpu": Hardware("cpu (2-core host, estimate)", 1.0e11, 1.0e11, 2.0e10, 5e-6, 0.0),
        "tpu": Hardware("TPU v5e", 197e12, 98e12, 8.19e11, 5e-6, 0.35e-6),
        "cuda": Hardware("H100 SXM", 989e12, 494e12, 3.35e12, 5e-6, 0.0),
        "cuda_sm80": Hardware("A100 SXM", 312e12, 156e12, 2.0e12, 5e-6, 0.0),
        "rocm": Hardware("MI300X", 1307e12, 654e12, 5.3e12, 5e-6, 0.0),
    }
)

MEASURED: Mapping[tuple, str] = types.MappingProxyType(_measured.CHOICES)
"""Measured ``"dense"``/``"sparse"`` choices, keyed by :func:`table_key` (see ``pallas_kernels/_measured.py``)."""


class MatmulProblem(NamedTuple):
    """A ``[m, k] @ [k, n]`` product with a sparse weight, as the cost model sees it.

    Attributes:
      op: kernel family, e.g. ``"block_sparse"`` or ``"nm"`` (key for measured tables).
      m, k, n: problem size (``m`` = all batch dims flattened).
      dtype: activation/weight dtype.
      weight_bytes: bytes the sparse path reads for the weight, metadata included.
      flop_fraction: fraction of the dense FLOPs the sparse path executes (block density for block-sparse;
        1.0 for N:M without sparse tensor cores).
      efficiency: sparse throughput per executed FLOP relative to the dense GEMM, in (0, 1].
      grid_steps: Pallas grid steps (for per-step overhead); 0 if not applicable.
      config: extra hashable detail for measured tables (e.g. the block size).
      densify_bytes: bytes the ``"dense"`` option moves to rebuild the dense weight from the stored sparse one
        on every call (read the stored weight, write and re-read the dense one); 0 if a dense copy is held.
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
    densify_bytes: float = 0.0


class Plan(NamedTuple):
    """Which backend each platform branch runs: ``branches`` is ``(("default", backend), (platform,
    backend), ...)``; backends are ``"dense"``, ``"xla"``, a kernel family (``"tpu"``, ``"mosaic_gpu"``,
    ``"triton"``) or ``"interpret_<mode>"``. The same type for every op; hashable (a static jit argument).

    Example:
      >>> Plan(branches=(("default", "xla"), ("tpu", "tpu"))).backend("cuda")
      'xla'
    """

    branches: tuple[tuple[str, str], ...]

    def backend(self, platform: str) -> str:
        """The backend of ``platform``'s branch (the default branch's if the plan has none for it)."""
        table = dict(self.branches)
        return table.get(platform, table["default"])


def estimate_seconds(problem: MatmulProblem, hardware: Hardware) -> tuple[float, float]:
    """Roofline estimates ``(dense_seconds, sparse_seconds)``; dense includes ``densify_bytes``."""
    p = problem
    itemsize = jnp.dtype(p.dtype).itemsize
    peak = hardware.f32_flops_per_s if itemsize >= 4 else hardware.flops_per_s
    flops = 2.0 * p.m * p.k * p.n
    act_bytes = itemsize * (p.m * p.k + p.m * p.n)
    dense = (
        max(flops / peak, (act_bytes + itemsize * p.k * p.n) / hardware.bytes_per_s)
        + p.densify_bytes / hardware.bytes_per_s
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


def _nearest_measured(key: tuple, measured: Mapping[tuple, str]) -> str | None:
    """The choice at ``key``, else at the nearest measured point of the same op, platform, dtype and config
    within a factor 2 in every size (log distance) and 0.05 in density; ``None`` if there is none."""
    hit = measured.get(key)
    if hit is not None:
        return hit
    op, platform, m, k, n, dtype, config, density = key
    best, best_dist = None, math.inf
    for other, choice in measured.items():
        o_op, o_platform, o_m, o_k, o_n, o_dtype, o_config, o_density = other
        if (o_op, o_platform, o_dtype, tuple(o_config)) != (op, platform, dtype, config):
            continue
        logs = [abs(math.log2(max(a, 1) / max(b, 1))) for a, b in ((m, o_m), (k, o_k), (n, o_n))]
        if max(logs) > 1.0 or abs(density - o_density) > 0.05:
            continue
        dist = sum(logs) + 10 * abs(density - o_density)
        if dist < best_dist:
            best, best_dist = choice, dist
    return best


def choose(
    problem: MatmulProblem,
    platform: str,
    *,
    measured: Mapping[tuple, str] | None = None,
    margin: float = 1.1,
    hardware: Hardware | None = None,
) -> Choice:
    """``"sparse"`` if the sparse path is expected to beat the dense option by ``margin``, else ``"dense"``.

    Args:
      problem: the product, as the cost model sees it.
      platform: one of :data:`PLATFORMS` (the key for measured tables and the default hardware).
      measured: choices keyed by :func:`table_key`; the nearest measured point of the same op, dtype and
        config (sizes within 2x, density within 0.05) wins over the model. Default: :data:`MEASURED`.
      margin: how much faster the sparse estimate must be.
      hardware: figures for the roofline (default ``HARDWARE[platform]``).

    Returns:
      ``"dense"`` or ``"sparse"``.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}; got {platform!r}.")
    table = MEASURED if measured is None else measured
    hit = _nearest_measured(table_key(problem, platform), table)
    if hit is not None:
        if hit not in ("dense", "sparse"):
            raise ValueError(f"measured table values must be 'dense' or 'sparse'; got {hit!r}.")
        return hit  # type: ignore[return-value]
    dense_s, sparse_s = estimate_seconds(problem, hardware or HARDWARE[platform])
    return "sparse" if sparse_s * margin < dense_s else "dense"


def check_impl(impl: str) -> str:
    """Validate a user override; returns it unchanged."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}.")
    return impl


# ------------------------------------------------------------------------------------------- platforms
def default_platform() -> str:
    """The platform of JAX's default backend, with GPUs named ``cuda``/``rocm``."""
    return _platform_of(jax.devices()[0])


def _platform_of(device) -> str:
    if device.platform != "gpu":
        return device.platform
    version = getattr(getattr(device, "client", None), "platform_version", "") or ""
    return "rocm" if version.lower().startswith("rocm") else "cuda"


def target_platforms() -> tuple[str, ...]:
    """The platforms this process can run on: ``"cpu"``, the default platform and the accelerators'."""
    found = {"cpu", default_platform()}
    for backend in ("gpu", "tpu"):
        try:
            devices = jax.devices(backend)
        except RuntimeError:
            continue
        found.update(_platform_of(d) for d in devices[:1])
    return tuple(p for p in PLATFORMS if p in found)


def kernel_backend(platform: str, override: str | None = None) -> str | None:
    """The Pallas kernel family for ``platform``: ``"tpu"``; CUDA ``"mosaic_gpu"`` on sm90+ (also when no
    local CUDA device tells otherwise) and ``"triton"`` on sm80-sm89; ROCm ``"triton"``; CPU ``None``.
    ``override`` (``"mosaic_gpu"``/``"triton"``) forces a GPU family."""
    if platform in ("cpu", "tpu"):
        return None if platform == "cpu" else "tpu"
    if override is not None:
        return override
    if platform == "rocm":
        return "triton"
    cc = _local_compute_capability()
    return "triton" if cc is not None and cc < (9, 0) else "mosaic_gpu"


def _local_compute_capability() -> tuple[int, int] | None:
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        return None
    text = str(getattr(device, "compute_capability", "") or "")
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def hardware_for(platform: str, backend: str | None = None) -> Hardware:
    """Roofline figures for a platform branch: an A100 for CUDA's Triton kernels, an H100 otherwise."""
    if platform == "cuda" and backend == "triton":
        return HARDWARE["cuda_sm80"]
    return HARDWARE[platform]


# ------------------------------------------------------------------------------------------------ plan
def make_plan(
    *,
    impl: str,
    interpret: str | None,
    platforms: Sequence[str] | None,
    gpu_backend: str | None,
    kernels: Mapping[str, Callable[[], str | None]],
    problem: Callable[[str], MatmulProblem],
) -> Plan:
    """The :class:`Plan` of one product; shared by every op.

    Args:
      impl: the user override (:data:`IMPLS`).
      interpret: ``None`` or an interpret mode (:data:`INTERPRET_MODES`, needs ``impl="pallas"``).
      platforms: platforms to build branches for; ``None``: :func:`target_platforms`.
      gpu_backend: ``None`` or a GPU kernel family to force (see :func:`kernel_backend`).
      kernels: the op's kernel families, each mapped to a thunk that says why it cannot run this problem
        (``None`` if it can); ``interpret="mosaic_gpu"`` checks the ``"mosaic_gpu"`` entry.
      problem: the cost-model view of the problem for a backend (``"xla"`` or a kernel family).

    Returns:
      The plan.
    """
    check_impl(impl)
    if interpret is not None:
        if interpret not in INTERPRET_MODES:
            raise ValueError(
                f"interpret must be None or one of {INTERPRET_MODES}; got {interpret!r}."
            )
        if impl != "pallas":
            raise ValueError(
                f"interpret={interpret!r} runs the Pallas kernels, so it needs impl='pallas'; "
                f"got impl={impl!r}."
            )
        if interpret in ("mosaic_gpu", "triton"):  # TPU kernels run any tiling in interpret mode
            reason = _reason(kernels, interpret)
            if reason:
                raise ValueError(f"interpret={interpret!r} cannot run: {reason}.")
        return Plan(branches=(("default", f"interpret_{interpret}"),))
    if gpu_backend is not None and gpu_backend not in ("mosaic_gpu", "triton"):
        raise ValueError(
            f"gpu_backend must be None, 'mosaic_gpu' or 'triton'; got {gpu_backend!r}."
        )
    current = default_platform()
    if platforms is None:
        platforms = target_platforms()
    for p in platforms:
        if p not in PLATFORMS:
            raise ValueError(f"platforms must hold names from {PLATFORMS}; got {p!r}.")
    if impl == "pallas" and kernel_backend(current, gpu_backend) is None:
        raise ValueError(
            f"impl='pallas' needs a TPU or GPU, but the default backend is {current!r}; pass "
            f"interpret='hlo'|'tpu'|'mosaic_gpu'|'triton' to run the kernels in interpret mode, or use "
            "impl='xla'."
        )
    branches = [("default", _branch(impl, "cpu", None, None, problem))]
    for platform in dict.fromkeys(platforms):
        if platform == "cpu":
            continue
        family = kernel_backend(platform, gpu_backend)
        reason = _reason(kernels, family)
        if reason is not None and family == "mosaic_gpu" and gpu_backend is None:
            if _reason(kernels, "triton") is None:  # e.g. float32 on sm90: Triton, not XLA
                family, reason = "triton", None
        if impl == "pallas" and reason is not None and platform == current:
            raise ValueError(
                f"impl='pallas' cannot run on {platform}: {reason}. Use impl='auto' or 'xla'."
            )
        kernel = family if reason is None else None
        branches.append((platform, _branch(impl, platform, kernel, family, problem)))
    return Plan(branches=tuple(branches))


def _reason(kernels, family) -> str | None:
    if family is None:
        return "no Pallas kernel for this platform"
    if family not in kernels:
        return f"this op has no {family} kernel"
    return kernels[family]()


def _branch(impl, platform, kernel, family, problem) -> str:
    if impl in ("dense", "xla"):
        return impl
    sparse = kernel or "xla"
    if impl == "pallas":
        return sparse
    hardware = hardware_for(platform, family)
    return sparse if choose(problem(sparse), platform, hardware=hardware) == "sparse" else "dense"


# -------------------------------------------------------------------------------------------- switcher
def run_plan(
    plan: Plan,
    product: Callable[..., Any],
    static: Hashable,
    *args: Any,
    strict: str | None = None,
) -> Any:
    """``product(backend, static, *args)`` with the plan's backend on each platform, in one function.

    Branches that equal the default one are merged; with a single backend left this is a plain call.
    Otherwise ``lax.platform_dependent`` selects the branch when the computation is lowered, and each kernel
    branch is checked first: traced and lowered for its own platform (once per ``product``, ``static``,
    backend and argument shapes). A branch that fails runs ``product("xla", ...)`` on that platform
    instead, with a ``RuntimeWarning`` naming the error; only ``strict`` (the platform where the user forced
    ``impl="pallas"``) re-raises.

    Args:
      plan: from :func:`make_plan`.
      product: a module-level function ``product(backend, static, *args)``.
      static: hashable static configuration passed through.
      *args: array arguments (pytrees of arrays).
      strict: a platform whose kernel failure must raise, or ``None``.

    Returns:
      The product's result.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def prod(backend, static, v):
      ...     return v + 1 if backend == "xla" else jnp.sin(v)
      >>> p = Plan(branches=(("default", "xla"), ("tpu", "dense")))
      >>> jax.jit(lambda v: run_plan(p, prod, None, v))(1.0)
      Array(2., dtype=float32, weak_type=True)
    """
    default_backend = plan.backend("default")
    default = functools.partial(product, default_backend, static)
    others = {}
    for platform, backend in plan.branches:
        if platform == "default" or backend == default_backend:
            continue
        error = _lowering_error(
            platform, product, backend, static, _signature(args), _lowering_context()
        )
        if error is not None and platform == strict:
            raise RuntimeError(
                f"the {backend} kernel cannot be built for {platform} on jax {jax.__version__}: "
                f"{error}"
            )
        if error is not None:
            warnings.warn(
                f"the {backend} kernel cannot be built for {platform} on jax {jax.__version__} "
                f"({error}); that platform uses the XLA reference instead.",
                RuntimeWarning,
                stacklevel=2,
            )
            backend = "xla"
        if backend != default_backend:
            others[platform] = functools.partial(product, backend, static)
    if not others:
        return default(*args)
    return lax.platform_dependent(*args, default=default, **others)


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype).name) for x in leaves)


def _lowering_context() -> str:
    """What besides the arguments decides whether a kernel lowers: the abstract mesh in effect (Triton
    reads the target GPU from it when the host has none, see ``compat.triton_lowering_target``)."""
    return repr(jax.sharding.get_abstract_mesh())


@functools.lru_cache(maxsize=512)
def _lowering_error(
    platform: str,
    product: Callable,
    backend: str,
    static: Hashable,
    signature: tuple,
    context: str,
) -> str | None:
    """Why ``product(backend, static, ...)`` cannot be traced and lowered for ``platform`` (``None``: it can).

    Only kernel families are probed; ``"dense"``/``"xla"`` are plain XLA and lower everywhere. The probe
    runs in the caller's context (``context`` keys the cache), so it fails exactly where the caller's own
    lowering would, e.g. Triton for CUDA from a host without a GPU outside ``compat.triton_lowering_target``.
    """
    del context
    if backend in ("dense", "xla"):
        return None
    treedef, avals = signature
    structs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in avals]
    args = jax.tree.unflatten(treedef, structs)
    fn = functools.partial(product, backend, static)
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
    except Exception as e:  # any failure of this branch must stay in this branch
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
    return None
