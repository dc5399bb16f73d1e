"""DST-EE (Huang et al. 2023, "Dynamic Sparse Training via Balancing the Exploration-Exploitation Trade-off"):
RigL whose growth maximises an acquisition combining exploitation and exploration.

Per mask update ``t`` (counted from 1) every connection's acquisition is ``|dL/dw| + c * sqrt(ln t / (N + eps))``,
``N`` being the number of update rounds in which the connection was active (an int32 counter per weight, in the
state, incremented on the active entries at every update); RigL's drop (smallest ``|w|``), schedule and growth count
are unchanged, so ``c = 0`` is exactly :func:`jaxsparse.rigl`.

**Not verified against the authors.** Neither code nor the paper's text was available to check (only the
abstract): the acquisition's UCB form, the exploration weight ``c`` and ``eps`` here are this library's choice
(``c = 1e-3`` puts the bonus of a never-active connection after ~20 rounds at the scale of small-MLP gradients).
Treat results as "RigL with a UCB exploration bonus", not as a reproduction of DST-EE's numbers.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from jaxsparse._tree import is_none, map_live
from jaxsparse.allocation import Budget
from jaxsparse.transforms._factory import sparse_transform
from jaxsparse.transforms.common import MaskAlgorithm, MaskContext
from jaxsparse.transforms.dst import rigl

__all__ = ["DSTEEState", "dst_ee"]


class DSTEEState(NamedTuple):
    """DST-EE's state: RigL's own, the per-weight active-round counters ``N`` and the update-round count ``t``."""

    rigl: Any
    counts: PyTree
    rounds: Array


@sparse_transform
def dst_ee(
    sparsity: float | Budget | PyTree,
    *,
    exploration: float = 1e-3,
    eps: float = 1.0,
    update_every: int = 100,
    drop_fraction: float = 0.3,
    decay: str = "cosine",
    total_steps: int | None = None,
    end_step: int | None = None,
    begin_step: int = 0,
    drop_noise: float = 1e-5,
    skip_step_on_update: bool = True,
) -> MaskAlgorithm:
    """DST-EE: RigL growing by ``|g| + c * sqrt(ln t / (N + eps))`` (see the module notes: formula unverified).

    Args:
      inner: the optax optimizer whose updates are masked (a ``GradientTransformation`` or ``optax.MultiSteps``).
      sparsity: a float, a :func:`jaxsparse.budget` (e.g. ERK) or a per-leaf pytree (``None`` = dense).
      exploration: ``c``, the weight of the exploration bonus; 0 gives RigL exactly.
      eps: added to the counters under the square root (> 0).
      update_every, drop_fraction, decay, total_steps, end_step, begin_step, drop_noise, skip_step_on_update:
        as :func:`jaxsparse.rigl`.
      seed: seeds the PRNG key kept in the state (an int; may be traced under ``vmap``).

    Returns:
      The optax transformation (``dst_ee.rule``: the :class:`~jaxsparse.MaskAlgorithm`); its state's ``extra`` is
      a :class:`DSTEEState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 8))}
      >>> tx = dst_ee(optax.sgd(0.1), 0.75, update_every=2, total_steps=20)
      >>> state, step = tx.init(params), jax.jit(tx.update)
      >>> for t in range(9):
      ...     updates, state = step(jax.tree.map(jnp.cos, params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> int(state.masks["w"].sum()), int(state.extra.rounds), int(state.extra.counts["w"].sum())
      (16, 4, 64)
    """
    for name, x in (("exploration", exploration), ("eps", eps)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise TypeError(f"`{name}` must be a finite float; got {x!r}.")
    if exploration < 0:
        raise ValueError(f"`exploration` must be >= 0; got {exploration!r}.")
    if eps <= 0:
        raise ValueError(f"`eps` must be > 0; got {eps!r}.")
    base = rigl.rule(
        sparsity,
        update_every=update_every,
        drop_fraction=drop_fraction,
        decay=decay,
        total_steps=total_steps,
        end_step=end_step,
        begin_step=begin_step,
        drop_noise=drop_noise,
        skip_step_on_update=skip_step_on_update,
    )

    def init(params, key):
        masks, extra = base.init(params, key)
        counts = map_live(lambda m: jnp.zeros(m.shape, jnp.int32), masks)
        return masks, DSTEEState(extra, counts, jnp.zeros((), jnp.int32))

    def update(ctx: MaskContext):
        state = ctx.extra
        rounds = state.rounds + 1
        counts = map_live(lambda m, n: n + m.astype(jnp.int32), ctx.masks, state.counts)
        bonus_scale = exploration * jnp.sqrt(jnp.log(rounds.astype(jnp.float32)))
        acquisition = jax.tree.map(
            lambda m, g, n: (
                g
                if m is None
                else jnp.abs(g).astype(jnp.float32)
                + bonus_scale / jnp.sqrt(n.astype(jnp.float32) + eps)
            ),
            ctx.masks,
            ctx.grads,
            counts,
            is_leaf=is_none,
        )
        masks, extra = base.update(ctx._replace(grads=acquisition, extra=state.rigl))
        return masks, DSTEEState(extra, counts, rounds)

    return base._replace(init=init, update=update, observe=None)
