"""Shared by the kernel benchmarks: library versions, chained-call timing for JAX and torch, relative error, the
accelerator runs' contender loop, command line and JSON, and the CPU dispatch check that writes the measured table
``pallas_kernels/_measured.py``."""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import pathlib
import platform as py_platform
import re
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MEASURED_MODULE = pathlib.Path(__file__).resolve().parents[1] / "pallas_kernels" / "_measured.py"


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


# ------------------------------------------------------------------------------ accelerator runs
# A contender: (call(i) on weight copy i, or None when unavailable; note; whether to time it).
Contender = tuple[Callable[[int], Any] | None, str, bool]


def measure_contenders(
    contenders: Mapping[str, Contender],
    refs: list[np.ndarray],
    *,
    tol: Callable[[str], float],
    copies: int,
    chain: int,
    repeats: int,
    torch_mod: Any = None,
) -> list[dict[str, Any]]:
    """Checks every contender against the float32 product ``refs[i]`` of weight copy ``i`` and times it.

    ``torch_*`` contenders are timed with CUDA events (:func:`time_torch`), the others with :func:`time_chain`;
    ``speedup_vs_dense`` is against ``dense_jnp_dot`` (``torch_dense_linear`` for ``torch_*``). Returns one dict
    per contender: ``contender``, ``median_us``, ``speedup_vs_dense``, ``max_rel_err``, ``ok`` (error within
    ``tol(name)``), ``note`` (the contender's, or why it failed).
    """
    rows = []
    for name, (call, note, timed) in contenders.items():
        row = dict(
            contender=name,
            median_us=None,
            speedup_vs_dense=None,
            max_rel_err=None,
            ok=False,
            note=note,
        )
        if call is not None:
            try:
                err = max(rel_err(call(i), refs[i]) for i in range(copies))
                seconds = None
                if timed:
                    seconds = (
                        time_torch(call, copies, chain, repeats, torch_mod)
                        if name.startswith("torch")
                        else time_chain(call, copies, chain, repeats)
                    )
                row.update(
                    median_us=None if seconds is None else seconds * 1e6,
                    max_rel_err=err,
                    ok=err <= tol(name),
                )
            except Exception as e:
                row["note"] = f"failed: {type(e).__name__}: {e}"[:300]
        rows.append(row)
    base = {r["contender"]: r["median_us"] for r in rows}
    for r in rows:
        ref_name = "torch_dense_linear" if r["contender"].startswith("torch") else "dense_jnp_dot"
        if r["median_us"] and base.get(ref_name):
            r["speedup_vs_dense"] = base[ref_name] / r["median_us"]
    return rows


def matmul_args(doc: str, name: str, dtypes: list[str], argv=None):
    """The command line both matmul benchmarks share: ``--quick``, ``--dtype``, ``--out``, ``--no-torch``,
    ``--note`` and ``--cpu-dispatch``."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny grid (CPU smoke run)")
    parser.add_argument("--dtype", default="bfloat16", choices=dtypes)
    parser.add_argument(
        "--out", default=None, help=f"JSON path (default benchmarks/results/{name}_<device>.json)"
    )
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--note", default="", help="free text stored in the JSON (e.g. machine load)"
    )
    parser.add_argument(
        "--cpu-dispatch",
        action="store_true",
        help="CPU dispatch check: auto vs densify/sparse per shape; writes the measured table",
    )
    return parser.parse_args(argv)


def write_matmul_json(
    name: str,
    args: argparse.Namespace,
    *,
    platform: str,
    grid: dict,
    cpu_note: str,
    method: str,
    rows: list[dict[str, Any]],
    **extra: Any,
) -> pathlib.Path:
    """``args.out`` or ``results/<name>_<device>.json``: label, device, versions, date, method, rows."""
    device = jax.devices()[0]
    label = f"{platform.upper()} {'quick ' if args.quick else ''}run on {device.device_kind}"
    if platform == "cpu":
        label += cpu_note
    result = {
        "label": label,
        "platform": platform,
        "device": device.device_kind,
        "num_devices": jax.device_count(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "note": args.note,
        "quick": args.quick,
        "dtype": args.dtype,
        "grid": grid,
        "method": method,
        "results": rows,
        **extra,
    }
    device_tag = "cpu" if platform == "cpu" else device.device_kind.lower().replace(" ", "_")
    out = pathlib.Path(args.out) if args.out else RESULTS / f"{name}_{device_tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out


# ------------------------------------------------------------------------------ CPU dispatch check


def time_interleaved(
    calls: Mapping[str, Callable[[int], Any]], copies: int, chain: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each contender, timed in rounds (one chain each per repeat) so load drift on
    a shared machine hits every contender alike. Every chain starts from the same cache state: a 64 MB buffer
    (twice this host's L3) is rewritten, then the contender runs once on each weight copy untimed, so no
    contender inherits the cache left by the one before it (a densified 4096^2 weight evicts the sparse path's
    operands; in an order rotated each round, which keeps every contender's predecessor, that timed two copies
    of one program up to 2.1x apart) and no chain starts with its first pass over the copies from memory (in a
    chain of a few calls that pass dominated, and timed three copies of one program up to 10% apart); each
    round also runs the contenders in a new random order (seeded)."""
    for call in calls.values():  # warm-up: compile + first run on every copy
        for i in range(copies):
            jax.block_until_ready(call(i))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    rng = np.random.default_rng(repeats)
    evict = np.zeros(64 << 20, np.uint8)
    for _ in range(repeats):
        for name in rng.permutation(names):
            call = calls[name]
            evict += 1
            for i in range(copies):
                jax.block_until_ready(call(i))
            start = time.perf_counter()
            out = None
            for j in range(chain):
                out = call(j % copies)
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - start) / chain)
    return {name: statistics.median(s) for name, s in samples.items()}


