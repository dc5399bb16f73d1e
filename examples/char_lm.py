"""A small byte-level language model on the Python standard library's source: data, model, training, evaluation.

Reusable pieces for the examples (post-training pruning, N:M training):

* :func:`load_text` / :func:`train_val_split` / :func:`sample_batch`: the ``.py`` files directly under the
  standard library directory (present on every machine with Python), in sorted order, as bytes; the first 90%
  is training text, the last 10% validation. The vocabulary is the 256 byte values.
* :class:`Config` and :class:`CharTransformer`: a pre-LayerNorm decoder-only transformer in Flax NNX whose every
  projection is an ``nnx.Linear`` (``blocks/<i>/attn/qkv``, ``attn/proj``, ``mlp/fc1``, ``mlp/fc2``, ``head``),
  so every projection's kernel is a 2-D ``(in, out)`` array.
* :func:`make_train_step`: a jitted step for any optax transformation, with an optional ``forward_params``
  hook (a pure function of the params applied inside the loss, e.g. a straight-through N:M estimator).
* :func:`evaluate_bpc`: validation bits per character (byte).

Params are plain nested dicts of arrays (``nnx.to_pure_dict``); ``nnx.merge(graphdef, params)`` rebuilds the
model, so any pytree function (masks, optax) applies to them directly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


# ------------------------------------------------------------------------------------------------ data
def load_text(max_bytes: int = 3_000_000) -> np.ndarray:
    """Bytes of the sorted top-level ``.py`` files of the standard library, up to ``max_bytes``, as ``uint8``."""
    root = pathlib.Path(os.path.dirname(os.__file__))
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


def train_val_split(data: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(data) * (1.0 - val_fraction))
    return data[:cut], data[cut:]


def sample_batch(data: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int):
    """Random windows: inputs ``(batch, seq_len)`` and next-byte targets, as ``int32``."""
    starts = rng.integers(0, len(data) - seq_len - 1, batch_size)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w = data[idx].astype(np.int32)
    return w[:, :-1], w[:, 1:]


def sequential_batches(
    data: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
):
    """Non-overlapping windows from the start of ``data`` (deterministic; for evaluation and calibration)."""
    n = (len(data) - 1) // seq_len
    x = data[: n * seq_len].reshape(n, seq_len).astype(np.int32)
    y = data[1 : n * seq_len + 1].reshape(n, seq_len).astype(np.int32)
    out = [
        (x[i : i + batch_size], y[i : i + batch_size])
        for i in range(0, n - batch_size + 1, batch_size)
    ]
    return out[:max_batches] if max_batches else out


# ------------------------------------------------------------------------------------------------ model
@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2
    d_mlp: int = 512

    @classmethod
    def big(cls) -> Config:
        return cls(seq_len=256, d_model=256, n_heads=8, n_layers=4, d_mlp=1024)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.n_heads = cfg.n_heads
        self.qkv = nnx.Linear(cfg.d_model, 3 * cfg.d_model, rngs=rngs)
        self.proj = nnx.Linear(cfg.d_model, cfg.d_model, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        heads = lambda a: a.reshape(b, t, self.n_heads, d // self.n_heads)
        y = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        return self.proj(y.reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(cfg.d_model, cfg.d_mlp, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.d_mlp, cfg.d_model, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.attn = Attention(cfg, rngs)
        self.ln2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nnx.Module):
    """Decoder-only transformer over bytes: ``tokens (batch, time) int32 -> logits (batch, time, vocab)``."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, cfg.vocab_size, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def init_model(cfg: Config, seed: int = 0) -> tuple[Any, dict]:
    """``(graphdef, params)`` with params a nested dict of arrays."""
    model = CharTransformer(cfg, nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


# ------------------------------------------------------------------------------------------------ training
def loss_fn(graphdef, params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_train_step(
    graphdef, tx: optax.GradientTransformation, forward_params: Callable[[Any], Any] | None = None
):
    """``step(params, opt_state, x, y) -> (params, opt_state, loss)``, jitted, for any optax ``tx``.

    ``forward_params`` (optional, pure) maps the stored params to the ones used in the forward pass, inside the
    differentiated loss (straight-through or soft-mask estimators go here).
    """
    fp = forward_params or (lambda p: p)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(graphdef, fp(p), x, y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def evaluate_bpc(graphdef, params, batches) -> float:
    """Mean next-byte cross-entropy over ``batches`` in bits per character."""
    f = jax.jit(lambda p, x, y: loss_fn(graphdef, p, x, y))
    losses = [float(f(params, x, y)) for x, y in batches]
    return float(np.mean(losses)) / math.log(2.0)


def train(
    cfg: Config,
    train_data: np.ndarray,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    tx: optax.GradientTransformation | None = None,
    forward_params: Callable[[Any], Any] | None = None,
    params: dict | None = None,
    log_every: int = 100,
    log: Callable[[str], None] = print,
):
    """Trains from scratch (or from ``params``); returns ``(graphdef, params)``. Default: AdamW, cosine decay."""
    graphdef, init_params = init_model(cfg, seed)
    params = init_params if params is None else params
    if tx is None:
        sched = optax.warmup_cosine_decay_schedule(
            0.0, lr, min(100, steps // 10 + 1), steps, lr * 0.05
        )
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx, forward_params)
    rng = np.random.default_rng(seed)
    for i in range(1, steps + 1):
        x, y = sample_batch(train_data, rng, batch_size, cfg.seq_len)
        params, opt_state, loss = step(params, opt_state, x, y)
        if log and (i % log_every == 0 or i == steps):
            log(f"step {i:5d}  train loss {float(loss) / math.log(2.0):.3f} bits/char")
    return graphdef, params
