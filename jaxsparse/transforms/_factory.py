"""Each training algorithm is written once, as its mask rule; the optax transformation is generated from it."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import optax

from jaxsparse.transforms.common import MaskAlgorithm, sparse_training


def sparse_transform(
    rule: Callable[..., MaskAlgorithm],
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """Turn a mask-rule factory into the algorithm's optax transformation.

    ``transform(inner, *args, seed=0, **kwargs)`` is ``sparse_training(inner, rule(*args, **kwargs), seed=seed)``.
    The transformation carries the rule's name, docstring and signature (with ``inner`` first and ``seed`` last),
    and the rule itself as ``transform.rule`` for composing algorithms (GraNet is GMP's rule plus regrowth).

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
      ([-1.0, -1.0], ['inner', 'masks', 'seed'])
    """

    @functools.wraps(rule)
    def transform(
        inner: optax.GradientTransformation | optax.MultiSteps, *args, seed: int = 0, **kwargs
    ):  # inner by keyword too: optax.inject_hyperparams
        return sparse_training(inner, rule(*args, **kwargs), seed=seed)

    sig = inspect.signature(rule)
    inner = inspect.Parameter(
        "inner",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=optax.GradientTransformation | optax.MultiSteps,
    )
    seed = inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0)
    transform.__signature__ = sig.replace(
        parameters=[inner, *sig.parameters.values(), seed],
        return_annotation=optax.GradientTransformationExtraArgs,
    )
    transform.rule = rule
    return transform
