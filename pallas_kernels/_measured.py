"""Measured dense-vs-sparse choices (written by ``benchmarks/_harness.py``; do not edit by hand).

Keys are :func:`pallas_kernels.dispatch.table_key` tuples, values ``"dense"`` or ``"sparse"``.
"""

CHOICES: dict[tuple, str] = {}
