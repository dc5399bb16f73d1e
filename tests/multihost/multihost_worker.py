"""One process of the multi-process run (started by tests/multihost/test_multihost.py through the launcher).

``python multihost_worker.py OUT_DIR PART...``: runs each part on the global mesh, gathers the results (harness
only) and, on process 0, writes ``OUT_DIR/<part>.npz``; a part that raises leaves its traceback in
``OUT_DIR/<part>.error<process>``. Checkpoints go to ``OUT_DIR/ckpt_*``. Importing this file does nothing
(pytest's ``--doctest-modules`` imports it).
"""

import os
import sys
import time
import traceback


def main(out_dir: str, parts: list[str]) -> None:
    import jaxsparse

    jaxsparse.distributed_initialize()  # before anything creates a JAX backend

    import jax
    import numpy as np
    from multihost_programs import PARTS, gather, make_mesh

    mesh = make_mesh()
    assert jax.process_count() == 2 and jax.local_device_count() == 4, (
        jax.process_count(),
        jax.local_device_count(),
    )
    for part in parts:
        t0 = time.perf_counter()
        try:
            host = gather(PARTS[part](mesh, out_dir), mesh)
        except (
            Exception
        ):  # recorded for the test; both processes fail at the same point of an SPMD program
            with open(os.path.join(out_dir, f"{part}.error{jax.process_index()}"), "w") as f:
                f.write(traceback.format_exc())
            print(f"process {jax.process_index()}: {part} failed", flush=True)
            continue
        if jax.process_index() == 0:
            np.savez(os.path.join(out_dir, f"{part}.npz"), **host)
        print(f"process {jax.process_index()}: {part} {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
