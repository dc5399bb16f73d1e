"""Multi-process runs on JAX's distributed runtime (2 processes x 4 CPU devices, gloo on loopback) against the same
programs on this process's 8 devices.

Compared (``multihost_programs.py`` has the programs):

* sparse training, GMP with a global top-k and RigL with ERK, 8 steps on an MLP whose kernels are sharded over
  ``data`` (spanning the processes) and ``model``, each process feeding its half of every batch: masks, step
  counters and PRNG keys bit-identical; params and Adam moments within ``4 * eps * max|leaf|`` (the gradient
  all-reduces run through gloo in one case and in-process in the other, and float sums over 8 devices may be
  added in a different order; measured: at most 2.4);
* orbax checkpoints of those states and of the compressed N:M format, written by 2 processes, read back by the
  same 2 and by this single process: bit-identical;
* ``jaxsparse.flax.convert.compress`` (N:M and block) of params and masks sharded over both processes: the same
  arrays as on one process, and for N:M as compressing replicated copies;
* post-training: Wanda norms and SparseGPT ``X^T X`` sums from per-process calibration batches, and the models
  pruned by ``prune_linen`` with Wanda (50%) and SparseGPT (2:4): bit-identical.

In the 2-process run no process can address every shard of any kernel, so a host fetch of one anywhere in the
library path fails the run; results reach the host only in the harness (one jitted all-gather per tree).
"""

import concurrent.futures
import pathlib
import sys
import time

import jax
import numpy as np
import pytest

from jaxsparse import checkpoint
from jaxsparse._launch import LaunchError, launch

HERE = pathlib.Path(__file__).resolve().parent
EXAMPLE = HERE.parents[1] / "examples" / "multihost.py"
sys.path.insert(0, str(HERE))
import multihost_programs as mp  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (host) devices")

