"""Benchmark: N:M-sparse ``x @ W`` (jaxsparse ``nm_matmul``) against dense, same run, same inputs.

Method ():
  * W of shape K x N: 4096x4096 and the MLP shapes 4096x16384 / 16384x4096, bf16; N:M in {2:4, 1:4, 2:8}
    (magnitude pattern of a random normal weight); batch M (rows of x) in {1, 16, 256, 4096}.
  * Contenders: dense ``jnp.dot`` on the masked dense weight; jaxsparse ``nm_matmul`` with ``impl="auto"``
    (the backend the dispatch picked is recorded), ``impl="xla"`` (decompress + dot) and, on TPU/GPU,
    ``impl="pallas"``; on CUDA, when torch imports, torch dense ``F.linear`` and, for 2:4,
    ``to_sparse_semi_structured`` (cuSPARSELt) + ``F.linear`` on the same inputs.
  * ``--copies`` distinct weight copies are rotated call to call (a 4096^2 bf16 weight fits in H100's L2).
  * Timing: wall clock of a chain of ``--chain`` asynchronous calls (rotating copies) ended by one
    ``block_until_ready``, divided by the chain length; median over ``--repeats`` chains after warm-up.
    This includes dispatch overhead; it is not CUPTI device time. torch rows use CUDA events.
  * Every output is checked against a float32 dense product (max |err| / max |ref|).
  * On CPU the Pallas kernel runs only in interpret mode: it is checked for correctness, never timed.
  * Also recorded per row: the dispatch cost model's *predicted* times for this platform (estimates).
  * Prints a table and writes JSON (device, versions, date, method, rows) to ``benchmarks/results/``.

Usage:
  python benchmarks/nm_matmul.py            # full grid (meant for an accelerator)
  python benchmarks/nm_matmul.py --quick    # tiny grid, checks the script works (CPU)
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from _harness import (  # noqa: E402
    Contender,
    matmul_args,
    measure_contenders,
    run_cpu_dispatch,
    torch_if_cuda,
    write_matmul_json,
)

from pallas_kernels import dispatch  # noqa: E402
from pallas_kernels.nm import (  # noqa: E402
    nm_matmul,
    nm_nbytes,
    pack_nm,
    plan,
    sparse_problem,
    unpack_nm,
)
from pallas_kernels.nm import reference as nm_reference  # noqa: E402

# CPU dispatch check (issue: impl="auto" must match the better of decompress + dot and the sparse XLA path).
# 2:4, K=N in {1024, 4096}, M in {1, 16, 128, 1024}, f32 and bf16.
CPU_DISPATCH = dict(
    configs=[
        (k, m, dt)
        for dt in ("float32", "bfloat16")
        for k in (1024, 4096)
        for m in (1, 16, 128, 1024)
    ],
    nm=(2, 4),
    copies=2,
    chain=3,
    repeats=15,
)


def cpu_dispatch(grid=CPU_DISPATCH) -> int:
    """Times dense dot, impl='dense', impl='xla' and impl='auto' per config; writes the JSON and the table."""
    n_keep, m_group = grid["nm"]
    pack = jax.jit(lambda w: pack_nm(w, n=n_keep, m=m_group))

    def weights(rng, config):
        k, m, dt = config
        ws = [
            pack(jnp.asarray(rng.standard_normal((k, k), np.float32), dt))
            for _ in range(grid["copies"])
        ]
        return ws, dict(k=k, n=k, m=m, nm=f"{n_keep}:{m_group}", dtype=dt)

    return run_cpu_dispatch(
        "nm_matmul",
        grid,
        weights,
        op=nm_matmul,
        sparse_problem=sparse_problem,
        to_dense=unpack_nm,
        pick_strategy=nm_reference.pick_strategy,
    )


FULL = dict(
    shapes=[(4096, 4096), (4096, 16384), (16384, 4096)],
    ms=[1, 16, 256, 4096],
    nms=[(2, 4), (1, 4), (2, 8)],
    copies=4,
    chain=20,
    repeats=15,
)
QUICK = dict(
    shapes=[(256, 256), (512, 1024)],
    ms=[1, 16, 256],
    nms=[(2, 4), (2, 8)],
    copies=2,
    chain=5,
    repeats=5,
)


@dataclasses.dataclass
class Row:
    k: int
    n: int
    m: int
    nm: str
    contender: str
    median_us: float | None
    speedup_vs_dense: float | None
    max_rel_err: float | None
    ok: bool
    weight_bytes_ratio: float | None = None
    note: str = ""


def run_config(k, n, m, nm, *, dtype, copies, chain, repeats, platform, torch_mod, rng):
    n_keep, m_group = nm
    pack = jax.jit(lambda w: pack_nm(w, n=n_keep, m=m_group))
    w_nms, dense_w = [], []
    for _ in range(copies):
        w_nm = pack(jnp.asarray(rng.standard_normal((k, n), np.float32), dtype))
        w_nms.append(w_nm)
        dense_w.append(jax.jit(unpack_nm)(w_nm))
    ratio = nm_nbytes(w_nms[0]) / (k * n * jnp.dtype(dtype).itemsize)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
    x32 = np.asarray(x, np.float32)
    refs = [x32 @ np.asarray(w, np.float32) for w in dense_w]
    tol = 2e-2 if jnp.dtype(dtype).itemsize == 2 else 1e-4
    nm_tag = f"{n_keep}:{m_group}"

    contenders: dict[str, Contender] = {}
    dense_fn = jax.jit(
        lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    )
    contenders["dense_jnp_dot"] = (lambda i: dense_fn(x, dense_w[i]), "", True)
    chosen = plan(m, w_nms[0], impl="auto").backend(platform)
    auto_fn = jax.jit(lambda x, w: nm_matmul(x, w, impl="auto"))
    contenders["jaxsparse_auto"] = (
        lambda i: auto_fn(x, w_nms[i]),
        f"dispatch chose {chosen}",
        True,
    )
    xla_fn = jax.jit(lambda x, w: nm_matmul(x, w, impl="dense"))
    contenders["jaxsparse_dense_decompress_dot"] = (lambda i: xla_fn(x, w_nms[i]), "", True)
    if platform in ("tpu", "cuda"):
        try:
            plan(m, w_nms[0], impl="pallas")
            pallas_fn = jax.jit(lambda x, w: nm_matmul(x, w, impl="pallas"))
            contenders["jaxsparse_pallas"] = (lambda i: pallas_fn(x, w_nms[i]), "", True)
        except ValueError as e:
            contenders["jaxsparse_pallas"] = (None, str(e)[:200], False)
    else:
        interp_fn = jax.jit(lambda x, w: nm_matmul(x, w, impl="pallas", interpret="hlo"))
        contenders["jaxsparse_pallas_interpret"] = (
            lambda i: interp_fn(x, w_nms[i]),
            "Mosaic-TPU kernel in HLO interpret mode: correctness only, not timed",
            False,
        )

    if torch_mod is not None:
        torch = torch_mod
        tx = torch.from_numpy(x32).to("cuda", torch.bfloat16)
        tw = [
            torch.from_numpy(np.asarray(w, np.float32).T.copy()).to("cuda", torch.bfloat16)
            for w in dense_w
        ]
        contenders["torch_dense_linear"] = (
            lambda i: torch.nn.functional.linear(tx, tw[i]),
            "",
            True,
        )
        if nm == (2, 4):
            try:
                from torch.sparse import to_sparse_semi_structured

                tsp = [
                    to_sparse_semi_structured(w) for w in tw
                ]  # (N, K): 2:4 along K, the last dim
                contenders["torch_semi_structured_2of4"] = (
                    lambda i: torch.nn.functional.linear(tx, tsp[i]),
                    f"backend {type(tsp[0]).__name__}",
                    True,
                )
            except Exception as e:
                contenders["torch_semi_structured_2of4"] = (
                    None,
                    f"unavailable: {type(e).__name__}: {e}"[:200],
                    False,
                )

    measured = measure_contenders(
        contenders,
        refs,
        tol=lambda name: tol,
        copies=copies,
        chain=chain,
        repeats=repeats,
        torch_mod=torch_mod,
    )
    rows = [
        Row(
            k=k,
            n=n,
            m=m,
            nm=nm_tag,
            **r,
            weight_bytes_ratio=(
                ratio
                if r["contender"].startswith("jaxsparse") and r["max_rel_err"] is not None
                else None
            ),
        )
        for r in measured
    ]
    predictions = {
        p: dict(
            zip(
                ("dense", "kernel"),
                (
                    v * 1e6
                    for v in dispatch.estimate_seconds(
                        sparse_problem(m, w_nms[0], kernel), dispatch.HARDWARE[p]
                    )
                ),
            )
        )
        for p, kernel in (("tpu", "tpu"), ("cuda", "mosaic_gpu"))
    }
    return rows, {"k": k, "n": n, "m": m, "nm": nm_tag, "predicted_us": predictions}


def _print_rows(rows):
    for r in rows:
        t = f"{r.median_us:10.1f}" if r.median_us is not None else "       n/a"
        s = f"{r.speedup_vs_dense:6.2f}x" if r.speedup_vs_dense else "      -"
        e = f"{r.max_rel_err:8.1e}" if r.max_rel_err is not None else "     n/a"
        print(
            f"K={r.k:5d} N={r.n:5d} M={r.m:4d} {r.nm:4s} {r.contender:30s} {t} us {s} err={e} "
            f"{'ok' if r.ok else 'FAIL'} {r.note}",
            flush=True,
        )


def main(argv=None):
    args = matmul_args(__doc__, "nm_matmul", ["bfloat16", "float16", "float32"], argv)
    if args.cpu_dispatch:
        return cpu_dispatch()

    grid = QUICK if args.quick else FULL
    dtype = jnp.dtype(args.dtype)
    platform = dispatch.default_platform()
    torch_mod = None if (args.no_torch or platform != "cuda") else torch_if_cuda()
    rng = np.random.default_rng(0)

    print(
        f"{'K':>7s} {'N':>7s} {'M':>6s} N:M  contender                       median      vs dense"
    )
    rows: list[Row] = []
    predictions = []
    for k, n in grid["shapes"]:
        for nm in grid["nms"]:
            for m in grid["ms"]:
                new, pred = run_config(
                    k,
                    n,
                    m,
                    nm,
                    dtype=dtype,
                    copies=grid["copies"],
                    chain=grid["chain"],
                    repeats=grid["repeats"],
                    platform=platform,
                    torch_mod=torch_mod,
                    rng=rng,
                )
                _print_rows(new)
                rows += new
                predictions.append(pred)

    out = write_matmul_json(
        "nm_matmul",
        args,
        platform=platform,
        grid=grid,
        cpu_note=(
            " -- CPU numbers only check that the script works; they say nothing about accelerator "
            "performance. The Pallas kernel ran in interpret mode for correctness and was not timed."
        ),
        method=(
            "wall clock per call: chain of `chain` async calls rotating `copies` weight copies, one "
            "block_until_ready, divided by chain length; median of `repeats` chains after warm-up; "
            "max_rel_err = max|y - ref| / max|ref| against a float32 dense product of the masked weight"
        ),
        rows=[dataclasses.asdict(r) for r in rows],
        cost_model_predictions_us={
            "note": "dispatch cost-model ESTIMATES (public peak figures, guessed kernel efficiency), not measured",
            "rows": predictions,
        },
    )
    bad = [r for r in rows if r.max_rel_err is not None and not r.ok]
    print(f"\nwrote {out} ({len(rows)} rows; {len(bad)} checked rows failed the accuracy check)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
