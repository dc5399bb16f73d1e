"""Every example runs end to end with tiny settings (the full runs take minutes; these catch breakage)."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"

RUNS = {
    "quickstart": ["--steps", "200"],
    "lottery_ticket": ["--rounds", "1", "--steps", "40", "--rewind-step", "10"],
    "dynamic_sparse_training": ["--steps", "250", "--seeds", "1"],
    "block_sparse_mlp": ["--steps", "12", "--d", "64", "--tokens", "64", "--block", "16"],
    "nm_transformer": ["--steps", "6", "--val-batches", "1", "--max-bytes", "200000"],
    "prune_language_model": ["--steps", "10", "--calib-seqs", "4", "--val-batches", "1"],
    "second_wave_fidelity": ["--steps", "60", "--seeds", "1"],
    "scanned_transformer": ["--steps", "10", "--layers", "2", "--d", "32"],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_example_runs(name, tmp_path):
    args = list(RUNS[name])
    if name in ("dynamic_sparse_training", "prune_language_model"):
        args += ["--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