PARTS = ["training", "posttraining", "compressed", "compress_sharded"]
FLOAT_BOUND = 4  # in eps * max|leaf|


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process run of the programs and of examples/multihost.py (both in threads: the children run
    while this process computes the reference on its 8 devices)."""
    out = tmp_path_factory.mktemp("two_processes")
    ckpt = tmp_path_factory.mktemp("example") / "ckpt"
    cache_dir = str(jax.config.jax_compilation_cache_dir or "")
    env = {  # JAX's persistent compilation cache, shared with the rest of the suite (tests/conftest.py)
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }
    env = env if cache_dir else {}
    programs = [str(HERE / "multihost_worker.py"), str(out), *PARTS]
    example = [str(EXAMPLE), "--steps", "52", "--ckpt", str(ckpt)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(launch, argv, 2, 4, timeout=600, env=env) for argv in (programs, example)
        ]
        mesh = mp.make_mesh()
        ref_dir = tmp_path_factory.mktemp("one_process")
        reference = {part: mp.PARTS[part](mesh, str(ref_dir)) for part in PARTS}
        outputs, example_outputs = (f.result() for f in futures)
    print(f"2-process runs and the reference: {time.perf_counter() - t0:.1f} s")
    return out, reference, (example_outputs, ckpt)


@pytest.fixture(scope="module")
def two_processes(runs):
    return runs[0]


@pytest.fixture(scope="module")
def one_process(runs):
    return runs[1]


def gather(tree) -> dict[str, np.ndarray]:
    return mp.gather(tree, mp.make_mesh())


def load(out: pathlib.Path, part: str) -> dict[str, np.ndarray]:
    errors = sorted(out.glob(f"{part}.error*"))
    if errors:
        pytest.fail(f"part {part!r} raised in the 2-process run:\n{errors[0].read_text()}")
    return dict(np.load(out / f"{part}.npz"))


def select(flat: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}


def assert_same(got: dict, want: dict, float_bound: float | None = None) -> None:
    """Bit-identical, or floats within ``float_bound * eps * max|leaf|`` when given."""
    assert sorted(got) == sorted(want)
    worst = 0.0
    for k in sorted(want):
        a, b = got[k], want[k]
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, a.shape, b.dtype, b.shape)
        if float_bound is None or a.dtype.kind != "f":
            np.testing.assert_array_equal(a, b, err_msg=k)
            continue
        scale = float(np.max(np.abs(b))) or 1.0
        err = float(np.max(np.abs(a.astype(np.float64) - b))) / (np.finfo(a.dtype).eps * scale)
        worst = max(worst, err)
        assert err <= float_bound, f"{k}: {err:.2f} eps * max|leaf| apart"
    print(f"{len(want)} leaves compared; worst float difference {worst:.2f} eps * max|leaf|")


# ------------------------------------------------------------------------------------------------ training
def _params_key(nnz_key: str) -> str:
    """``['rigl_erk']['Dense_0/kernel']`` -> ``['rigl_erk']['params']['Dense_0']['kernel']``."""
    run, path = nnz_key[2:-2].split("']['")
    return f"['{run}']['params']" + "".join(f"['{p}']" for p in path.split("/"))


def test_sparse_training_matches_one_process(two_processes, one_process):
    got = load(two_processes, "training")
    want = gather(one_process["training"]["runs"])
    runs = select(got, "['runs']")
    exact = {k: v for k, v in want.items() if v.dtype.kind != "f"}
    assert any(".masks" in k for k in exact) and any(".key" in k for k in exact)
    assert_same({k: runs[k] for k in exact}, exact)  # masks, steps, keys: bit for bit
    assert_same(runs, want, FLOAT_BOUND)
    # the masks are real: GMP keeps exactly a quarter of all kernel weights (one global threshold)...
    gmp = [v for k, v in runs.items() if k.startswith("['gmp_global']['state'].masks")]
    assert len(gmp) == 3 and sum(int(m.sum()) for m in gmp) == sum(m.size // 4 for m in gmp)
    # jaxsparse.sparsity_summary counted the same nonzeros on the sharded params (only counts were fetched)
    nnz = select(got, "['nnz']")
    assert nnz and all(
        int(v) == int(np.count_nonzero(runs[_params_key(k)])) for k, v in nnz.items()
    )
    # ...and RigL moved connections away from its initial ERK masks
    rigl_init = jax.tree.leaves(
        mp.optimizers()["rigl_erk"].init(mp.init_params(mp.make_mesh())).masks
    )
    rigl_end = [v for k, v in runs.items() if k.startswith("['rigl_erk']['state'].masks")]
    assert any((np.asarray(a) != b).any() for a, b in zip(rigl_init, rigl_end))
    # in the 2-process run no process could address every shard of a kernel, mask or moment
    addressable = select(got, "['fully_addressable']")
    sharded = [k for k in addressable if "kernel" in k]
    assert sharded and not any(addressable[k] for k in sharded)


def test_checkpoint_two_processes_to_two_and_to_one(two_processes, one_process):
    got = load(two_processes, "training")
    saved = select(got, "['runs']")
    assert_same(select(got, "['restored']"), saved)  # written and read by 2 processes
    target = one_process["training"]["runs"]  # the same tree on this process's 8 devices
    restored = checkpoint.restore(two_processes / "ckpt_sparse", target)
    assert_same(gather(restored), saved)
    for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert r.sharding.is_equivalent_to(t.sharding, r.ndim)


# ------------------------------------------------------------------------------------------------ compressed
def test_compressed_format_across_processes(two_processes, one_process):
    got = load(two_processes, "compressed")
    ref = one_process["compressed"]
    assert_same(select(got, "['compressed']"), gather(ref["compressed"]))
    assert_same(select(got, "['restored']"), select(got, "['compressed']"))
    assert_same(select(got, "['dense']"), gather(ref["dense"]))
    restored = checkpoint.restore(two_processes / "ckpt_compressed", ref["compressed"])
    assert_same(gather(restored), select(got, "['compressed']"))
    addressable = select(got, "['fully_addressable']")
    values = [k for k in addressable if "kernel_values" in k]
    assert values and not any(addressable[k] for k in values)


def test_compress_masks_sharded_over_processes(two_processes, one_process):
    """``convert.compress`` of params and masks that no process fully addresses (N:M and block): the same
    compressed arrays as on one process."""
    got = load(two_processes, "compress_sharded")
    want = gather(one_process["compress_sharded"])
    compressed = {k: v for k, v in want.items() if "masks_fully_addressable" not in k}
    assert any("kernel_values" in k for k in compressed) and any(
        "kernel_blocks" in k for k in compressed
    )
    assert_same({k: got[k] for k in want if k in compressed}, compressed)
    # no process could address every shard of any kernel mask (N:M: 3 kernels, block: Dense_0)
    addressable = {k: v for k, v in got.items() if "masks_fully_addressable" in k and "kernel" in k}
    assert len(addressable) == 4 and not any(addressable.values())
    # N:M: the same packing as the compressed part (there compressed then resharded)
    nm = select(got, "['nm']")
    assert_same(
        {k: nm[k] for k in nm if "fully_addressable" not in k},
        select(load(two_processes, "compressed"), "['compressed']"),
    )


# ------------------------------------------------------------------------------------------------ post-training
def test_posttraining_matches_one_process(two_processes, one_process):
    got = load(two_processes, "posttraining")
    want = gather(one_process["posttraining"])
    updated = [k for k in want if k.startswith("['sparsegpt']['params']")]
    assert_same(
        {k: got[k] for k in want if k not in updated},
        {k: want[k] for k in want if k not in updated},
    )
    assert_same({k: got[k] for k in updated}, {k: want[k] for k in updated}, FLOAT_BOUND)
    counts = [v for k, v in want.items() if k.endswith("['count']")]
    assert counts and all(c == mp.CALIB_BATCHES * mp.BATCH for c in counts)
    masks = {k: v for k, v in want.items() if k.startswith("['sparsegpt']['masks']")}
    assert masks and all(m.reshape(-1, 4, m.shape[-1]).sum(1).max() == 2 for m in masks.values())


# ------------------------------------------------------------------------------------------------ example
def test_example_runs_on_two_processes(runs):
    outputs, ckpt = runs[2]
    text = outputs[0].output
    assert "2 process(es) x 4 cpu devices; mesh {'data': 2, 'model': 4}" in text
    assert "kernel sparsity 0.900" in text and "identical" in text, text[-3000:]
    assert (ckpt / "layout.json").exists()


# ------------------------------------------------------------------------------------------------ launcher
ECHO = (
    "import os, sys; e = os.environ; print('id', e['JAXSPARSE_PROCESS_ID'], 'of', "
    "e['JAXSPARSE_NUM_PROCESSES'], e['JAXSPARSE_COORDINATOR_ADDRESS'], e['XLA_FLAGS'])"
)


def test_launch_keeps_each_output_and_environment():
    outputs = launch(["-c", ECHO], 3, 5, timeout=60)
    assert [o.process_id for o in outputs] == [0, 1, 2] and all(o.returncode == 0 for o in outputs)
    for o in outputs:
        words = o.output.split()
        assert words[:4] == ["id", str(o.process_id), "of", "3"]
        assert words[4].startswith("127.0.0.1:") and int(words[4].split(":")[1]) > 0
        assert "--xla_force_host_platform_device_count=5" in words
    assert len({o.output.split()[4] for o in outputs}) == 1  # one coordinator address


def test_launch_failure_stops_the_others():
    code = (
        "import os, sys, time; i = int(os.environ['JAXSPARSE_PROCESS_ID']); "
        "print('started', i, flush=True); time.sleep(120) if i == 0 else sys.exit(3)"
    )
    t0 = time.perf_counter()
    with pytest.raises(LaunchError, match="launch failed") as info:
        launch(["-c", code], 2, 1, timeout=100)
    assert time.perf_counter() - t0 < 30  # process 0 was stopped, not waited for
    by_id = {o.process_id: o for o in info.value.outputs}
    assert by_id[1].returncode == 3 and by_id[0].returncode != 0
    assert "started 0" in by_id[0].output and "process 1 (exit 3)" in str(info.value)


def test_launch_timeout():
    t0 = time.perf_counter()
    with pytest.raises(LaunchError, match="timed out after 2 s"):
        launch(["-c", "import time; time.sleep(120)"], 2, 1, timeout=2)
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(argv="x.py"), "argv"),
        (dict(argv=[]), "argv"),
        (dict(argv=["x.py"], num_processes=0), "num_processes"),
        (dict(argv=["x.py"], local_devices=True), "local_devices"),
        (dict(argv=["x.py"], timeout=0), "timeout"),
    ],
)
def test_launch_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        launch(**kwargs)
