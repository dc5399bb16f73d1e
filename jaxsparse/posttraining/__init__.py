"""Post-training (one-shot) pruning: per-layer pure functions and a layer-by-layer driver for Flax models.

Per layer (Flax ``(in, out)`` kernels; N:M groups run along the input axis):
:func:`magnitude_prune_layer`, :func:`wanda_prune`, :func:`sparsegpt_prune`, :func:`dsnot_prune`, each returning
``(pruned_weight, keep_mask)``. Calibration statistics: :mod:`jaxsparse.posttraining.calibration`. Driver:
:func:`prune_nnx` and :func:`prune_linen`, with outlier-weighted layer-wise sparsity (OWL) as an option
(:mod:`jaxsparse.posttraining.owl`).
"""

from jaxsparse.posttraining.calibration import (
    ActivationStats,
    activation_mean,
    activation_sq_norms,
    activation_var,
    hessian_from_stats,
    init_activation_stats,
    update_activation_stats,
)
from jaxsparse.posttraining.driver import METHODS, PruneResult, prune_layer, prune_linen, prune_nnx
from jaxsparse.posttraining.dsnot import dsnot_prune
from jaxsparse.posttraining.magnitude import magnitude_prune_layer
from jaxsparse.posttraining.owl import OWL, outlier_ratio, owl_sparsities
from jaxsparse.posttraining.sparsegpt import sparsegpt_inverse_hessian_factor, sparsegpt_prune
from jaxsparse.posttraining.wanda import wanda_prune, wanda_scores

__all__ = [
    "ActivationStats",
    "METHODS",
    "OWL",
    "PruneResult",
    "prune_layer",
    "prune_linen",
    "prune_nnx",
    "activation_mean",
    "activation_sq_norms",
    "activation_var",
    "dsnot_prune",
    "hessian_from_stats",
    "init_activation_stats",
    "magnitude_prune_layer",
    "outlier_ratio",
    "owl_sparsities",
    "sparsegpt_inverse_hessian_factor",
    "sparsegpt_prune",
    "update_activation_stats",
    "wanda_prune",
    "wanda_scores",
]
