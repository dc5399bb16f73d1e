"""jaxsparse: sparse training and serving for JAX/Flax.

Pure functions on pytrees (masks, budgets, schedules, forward-time estimators) and optax transformations that keep
pruned weights exactly zero, re-exported flat here (like optax). Subpackages: ``jaxsparse.posttraining`` (Wanda,
SparseGPT, DSnoT and a layer-by-layer driver), ``jaxsparse.flax`` (sparse NNX / Linen layers on the kernels),
``jaxsparse.stats``, ``jaxsparse.lottery``, ``jaxsparse.checkpoint``.
"""

from jaxsparse import (
    _jax_version,
)  # warns at import when the installed jax is outside the tested range
from jaxsparse.allocation import DISTRIBUTIONS, budget, keep_count, prunable
from jaxsparse.estimators import (
    ANNEALING_KINDS,
    BACKWARDS,
    MASK_DECAY_KINDS,
    STRUCTURE_DECAY_KINDS,
    StructureDecay,
    annealed_masking,
    annealed_nm,
    annealed_topk,
    autosparse_threshold,
    decayed_nm,
    gradient_annealing_schedule,
    init_sste_scale,
    init_thresholds,
    mask_decay_schedule,
    nm_masks,
    soft_nm,
    ste_nm,
    structure_decay,
    structure_decayed_nm,
    transposable_nm_mask,
)
from jaxsparse.masks import (
    apply_masks,
    block_mask,
    block_scores,
    global_topk_masks,
    nm_mask,
    random_mask,
    random_scores,
    topk_mask,
    topk_masks,
)
from jaxsparse.nm_compression import (
    NMLeaf,
    compress_nm,
    decompress_nm,
    one_shot_nm,
)
from jaxsparse.oneshot import (
    leaf_sparsities,
    magnitude_masks,
    masks_from_scores,
    random_masks,
    snip_masks,
)
from jaxsparse.schedules import cosine_fraction, polynomial_sparsity, update_gate
from jaxsparse.sharding import place_like
from jaxsparse.transforms.common import MaskAlgorithm, MaskContext, SparseState, sparse_training
from jaxsparse.transforms.dst import (
    DECAYS,
    GROWTH_MODES,
    drop_fraction_schedule,
    dst_algorithm,
    granet,
    granet_algorithm,
    rigl,
    rigl_algorithm,
    set_algorithm,
    set_training,
    snfs,
    snfs_algorithm,
    sparse_evolutionary_training,
    static_sparse,
    static_sparse_algorithm,
)
from jaxsparse.transforms.nm import (
    sr_ste_decay,
)
from jaxsparse.transforms.pruning import (
    fixed_masks,
    fixed_masks_algorithm,
    gmp_algorithm,
    gradual_magnitude_pruning,
    one_shot_algorithm,
    one_shot_pruning,
)

__version__ = "0.1.0"
