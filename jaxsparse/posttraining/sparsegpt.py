"""SparseGPT (Frantar & Alistarh, 2023): OBS-style column sweep that prunes and updates the remaining weights.

Layout: a Flax Dense kernel is ``(in, out)``; the reference's ``W`` is ``(out, in)`` and its "columns" are input
features. The sweep below works on ``W = kernel.T`` and walks over input features in blocks of ``blocksize``:

* ``H`` gets dead inputs (``H_ii = 0``) set to ``H_ii = 1`` with their weights zeroed, is dampened by
  ``damp * mean(diag H)`` and ``U`` is the upper Cholesky factor of ``H^-1``.
* Unstructured: at the start of each block, score ``w^2 / U_ii^2`` and prune the lowest scores over the whole
  block (all outputs jointly). The count per block is chosen so the layer's total is exactly
  ``floor(sparsity * size)`` (the reference prunes ``int(s * block_size) + 1``-ish per block via ``<=``).
  N:M: every ``m`` inputs, per output keep the ``n`` highest scores of the *current* (already updated) weights.
* Column ``i``: ``q = w * keep``, ``err = (w - q) / U_ii``, ``W[:, i:] -= err U[i, i:]`` within the block; after
  the block, ``W[:, later] -= Err U[block, later]`` (the lazy batch update).

The block loop and the column loop are ``lax.fori_loop``s inside one jitted function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float

from jaxsparse import _validation as v
from jaxsparse.masks import topk_mask
from jaxsparse.posttraining._common import (
    check_finite,
    check_kernel,
    check_nm_fits,
    num_pruned,
    parse_sparsity,
)
from jaxsparse.posttraining.calibration import warn_if_ill_conditioned

__all__ = ["sparsegpt_prune", "sparsegpt_inverse_hessian_factor"]


def sparsegpt_inverse_hessian_factor(
    hessian: Float[ArrayLike, "d d"], damp: float = 0.01
) -> tuple[Float[Array, "d d"], Bool[Array, " d"]]:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) I)^-1`` (dead inputs fixed), and the dead mask.

    A dead input (``H_ii == 0``: the feature was always 0) gets ``H_ii = 1`` before dampening, as in the
    reference code. Computed in float32.

    Args:
      hessian: the symmetric ``(d, d)`` Hessian (``X^T X`` up to a positive factor).
      damp: the relative dampening (>= 0).

    Returns:
      ``(U, dead)``: the upper-triangular ``(d, d)`` factor with ``U^T U = H_damped^-1``, and the ``(d,)`` ``bool``
      mask of dead inputs. A Hessian that is not positive definite after dampening gives NaNs (no error).

    Example:
      >>> import jax.numpy as jnp
      >>> u, dead = sparsegpt_inverse_hessian_factor(jnp.eye(2) * 4.0, damp=0.0)
      >>> u.tolist(), dead.tolist()
      ([[0.5, 0.0], [0.0, 0.5]], [False, False])
    """
    h = jnp.asarray(hessian, jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    lower = jnp.linalg.cholesky(h)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), eye)
    h_inv = (h_inv + h_inv.T) / 2
    return jnp.triu(jnp.linalg.cholesky(h_inv).T), dead


