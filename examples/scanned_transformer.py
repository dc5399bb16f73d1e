"""RigL on a scanned transformer: every layer's kernels live in one stacked leaf ``(layers, d_in, d_out)``.

Linen's ``nn.scan`` (like ``nnx.scan`` and MaxText) stores one leaf per kernel for all layers. A plain budget would
treat such a leaf as one big matrix: one top-k over all layers together, so some layers could end up far sparser
than others. ``jaxsparse.budget(..., layer_axis={"blocks/": 0})`` makes every layer slice its own leaf: ERK
densities from the slice shape, and RigL's drop-and-grow keeps exactly the same number of weights in every layer.

Run: ``python examples/scanned_transformer.py [--steps 300] [--layers 4]`` (a character-free toy task: predict
the next token of a repeating random sequence). Prints the loss and the per-layer density of each stacked kernel.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js


class Block(nn.Module):
    d: int
    heads: int = 4

    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads)(
            h, h, mask=nn.make_causal_mask(x[..., 0])
        )
        x = x + h
        h = nn.Dense(4 * self.d)(nn.LayerNorm()(x))
        return x + nn.Dense(self.d)(nn.gelu(h)), None


class Model(nn.Module):
    vocab: int
    d: int
    layers: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d)(tokens)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )
        x, _ = blocks(self.d, name="blocks")(x, None)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.8)
    args = ap.parse_args()
    vocab, seq, batch = 32, 32, 16
    model = Model(vocab, args.d, args.layers)
    pattern = jax.random.randint(jax.random.PRNGKey(1), (seq + 1,), 0, vocab)
    starts = jax.random.randint(jax.random.PRNGKey(2), (args.steps, batch), 0, seq)

    def batch_at(t):
        idx = (starts[t][:, None] + jnp.arange(seq + 1)[None]) % (seq + 1)
        return pattern[idx]

    params = model.init(jax.random.PRNGKey(0), batch_at(0)[:, :-1])["params"]
    sparsity = js.budget(args.sparsity, "erk", layer_axis={"blocks/": 0})
    tx = js.rigl(optax.adam(3e-3), sparsity, update_every=25, total_steps=args.steps)
    state = tx.init(params)
    params = js.apply_masks(params, state.masks)

    def loss_fn(p, tokens):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(params, state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for t in range(args.steps):
        params, state, loss = step(params, state, batch_at(t))
        if t % max(1, args.steps // 5) == 0 or t == args.steps - 1:
            print(f"step {t:4d}  loss {float(loss):.3f}")

    print("per-layer density of the stacked kernels (equal across layers):")
    flat = jax.tree_util.tree_flatten_with_path(state.masks["blocks"])[0]
    for path, m in flat:
        if m is None:
            continue
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        dens = np.asarray(m).reshape(m.shape[0], -1).mean(axis=1)
        assert np.all(dens == dens[0]), (name, dens)
        print(f"  {name:40s} {np.array2string(dens, precision=3)}")


if __name__ == "__main__":
    main()
