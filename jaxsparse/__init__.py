"""jaxsparse: sparse training and serving for JAX/Flax.

Pure functions on pytrees (masks, budgets, schedules, statistics) and optax transformations that keep pruned
weights exactly zero, all re-exported flat here (like optax).
"""

from jaxsparse.allocation import DISTRIBUTIONS, budget, keep_count, prunable
from jaxsparse.masks import (
    apply_masks,
    block_mask,
    block_scores,
    global_topk_masks,
    nm_mask,
    random_mask,
    topk_mask,
    topk_masks,
)
from jaxsparse.oneshot import leaf_sparsities, magnitude_masks, masks_from_scores, random_masks, snip_masks
from jaxsparse.schedules import cosine_fraction, polynomial_sparsity, update_gate
from jaxsparse.sharding import place_like
from jaxsparse.transforms.common import MaskAlgorithm, MaskContext, SparseState, sparse_training
from jaxsparse.transforms.pruning import (
    fixed_masks,
    fixed_masks_algorithm,
    gmp_algorithm,
    gradual_magnitude_pruning,
    one_shot_algorithm,
    one_shot_pruning,
)

__version__ = "0.1.0"
