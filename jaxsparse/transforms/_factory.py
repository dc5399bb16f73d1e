"""Each training algorithm is written once, as its mask rule; the optax transformation is generated from it."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable

import optax

from jaxsparse.transforms.common import MaskAlgorithm, sparse_training


def sparse_transform(
    rule: Callable[..., MaskAlgorithm],
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """Turn a mask-rule factory into the algorithm's optax transformation.

    ``transform(inner, *args, seed=0, packed_masks=False, **kwargs)`` is
    ``sparse_training(inner, rule(*args, **kwargs), seed=seed, packed_masks=packed_masks)``. The transformation
    carries the rule's name, docstring and signature (``inner`` first, then the rule's arguments, then the
    keyword-only ``seed`` and ``packed_masks``; the docstring's ``seed`` entry is followed by one for
    ``packed_masks``), and the rule itself as ``transform.rule`` for composing algorithms (GraNet is GMP's rule
    plus regrowth).

    Args:
      rule: a function of the algorithm's hyperparameters returning a
        :class:`~jaxsparse.transforms.common.MaskAlgorithm`; its docstring documents the transformation.

    Returns:
      The transformation factory.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxsparse.transforms.common import MaskAlgorithm
      >>> def frozen(masks):
      ...     return MaskAlgorithm(
      ...         init=lambda params, key: (masks, ()),
      ...         update=lambda ctx: (ctx.masks, ctx.extra),
      ...         is_update=lambda step: jnp.zeros((), bool),
      ...     )
      >>> frozen = sparse_transform(frozen)
      >>> tx = frozen(optax.sgd(1.0), {"w": jnp.array([True, False])})
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
      >>> updates["w"].tolist(), list(inspect.signature(frozen).parameters)
      ([-1.0, -1.0], ['inner', 'masks', 'seed', 'packed_masks'])
    """

    @functools.wraps(rule)
    def transform(
        inner: optax.GradientTransformation | optax.MultiSteps,
        *args,
        seed: int = 0,
        packed_masks: bool = False,
        **kwargs,
    ):  # inner by keyword too: optax.inject_hyperparams
        return sparse_training(inner, rule(*args, **kwargs), seed=seed, packed_masks=packed_masks)

    sig = inspect.signature(rule)
    inner = inspect.Parameter(
        "inner",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=optax.GradientTransformation | optax.MultiSteps,
    )
    seed = inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0)
    packed = inspect.Parameter(
        "packed_masks", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool
    )
    transform.__signature__ = sig.replace(
        parameters=[inner, *sig.parameters.values(), seed, packed],
        return_annotation=optax.GradientTransformationExtraArgs,
    )
    transform.__doc__ = document_packed_masks(rule.__doc__)
    transform.rule = rule
    return transform


PACKED_MASKS_ENTRY = (
    "packed_masks: store the masks 1 bit per weight instead of 1 byte (bit-identical training;",
    "  read them with :func:`jaxsparse.state_masks`; see :func:`jaxsparse.sparse_training`).",
)


def document_packed_masks(doc: str | None) -> str | None:
    """``doc`` with the ``packed_masks`` entry after its ``seed:`` entry (unchanged when it has none)."""
    if doc is None:
        return None
    match = re.search(r"^([ \t]+)seed:.*\n(?:\1[ \t]+\S.*\n)*", doc, re.MULTILINE)
    if match is None:
        return doc
    entry = "".join(f"{match.group(1)}{line}\n" for line in PACKED_MASKS_ENTRY)
    return f"{doc[: match.end()]}{entry}{doc[match.end() :]}"
