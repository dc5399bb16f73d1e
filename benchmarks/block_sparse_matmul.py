"""Benchmark: block-sparse ``x @ W`` (jaxsparse) against dense and other sparse baselines, same run, same inputs.

Method:
  * W of shape K x N (4096x4096 and the MLP shapes 4096x16384 / 16384x4096), bf16, random block masks with an
    exact block count for block sparsity {50, 75, 90, 95}% and blocks {32, 64, 128}; batch M in {1, 16, 256, 4096}.
  * Contenders: dense ``jnp.dot``; the XLA fallbacks (densify + dot, gather + einsum + segment sum);
    ``jax.experimental.sparse`` BCSR (element-wise CSR of the masked weight); jaxsparse ``bsr_matmul`` with
    ``impl="auto"`` (whatever the dispatch picks; recorded) and, on TPU/GPU, ``impl="pallas"``; on CUDA, when
    torch imports, torch dense ``F.linear`` and torch BSR (``to_sparse_bsr`` + ``F.linear``) on the same inputs.
  * ``--copies`` distinct weight copies are rotated call to call so caches do not flatter small batches.
  * Timing: wall clock of a chain of ``--chain`` asynchronous calls (rotating copies) ended by one
    ``block_until_ready``, divided by the chain length; median over ``--repeats`` chains after warm-up.
    This includes dispatch overhead; it is not CUPTI device time.
  * Every contender's output is checked against a float32 dense product (max abs error / max abs reference).
  * Prints a table and writes JSON (device, versions, date, method, all rows) to ``benchmarks/results/``.

Usage:
  python benchmarks/block_sparse_matmul.py --cpu-dispatch  # CPU: auto vs densify / sparse XLA per shape;
                                                           # writes results/*_cpu_dispatch.json and the
                                                           # measured table pallas_kernels/_measured.py
  python benchmarks/block_sparse_matmul.py            # full grid (meant for an accelerator)
  python benchmarks/block_sparse_matmul.py --quick    # tiny grid, checks the script works (CPU)
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
from pallas_kernels.block_sparse import (  # noqa: E402
    block_sparse_from_dense,
    bsr_matmul,
    plan,
    reference,  # noqa: E402
    sparse_problem,
)

FULL = dict(
    shapes=[(4096, 4096), (4096, 16384), (16384, 4096)],
    ms=[1, 16, 256, 4096],
    sparsities=[0.5, 0.75, 0.9, 0.95],
    blocks=[32, 64, 128],
    copies=4,
    chain=20,
    repeats=15,
)
BCSR_TOL = 1e-1
QUICK = dict(
    shapes=[(256, 256), (256, 1024)],
    ms=[1, 16, 128],
    sparsities=[0.5, 0.9],
    blocks=[32, 64],
    copies=2,
    chain=3,
    repeats=3,
)


# CPU dispatch check (issue: impl="auto" must match the better of densify + dot and the sparse XLA path).
# K=N in {1024, 4096}, M in {1, 16, 128, 1024}, sparsity {50, 90, 95}%, f32 and bf16.
CPU_DISPATCH = dict(
    configs=[
        (k, m, sp, dt)
        for dt in ("float32", "bfloat16")
        for k in (1024, 4096)
        for m in (1, 16, 128, 1024)
        for sp in (0.5, 0.9, 0.95)
    ],
    block=128,
    copies=2,
    chain=3,
    repeats=15,
)


def cpu_dispatch(grid=CPU_DISPATCH) -> int:
    """Times dense dot, impl='dense', impl='xla' and impl='auto' per config; writes the JSON and the table."""
    b = grid["block"]

    def weights(rng, config):
        k, m, sparsity, dt = config
        masks = _masks(rng, k // b, k // b, sparsity, grid["copies"])
        capacity = int(masks[0].sum())
        pack = jax.jit(
            lambda w, mask: block_sparse_from_dense(w, mask, block=(b, b), capacity=capacity)
        )
        ws = [pack(jnp.asarray(rng.standard_normal((k, k), np.float32), dt), mk) for mk in masks]
        return ws, dict(k=k, n=k, m=m, sparsity=sparsity, block=b, dtype=dt)

    return run_cpu_dispatch(
        "block_sparse_matmul",
        grid,
        weights,
        op=bsr_matmul,
        sparse_problem=sparse_problem,
        to_dense=reference.block_sparse_to_dense,
        pick_strategy=reference.pick_strategy,
    )


@dataclasses.dataclass
class Row:
    k: int
    n: int
    m: int
    sparsity: float
    block: int
    contender: str
    median_us: float | None
    speedup_vs_dense: float | None
    max_rel_err: float | None
    ok: bool
    note: str = ""


def _masks(rng, kb, nb, sparsity, copies):
    count = max(1, int(round((1 - sparsity) * kb * nb)))
    out = []
    for _ in range(copies):
        m = np.zeros(kb * nb, bool)
        m[rng.choice(kb * nb, count, replace=False)] = True
        out.append(m.reshape(kb, nb))
    return out


def run_config(
    k, n, m, sparsity, block, *, dtype, copies, chain, repeats, platform, torch_mod, rng
):
    kb, nb = k // block, n // block
    masks = _masks(rng, kb, nb, sparsity, copies)
    capacity = int(masks[0].sum())
    dense_w = []
    bsws = []
    pack = jax.jit(
        lambda w, mask: block_sparse_from_dense(w, mask, block=(block, block), capacity=capacity)
    )
    for mask in masks:
        w = jnp.asarray(rng.standard_normal((k, n), np.float32), dtype)
        bsw = pack(w, mask)
        bsws.append(bsw)
        dense_w.append(jnp.asarray(reference.block_sparse_to_dense(bsw)))
    x = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
    x32 = np.asarray(x, np.float32)
    refs = [x32 @ np.asarray(w, np.float32) for w in dense_w]  # float32 oracle per copy
    tol = 2e-2 if jnp.dtype(dtype).itemsize == 2 else 1e-4

    contenders: dict[str, Contender] = {}
    dense_fn = jax.jit(
        lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    )
    contenders["dense_jnp_dot"] = (lambda i: dense_fn(x, dense_w[i]), "", True)
    for strategy in ("densify", "gather"):
        f = jax.jit(lambda x, w, s=strategy: reference.matmul(x, w, s))
        contenders[f"xla_{strategy}"] = (lambda i, f=f: f(x, bsws[i]), "", True)

    try:
        from jax.experimental import sparse as jsparse

        bcsr_t = [jsparse.BCSR.fromdense(w.T) for w in dense_w]  # [N, K] element-wise CSR
        bcsr_fn = jax.jit(lambda wt, x: (wt @ x.T).T)
        contenders["jax_sparse_bcsr"] = (
            lambda i: bcsr_fn(bcsr_t[i], x),
            f"nse={int(bcsr_t[0].nse)}; accumulates in {jnp.dtype(dtype).name}",
            True,
        )
    except Exception as e:  # pragma: no cover - depends on jax build
        contenders["jax_sparse_bcsr"] = (None, f"unavailable: {type(e).__name__}: {e}"[:200], False)

    auto_plan = dict(plan(m, bsws[0], impl="auto").branches)
    chosen = auto_plan.get(
        platform if platform in ("tpu", "cuda") else "default", auto_plan["default"]
    )
    auto_fn = jax.jit(lambda x, w: bsr_matmul(x, w, impl="auto"))
    contenders["jaxsparse_auto"] = (
        lambda i: auto_fn(x, bsws[i]),
        f"dispatch chose {chosen}",
        True,
    )
    if platform in ("tpu", "cuda"):
        try:
            plan(m, bsws[0], impl="pallas")
            pallas_fn = jax.jit(lambda x, w: bsr_matmul(x, w, impl="pallas"))
            contenders["jaxsparse_pallas"] = (lambda i: pallas_fn(x, bsws[i]), "", True)
        except ValueError as e:
            contenders["jaxsparse_pallas"] = (None, str(e)[:200], False)

    if torch_mod is not None:
        torch = torch_mod
        tx = torch.from_numpy(np.asarray(x, np.float32)).to("cuda", torch.bfloat16)
        tw = [
            torch.from_numpy(np.asarray(w, np.float32).T.copy()).to("cuda", torch.bfloat16)
            for w in dense_w
        ]
        contenders["torch_dense_linear"] = (
            lambda i: torch.nn.functional.linear(tx, tw[i]),
            "",
            True,
        )
        try:
            tbsr = [w.to_sparse_bsr((block, block)) for w in tw]
            contenders["torch_bsr_linear"] = (
                lambda i: torch.nn.functional.linear(tx, tbsr[i]),
                "",
                True,
            )
        except Exception as e:
            contenders["torch_bsr_linear"] = (
                None,
                f"unavailable: {type(e).__name__}: {e}"[:200],
                False,
            )

    def tol_of(
        name,
    ):  # BCSR sums in the input dtype (no float32 accumulator): looser for 16-bit inputs
        return BCSR_TOL if (name == "jax_sparse_bcsr" and jnp.dtype(dtype).itemsize == 2) else tol

    measured = measure_contenders(
        contenders,
        refs,
        tol=tol_of,
        copies=copies,
        chain=chain,
        repeats=repeats,
        torch_mod=torch_mod,
    )
    return [Row(k=k, n=n, m=m, sparsity=sparsity, block=block, **r) for r in measured]


def main(argv=None):
    args = matmul_args(__doc__, "block_sparse_matmul", ["bfloat16", "float32"], argv)
    if args.cpu_dispatch:
        return cpu_dispatch()

    grid = QUICK if args.quick else FULL
    dtype = jnp.dtype(args.dtype)
    platform = dispatch.default_platform()
    torch_mod = None if (args.no_torch or platform != "cuda") else torch_if_cuda()
    rng = np.random.default_rng(0)

    rows: list[Row] = []
    for k, n in grid["shapes"]:
        for block in grid["blocks"]:
            for sparsity in grid["sparsities"]:
                for m in grid["ms"]:
                    new = run_config(
                        k,
                        n,
                        m,
                        sparsity,
                        block,
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

    out = write_matmul_json(
        "block_sparse_matmul",
        args,
        platform=platform,
        grid=grid,
        cpu_note=" -- CPU numbers check that the script works; they say nothing about accelerator performance",
        method=(
            "wall clock per call: chain of `chain` async calls rotating `copies` weight copies, one "
            "block_until_ready, divided by chain length; median of `repeats` chains after warm-up; "
            "max_rel_err = max|y - ref| / max|ref| against a float32 dense product; ok if <= 2e-2 for "
            "16-bit inputs (1e-4 float32), 1e-1 for jax_sparse_bcsr which accumulates in the input dtype"
        ),
        rows=[dataclasses.asdict(r) for r in rows],
    )
    bad = [r for r in rows if r.median_us is not None and not r.ok]
    print(f"\nwrote {out} ({len(rows)} rows; {len(bad)} measured rows failed the accuracy check)")
    return 1 if bad else 0


def _print_rows(rows):
    for r in rows:
        t = f"{r.median_us:10.1f}" if r.median_us is not None else "       n/a"
        s = f"{r.speedup_vs_dense:6.2f}x" if r.speedup_vs_dense else "      -"
        e = f"{r.max_rel_err:8.1e}" if r.max_rel_err is not None else "     n/a"
        print(
            f"K={r.k:5d} N={r.n:5d} M={r.m:4d} sp={r.sparsity:4.2f} b={r.block:3d} {r.contender:20s} "
            f"{t} us {s} err={e} {'ok' if r.ok else 'FAIL'} {r.note}"
        )


if __name__ == "__main__":
    sys.exit(main())
