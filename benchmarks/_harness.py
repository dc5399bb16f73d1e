"""Shared by the kernel benchmarks: library versions, chained-call timing for JAX and torch, relative error."""

from __future__ import annotations

import platform as py_platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def versions() -> dict[str, Any]:
    out = {"jax": jax.__version__, "python": py_platform.python_version(), "numpy": np.__version__}
    try:
        import jaxlib

        out["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = None
    return out


def time_chain(call: Callable[[int], Any], copies: int, chain: int, repeats: int) -> float:
    """Median seconds per call; ``call(i)`` launches one call on weight copy ``i`` and returns its output."""
    for i in range(copies):  # warm-up: compile + first run on every copy
        jax.block_until_ready(call(i))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for j in range(chain):
            out = call(j % copies)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / chain)
    return statistics.median(samples)


def time_torch(call, copies, chain, repeats, torch):
    for i in range(copies):
        call(i)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for j in range(chain):
            call(j % copies)
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / chain)
    return statistics.median(samples)


def rel_err(y, ref) -> float:
    y = (
        np.asarray(jnp.asarray(y, jnp.float32))
        if not hasattr(y, "cpu")
        else y.float().cpu().numpy()
    )
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def torch_if_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None