# the shortest timed chain of one contender in a CPU dispatch row (see dispatch_check)
MIN_CHAIN_S = 0.02


def dispatch_check(
    *,
    dense: Callable[[int], Any],
    densify: Callable[[int], Any],
    sparse: Callable[[int], Any],
    make_auto: Callable[[], Callable[[int], Any]],
    make_twin: Callable[[str], Callable[[int], Any]],
    key: tuple,
    copies: int,
    chain: int,
    repeats: int,
) -> dict[str, Any]:
    """One CPU dispatch row: ``x @ W`` with W held dense, densify + dot (``impl="dense"``), the sparse XLA
    path (``impl="xla"``) and ``impl="auto"``, interleaved.

    A short pre-pass picks the faster of densify and sparse and enters it in the measured table
    (``pallas_kernels.dispatch.MEASURED``) under ``key``; ``make_auto()`` then traces ``impl="auto"`` afresh,
    as a new process loading the committed table would. If the full medians pick the other path, the table
    entry is corrected and ``auto`` re-traced and re-measured; a row below 0.98x is re-measured too (at most
    twice in all, twice the repeats) -- on this shared machine that is load noise, as auto runs the same
    compiled path as densify or sparse. Every attempt is kept; the table keeps the final choice.

    Each chain is at least ``chain`` calls and long enough (by the pre-pass) to take ``MIN_CHAIN_S``, so a
    row of tens of microseconds is not timed by a few calls just after the cache was evicted.

    The control ``twin``: ``make_twin(path)`` jits the path auto was traced to choose (``"dense"``: densify,
    ``"sparse"``) once more, called exactly as auto is; ``twin_vs_path`` (that path's time over the twin's) is
    how far apart two compiled copies of one program time in this run, the resolution of ``auto_vs_best``.
    """
    from pallas_kernels import _measured

    def faster(t):
        return "sparse" if t["sparse"] < t["dense" if "dense" in t else "densify"] else "dense"

    def timed(auto, reps):
        calls = {
            "dense_dot": dense,
            "densify": densify,
            "sparse": sparse,
            "auto": auto,
            "twin": twin,
        }
        return time_interleaved(calls, copies, long_chain, reps)

    pre = time_interleaved({"dense": densify, "sparse": sparse}, copies, 1, 3)
    _measured.CHOICES[key] = faster(pre)
    long_chain = max(chain, math.ceil(MIN_CHAIN_S / min(pre.values())))
    auto, twin = make_auto(), make_twin(_measured.CHOICES[key])
    t = timed(auto, repeats)
    attempts = [{name: round(s * 1e6, 1) for name, s in t.items()}]
    for _ in range(2):
        ratio = min(t["densify"], t["sparse"]) / t["auto"]
        if faster(t) == _measured.CHOICES[key] and ratio >= 0.98:
            break
        if faster(t) != _measured.CHOICES[key]:
            _measured.CHOICES[key] = faster(t)
            auto, twin = make_auto(), make_twin(_measured.CHOICES[key])
        t = timed(auto, 2 * repeats)
        attempts.append({name: round(s * 1e6, 1) for name, s in t.items()})
    auto_ran = _measured.CHOICES[key]
    _measured.CHOICES[key] = faster(t)
    best = min(t["densify"], t["sparse"])
    return {
        "table_key": list(key),
        "us": attempts[-1],
        "attempts": attempts,
        "chain": long_chain,
        "choice": faster(t),
        "auto_ran": auto_ran,  # the table entry the last measured auto was traced with
        "auto_vs_best": best / t["auto"],
        "twin_vs_path": t["densify" if auto_ran == "dense" else "sparse"] / t["twin"],
        "auto_vs_dense_dot": t["dense_dot"] / t["auto"],
        "sparse_vs_dense_dot": t["dense_dot"] / t["sparse"],
    }


