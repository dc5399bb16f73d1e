"""Calibration and evaluation sentences that ship with Python, and the MiniLM tokenizer.

Text: the prose of the interpreter's bundled help topics (``pydoc_data.topics``) and the module docstrings of the
standard library's source files (read with ``ast``, nothing imported). Paragraphs are split into sentences;
code blocks, grammar rules and fragments are dropped; duplicates removed. Each sentence goes to the evaluation
or the calibration set by a hash of its text, so the two sets are disjoint and the split is the same on every
machine with the same Python version (the help text differs slightly between Python releases).

Calibration batches are fixed-length token windows (``[CLS]`` + tokens + ``[SEP]``, no padding) cut from the
concatenated calibration sentences, so the activation statistics of the pruning methods see no padding tokens.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import pathlib
import re
import sysconfig

import numpy as np

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_CODE_CHARS = set("=(){}[]<>*_`|\\#@$%^~")


def _paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith((" ", "\t", ">>>")) for line in lines):
            continue  # code, grammar or an indented example
        out.append(" ".join(line.strip() for line in lines))
    return out


def _good(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 40 or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if sum(c in _CODE_CHARS for c in sentence) > 2 or "::" in sentence or '"' in sentence:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in sentence)
    return letters / len(sentence) > 0.9


def _sentences(text: str) -> list[str]:
    return [s for p in _paragraphs(text) for s in _SENTENCE_END.split(p) if _good(s)]


def _module_docstrings() -> list[str]:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        doc = ast.get_docstring(tree)
        if doc:
            docs.append(doc)
    return docs


@functools.cache
def sentences() -> tuple[str, ...]:
    """All usable sentences, in a fixed order (help topics by name, then module docstrings by file name)."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)] + _module_docstrings()
    return tuple(dict.fromkeys(s for t in texts for s in _sentences(t)))


def _is_eval(sentence: str) -> bool:
    return hashlib.sha256(sentence.encode()).digest()[0] < 64  # about a quarter


def split(num_eval: int | None = None, num_calib: int | None = None) -> tuple[list[str], list[str]]:
    """``(calibration, evaluation)`` sentence lists, disjoint, each truncated to the given size."""
    all_ = sentences()
    ev = [s for s in all_ if _is_eval(s)]
    cal = [s for s in all_ if not _is_eval(s)]
    for name, want, have in (("num_eval", num_eval, ev), ("num_calib", num_calib, cal)):
        if want is not None and not 1 <= want <= len(have):
            raise ValueError(f"`{name}` must be in [1, {len(have)}]; got {want}.")
    return cal[:num_calib], ev[:num_eval]


# ----------------------------------------------------------------------------------------- tokenizer
def tokenizer(max_length: int = 256):
    """The checkpoint's ``tokenizer.json`` with Sentence-Transformers' settings (truncate at 256, no padding)."""
    from tokenizers import Tokenizer

    from .model import model_dir

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def encode_batch(
    tok, texts: list[str], pad_to: int = 16, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32, padded to ``length`` tokens, or by default to the longest text
    rounded up to a multiple of ``pad_to``."""
    enc = tok.encode_batch(texts)
    longest = max(len(e.ids) for e in enc)
    t = -(-longest // pad_to) * pad_to if length is None else length
    if t < longest:
        raise ValueError(f"`length`={length} is shorter than the longest text ({longest} tokens).")
    ids = np.zeros((len(texts), t), np.int32)
    mask = np.zeros((len(texts), t), np.int32)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return ids, mask


def calibration_windows(
    tok, texts: list[str], num_windows: int, length: int = 64, batch_size: int = 16
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``num_windows`` windows of ``length`` tokens (``[CLS]`` + text tokens + ``[SEP]``, mask all ones) cut
    in order from the concatenated ``texts``, in batches of ``batch_size``."""
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    stream = [i for e in tok.encode_batch(texts, add_special_tokens=False) for i in e.ids]
    body = length - 2
    if len(stream) < num_windows * body:
        raise ValueError(
            f"{len(texts)} calibration texts give {len(stream)} tokens, fewer than `num_windows`={num_windows} "
            f"windows of {length} tokens need ({num_windows * body})."
        )
    rows = np.asarray(stream[: num_windows * body], np.int32).reshape(num_windows, body)
    ids = np.concatenate(
        [np.full((num_windows, 1), cls, np.int32), rows, np.full((num_windows, 1), sep, np.int32)],
        1,
    )
    return [
        (ids[i : i + batch_size], np.ones_like(ids[i : i + batch_size]))
        for i in range(0, num_windows, batch_size)
    ]