@functools.partial(jax.jit, static_argnames=("nm", "blocksize"))
def _sparsegpt(
    weight: Array,
    hessian: Array,
    prune_counts: Array,
    damp: Array,
    nm: tuple[int, int],
    blocksize: int,
):
    out_dtype = weight.dtype
    w = weight.T.astype(jnp.float32)  # (rows = out, cols = in), as in the reference
    rows, cols = w.shape
    u, dead = sparsegpt_inverse_hessian_factor(hessian, damp)
    w = jnp.where(dead[None, :], 0.0, w)

    bs = blocksize
    nblocks = -(-cols // bs)
    padded = nblocks * bs
    pad = padded - cols
    w = jnp.pad(w, ((0, 0), (0, pad)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(
        (jnp.arange(padded) >= cols).astype(jnp.float32)
    )
    col_idx = jnp.arange(padded)
    n, m = nm

    def block(b, carry):
        w, q, keep, loss = carry
        i1 = b * bs
        w1 = lax.dynamic_slice(w, (0, i1), (rows, bs))
        u1 = lax.dynamic_slice(u, (i1, i1), (bs, bs))
        d = jnp.diag(u1)
        if m:
            keep1 = jnp.ones((rows, bs), bool)
        else:
            valid = (i1 + jnp.arange(bs)) < cols
            score = jnp.where(valid[None, :], jnp.square(w1) / jnp.square(d)[None, :], jnp.inf)
            keep1 = topk_mask(score, rows * bs - prune_counts[b])

        def column(i, c):
            w1, q1, keep1, err1, loss = c
            if m:
                grp = lax.dynamic_slice(w1, (0, i), (rows, m))
                gd = lax.dynamic_slice(d, (i,), (m,))
                gscore = jnp.square(grp) / jnp.square(gd)[None, :]
                gkeep = _keep_top_n(gscore, n)
                keep1 = jnp.where(i % m == 0, lax.dynamic_update_slice(keep1, gkeep, (0, i)), keep1)
            wi = w1[:, i]
            ki = keep1[:, i]
            qi = jnp.where(ki, wi, 0.0)
            dii = u1[i, i]
            ei = (wi - qi) / dii
            loss = loss + jnp.sum(jnp.square(wi - qi)) / dii**2 / 2
            w1 = (
                w1 - ei[:, None] * u1[i][None, :]
            )  # U is upper triangular: only columns >= i change
            q1 = q1.at[:, i].set(qi)
            err1 = err1.at[:, i].set(ei)
            return w1, q1, keep1, err1, loss

        zeros = jnp.zeros((rows, bs), jnp.float32)
        _, q1, keep1, err1, loss = lax.fori_loop(0, bs, column, (w1, zeros, keep1, zeros, loss))
        later = lax.dynamic_slice(u, (i1, 0), (bs, padded))  # rows of U for this block, all columns
        w = w - jnp.where(col_idx[None, :] >= i1 + bs, err1 @ later, 0.0)
        q = lax.dynamic_update_slice(q, q1, (0, i1))
        keep = lax.dynamic_update_slice(keep, keep1, (0, i1))
        return w, q, keep, loss

    init = (w, jnp.zeros_like(w), jnp.zeros(w.shape, bool), jnp.zeros((), jnp.float32))
    _, q, keep, loss = lax.fori_loop(0, nblocks, block, init)
    return q[:, :cols].T.astype(out_dtype), keep[:, :cols].T, loss


def _keep_top_n(score: Array, n: int) -> Array:
    """Per row, keep the ``n`` largest of the ``m`` scores (ties to the lower index)."""
    a, b = score[:, :, None], score[:, None, :]
    m = score.shape[1]
    lower = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]
    rank = jnp.sum((b > a) | ((b == a) & lower[None]), axis=-1)
    return rank < n


def sparsegpt_prune(
    weight: Float[ArrayLike, "fan_in fan_out"],
    hessian: Float[ArrayLike, "fan_in fan_in"],
    sparsity: float | tuple[int, int] = 0.5,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    num_tokens: int | None = None,
    return_loss: bool = False,
):
    """SparseGPT on one Flax ``(in, out)`` kernel; returns ``(pruned_weight, keep_mask)`` (and the OBS loss).

    ``hessian`` is ``X^T X`` of the layer's inputs up to a positive factor (see
    :func:`~jaxsparse.posttraining.calibration.hessian_from_stats`); the result does not depend on that factor.
    ``sparsity`` is a fraction in ``[0, 1)`` (exactly ``floor(sparsity * size)`` weights pruned over the layer)
    or ``(n, m)`` for N:M along the input axis (``blocksize`` must be a multiple of ``m``). ``damp`` is the
    relative dampening (``damp * mean(diag H)`` added to the diagonal). Pass ``num_tokens`` (how many calibration
    tokens built ``hessian``) to get a warning when the Hessian is singular. ``return_loss=True`` also returns
    the sweep's accumulated ``sum (w - q)^2 / U_ii^2 / 2``, which equals ``1/2 trace(dW^T H_damped dW)`` with
    ``dW`` the change of the kernel and ``H_damped`` the dampened ``hessian`` as passed (OBS identity).

    Jittable with ``sparsity``, ``blocksize`` and ``damp`` static.

    Args:
      weight: a finite float ``(in, out)`` kernel.
      hessian: the finite float ``(in, in)`` Hessian of the layer's inputs.
      sparsity: a fraction in ``[0, 1)`` or an ``(n, m)`` pair (``m`` dividing ``in`` and ``blocksize``).
      blocksize: columns (inputs) per lazy-update block (>= 1; clipped to ``in``).
      damp: the relative dampening (a float >= 0).
      num_tokens: the calibration tokens behind ``hessian``; fewer than ``in`` warns (singular Hessian).
      return_loss: also return the OBS loss.

    Returns:
      ``(pruned_weight, keep_mask)``, or ``(pruned_weight, keep_mask, loss)`` with ``return_loss``; kept weights
      are updated to compensate the pruned ones.

    Raises:
      ValueError: a bad kernel or Hessian (shape, non-finite), a bad ``sparsity``, ``in`` or ``blocksize`` not
        divisible by ``m``, ``blocksize < 1`` or ``damp < 0``.
      TypeError: a non-float kernel or Hessian, a non-int ``blocksize`` or a non-numeric ``damp``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (256, 8))
      >>> w = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
      >>> pruned, mask = sparsegpt_prune(w, x.T @ x, 0.5)
      >>> int(mask.sum()), bool(jnp.all(pruned[~mask] == 0))
      (16, True)
    """
    weight = check_kernel("weight", weight)
    check_finite(
        "hessian",
        jnp.asarray(hessian),
        "the calibration statistics X^T X (this layer's inputs) are not finite; check the "
        "calibration batches and the layers before it.",
    )
    pattern = parse_sparsity(sparsity)
    check_nm_fits("weight", weight.shape, pattern)
    blocksize = v.check_int("blocksize", blocksize, 1)
    if pattern.is_nm and blocksize % pattern.m:
        raise ValueError(
            f"`blocksize` must be a multiple of m={pattern.m} for N:M; got blocksize={blocksize}."
        )
    try:
        damp = float(damp)
    except (TypeError, ValueError):
        raise TypeError(f"`damp` must be a float >= 0; got {damp!r}.") from None
    if not damp >= 0:
        raise ValueError(f"`damp` must be a float >= 0; got {damp!r}.")
    hessian = jnp.asarray(hessian)
    v.check_float_array("hessian", hessian)
    d = weight.shape[0]
    if hessian.shape != (d, d):
        raise ValueError(
            f"`hessian` must have shape ({d}, {d}) for a kernel with in_features={d}; got shape {hessian.shape}."
        )
    if num_tokens is not None:
        warn_if_ill_conditioned(hessian, num_tokens, damp, name="sparsegpt_prune")
    bs = min(blocksize, _round_up(d, pattern.m or 1))
    # per-block prune counts floor(s*rows*end) - floor(s*rows*start): the layer total is exactly floor(s*size)
    rows, nblocks = weight.shape[1], -(-d // bs)
    cum = [0] + [num_pruned(pattern.sparsity, rows * min((b + 1) * bs, d)) for b in range(nblocks)]
    counts = jnp.asarray([cum[b + 1] - cum[b] for b in range(nblocks)], jnp.int32)
    q, keep, loss = _sparsegpt(
        weight, hessian, counts, jnp.float32(damp), (pattern.n, pattern.m), bs
    )
    return (q, keep, loss) if return_loss else (q, keep)


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k