def write_measured_table() -> int:
    """Rewrites ``pallas_kernels/_measured.py`` from every ``results/*_cpu_dispatch.json``; returns the
    number of entries."""
    entries = {}
    for path in sorted(RESULTS.glob("*_cpu_dispatch.json")):
        for row in json.loads(path.read_text())["rows"]:
            if row.get("sparse_is_densify"):  # same computation either way: nothing to choose
                continue
            key = tuple(tuple(k) if isinstance(k, list) else k for k in row["table_key"])
            entries[key] = row["choice"]
    lines = [
        '"""Measured dense-vs-sparse choices on this project\'s CPU host (2 shared cores), written by',
        "``benchmarks/block_sparse_matmul.py --cpu-dispatch`` and ``benchmarks/nm_matmul.py --cpu-dispatch``",
        "(from ``benchmarks/results/*_cpu_dispatch.json``, rows where the sparse path is the dense one left",
        "out); do not edit by hand.",
        "",
        'Keys are :func:`pallas_kernels.dispatch.table_key` tuples, values ``"dense"`` (densify + dot) or',
        '``"sparse"`` (the sparse XLA path) -- whichever was faster.',
        '"""',
        "",
        "CHOICES: dict[tuple, str] = {",
    ]
    lines += [  # double quotes, as ruff format writes them (no quote characters inside the keys)
        f"    {key!r}: {choice!r},".replace("'", '"')
        for key, choice in sorted(entries.items(), key=repr)
    ]
    lines.append("}")
    MEASURED_MODULE.write_text("\n".join(lines) + "\n")
    return len(entries)


