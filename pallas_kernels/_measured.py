"""Measured dense-vs-sparse choices on this project's CPU host (2 shared cores), written by
``benchmarks/block_sparse_matmul.py --cpu-dispatch`` and ``benchmarks/nm_matmul.py --cpu-dispatch``
(from ``benchmarks/results/*_cpu_dispatch.json``, rows where the sparse path is the dense one left
out); do not edit by hand.

Keys are :func:`pallas_kernels.dispatch.table_key` tuples, values ``"dense"`` (densify + dot) or
``"sparse"`` (the sparse XLA path) -- whichever was faster.
"""

CHOICES: dict[tuple, str] = {
    ("block_sparse", "cpu", 1, 1024, 1024, "bfloat16", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 1, 1024, 1024, "bfloat16", (128, 128), 0.09): "sparse",
    ("block_sparse", "cpu", 1, 1024, 1024, "bfloat16", (128, 128), 0.5): "sparse",
    ("block_sparse", "cpu", 1, 1024, 1024, "float32", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 1, 1024, 1024, "float32", (128, 128), 0.09): "sparse",
    ("block_sparse", "cpu", 1, 1024, 1024, "float32", (128, 128), 0.5): "sparse",
    ("block_sparse", "cpu", 1, 4096, 4096, "bfloat16", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 1, 4096, 4096, "bfloat16", (128, 128), 0.1): "sparse",
    ("block_sparse", "cpu", 1, 4096, 4096, "bfloat16", (128, 128), 0.5): "sparse",
    ("block_sparse", "cpu", 1, 4096, 4096, "float32", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 1, 4096, 4096, "float32", (128, 128), 0.1): "sparse",
    ("block_sparse", "cpu", 1, 4096, 4096, "float32", (128, 128), 0.5): "sparse",
    ("block_sparse", "cpu", 1024, 1024, 1024, "bfloat16", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 1024, 1024, 1024, "float32", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 1024, 4096, 4096, "bfloat16", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 1024, 4096, 4096, "float32", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 128, 1024, 1024, "bfloat16", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 128, 1024, 1024, "bfloat16", (128, 128), 0.09): "sparse",
    ("block_sparse", "cpu", 128, 1024, 1024, "bfloat16", (128, 128), 0.5): "sparse",
    ("block_sparse", "cpu", 128, 1024, 1024, "float32", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 128, 1024, 1024, "float32", (128, 128), 0.09): "sparse",
    ("block_sparse", "cpu", 128, 1024, 1024, "float32", (128, 128), 0.5): "dense",
    ("block_sparse", "cpu", 128, 4096, 4096, "bfloat16", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 128, 4096, 4096, "bfloat16", (128, 128), 0.1): "sparse",
    ("block_sparse", "cpu", 128, 4096, 4096, "bfloat16", (128, 128), 0.5): "dense",
    ("block_sparse", "cpu", 128, 4096, 4096, "float32", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 128, 4096, 4096, "float32", (128, 128), 0.1): "sparse",
    ("block_sparse", "cpu", 128, 4096, 4096, "float32", (128, 128), 0.5): "dense",
    ("block_sparse", "cpu", 16, 1024, 1024, "bfloat16", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 16, 1024, 1024, "bfloat16", (128, 128), 0.09): "sparse",
    ("block_sparse", "cpu", 16, 1024, 1024, "bfloat16", (128, 128), 0.5): "sparse",
    ("block_sparse", "cpu", 16, 1024, 1024, "float32", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 16, 1024, 1024, "float32", (128, 128), 0.09): "sparse",
    ("block_sparse", "cpu", 16, 1024, 1024, "float32", (128, 128), 0.5): "sparse",
    ("block_sparse", "cpu", 16, 4096, 4096, "bfloat16", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 16, 4096, 4096, "bfloat16", (128, 128), 0.1): "sparse",
    ("block_sparse", "cpu", 16, 4096, 4096, "bfloat16", (128, 128), 0.5): "sparse",
    ("block_sparse", "cpu", 16, 4096, 4096, "float32", (128, 128), 0.05): "sparse",
    ("block_sparse", "cpu", 16, 4096, 4096, "float32", (128, 128), 0.1): "sparse",
    ("block_sparse", "cpu", 16, 4096, 4096, "float32", (128, 128), 0.5): "sparse",
    ("nm", "cpu", 1, 1024, 1024, "bfloat16", (2, 4), 0.5): "dense",
    ("nm", "cpu", 1, 1024, 1024, "float32", (2, 4), 0.5): "dense",
    ("nm", "cpu", 1, 4096, 4096, "bfloat16", (2, 4), 0.5): "dense",
    ("nm", "cpu", 1, 4096, 4096, "float32", (2, 4), 0.5): "dense",
}