def write_dispatch_json(name: str, grid: dict, rows: list[dict]) -> pathlib.Path:
    """``results/<name>_cpu_dispatch.json`` with device, versions, date, method and rows."""
    out = RESULTS / f"{name}_cpu_dispatch.json"
    result = {
        "label": (
            f"{name} CPU dispatch check on {jax.devices()[0].device_kind}: {os.cpu_count()} CPU cores "
            f"(load average at the end {os.getloadavg()[0]:.1f}); figures are for this host only"
        ),
        "load_average_1_5_15": list(os.getloadavg()),
        "platform": "cpu",
        "device": jax.devices()[0].device_kind,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "grid": grid,
        "method": (
            "per row: dense_dot = jnp.dot with W held dense; densify = impl='dense' (rebuild W from the "
            "stored sparse weight, then dot); sparse = impl='xla'; auto = impl='auto'. Interleaved "
            "timing: `repeats` rounds, each running every contender once in a random order, a chain of calls "
            f"(the row's `chain`: at least the grid's `chain`, and at least {MIN_CHAIN_S} s by a pre-pass) rotating "
            "`copies` weight copies after a 64 MB buffer is rewritten and one untimed call per copy (the same cache "
            "state for every chain); "
            "medians. choice = faster of densify and sparse (what the measured table keeps); "
            "auto_vs_best = min(densify, sparse) / auto; auto_program_is_choice = impl='auto', traced with the "
            "table as written, compiles to the same optimised HLO (source locations stripped) as the chosen path."
        ),
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out


def print_dispatch_row(label: str, row: dict) -> None:
    us = row["us"]
    print(
        f"{label:44s} dense_dot {us['dense_dot']:10.1f}  densify {us['densify']:10.1f}  "
        f"sparse {us['sparse']:10.1f}  auto {us['auto']:10.1f} us  choice {row['choice']:6s} "
        f"auto/best {row['auto_vs_best']:5.2f}x  {row['auto_ran']} path/its twin {row['twin_vs_path']:5.2f}x  "
        f"auto/dense_dot {row['auto_vs_dense_dot']:5.2f}x",
        flush=True,
    )


def run_cpu_dispatch(
    name: str,
    grid: dict,
    weights: Callable[[np.random.Generator, tuple], tuple[list, dict[str, Any]]],
    *,
    op: Callable[..., Any],
    sparse_problem: Callable[..., Any],
    to_dense: Callable[[Any], Any],
    pick_strategy: Callable[[int, Any], str],
) -> int:
    """The CPU dispatch check of one sparse op, the loop both ``--cpu-dispatch`` scripts share.

    For each entry of ``grid["configs"]``, ``weights(rng, config)`` builds ``grid["copies"]`` sparse weight
    copies and the row's describing fields (``m``, the only one read here, plus ``k``, ``n``, ``dtype``, ...);
    then ``x @ W`` is timed by :func:`dispatch_check` held dense, densified (``impl="dense"``), on the sparse XLA
    path (``impl="xla"``) and with ``impl="auto"``. Writes ``results/<name>_cpu_dispatch.json`` and the measured
    table, prints a line per row and the worst ``auto / best``.
    """
    from pallas_kernels import dispatch

    rng = np.random.default_rng(0)
    rows = []
    dot = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))

    def jitted(impl):
        return jax.jit(lambda x, w: op(x, w, impl=impl))

    impl_of = {"dense": "dense", "sparse": "xla"}  # a path's ``impl=``
    fns = {impl: jitted(impl) for impl in impl_of.values()}
    for config in grid["configs"]:
        ws, fields = weights(rng, config)
        m = fields["m"]
        dense_w = [jax.jit(to_dense)(w) for w in ws]
        x = jnp.asarray(rng.standard_normal((m, ws[0].shape[0]), np.float32), ws[0].dtype)
        row = dispatch_check(
            dense=lambda i: dot(x, dense_w[i]),
            densify=lambda i: fns["dense"](x, ws[i]),
            sparse=lambda i: fns["xla"](x, ws[i]),
            make_auto=lambda: functools.partial(lambda i, f: f(x, ws[i]), f=jitted("auto")),
            make_twin=lambda path: functools.partial(
                lambda i, f: f(x, ws[i]), f=jitted(impl_of[path])
            ),
            key=dispatch.table_key(sparse_problem(m, ws[0], "xla"), "cpu"),
            copies=grid["copies"],
            chain=grid["chain"],
            repeats=grid["repeats"],
        )
        row.update(fields)
        # auto traced with the table as now written compiles to the very program of the chosen path: a row below
        # 1.0 with this set is timing noise between two runs of one executable
        chosen = fns[impl_of[row["choice"]]]
        row["auto_program_is_choice"] = _program(jitted("auto"), x, ws[0]) == _program(
            chosen, x, ws[0]
        )
        # where the sparse path densifies too at this size, auto runs the same computation either way
        row["sparse_is_densify"] = pick_strategy(m, ws[0]) == "densify"
        rows.append(row)
        print_dispatch_row(" ".join(f"{k}={v}" for k, v in fields.items()), row)
    out = write_dispatch_json(name, grid, rows)
    print(f"wrote {out}; measured table: {write_measured_table()} entries")
    worst = min(r["auto_vs_best"] for r in rows)
    print(f"worst auto / best(densify, sparse): {worst:.3f}x")
    print(
        "two compiled copies of one path (twin control): "
        f"{min(r['twin_vs_path'] for r in rows):.3f}x to {max(r['twin_vs_path'] for r in rows):.3f}x"
    )
    other = [r["auto_vs_best"] for r in rows if not r["auto_program_is_choice"]]
    print(
        f"rows where auto compiles to another program than the faster path: {len(other)}"
        + (f" (worst {min(other):.3f}x)" if other else "")
    )
    return 0


def _program(fn: Callable[..., Any], *args: Any) -> str:
    """The optimised HLO of ``fn(*args)`` without source locations (which differ between two lambdas)."""
    text = fn.lower(*args).compile().as_text().split("FileNames")[0]
    return re.sub(r", metadata=\{[^}]*\}", "", text).split("\n", 1)[1]
