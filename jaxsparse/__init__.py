"""jaxsparse: sparse training and serving for JAX/Flax.

Pure functions on pytrees (masks, budgets, schedules, forward-time estimators) and optax transformations that keep
pruned weights exactly zero, re-exported flat here (like optax): every name in ``__all__`` is
``jaxsparse.<name>``. Subpackages: ``jaxsparse.posttraining`` (Wanda, SparseGPT, DSnoT and a layer-by-layer driver)
and ``jaxsparse.flax`` (sparse NNX / Linen layers on the kernels, conversion). The modules ``jaxsparse.stats``,
``jaxsparse.lottery`` and ``jaxsparse.checkpoint`` are attributes too, and their functions are flat here.
"""

from jaxsparse import (
    _jax_version,  # noqa: F401  (warns at import when jax is outside the tested range)
    checkpoint,
    lottery,
    stats,
)
from jaxsparse._deprecations import module_getattr as _module_getattr
from jaxsparse._launch import distributed_initialize
from jaxsparse.allocation import (
    DISTRIBUTIONS,
    Budget,
    budget,
    keep_count,
    layer_axes,
    leaf_paths,
    overall_sparsity,
    prunable,
)
from jaxsparse.estimators import (
    BACKWARDS,
    STRUCTURE_DECAY_KINDS,
    StructureDecay,
    annealed_masking,
    annealed_nm,
    annealed_topk,
    autosparse_threshold,
    decayed_nm,
    init_sste_scale,
    init_thresholds,
    nm_masks,
    soft_nm,
    ste_nm,
    structure_decay,
    structure_decayed_nm,
    transposable_nm_mask,
)
from jaxsparse.lottery import imp_masks
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
from jaxsparse.nm_compression import NMLeaf, compress_nm, decompress_nm, one_shot_nm
from jaxsparse.oneshot import (
    leaf_sparsities,
    magnitude_masks,
    masks_from_scores,
    random_masks,
    snip_masks,
)
from jaxsparse.pruning_at_init import grasp_masks, synflow_masks
from jaxsparse.schedules import (
    ANNEALING_KINDS,
    DECAYS,
    MASK_DECAY_KINDS,
    drop_fraction_schedule,
    gradient_annealing_schedule,
    mask_decay_schedule,
    polynomial_sparsity,
    update_gate,
)
from jaxsparse.sharding import place_like
from jaxsparse.stats import flops, global_sparsity, sparsity_summary
from jaxsparse.transforms.acdc import acdc, acdc_phases
from jaxsparse.transforms.chase import CHANNEL_SCORES, ChaseState, chase, chase_compact
from jaxsparse.transforms.common import (
    MaskAlgorithm,
    MaskContext,
    SparseState,
    sparse_training,
    state_masks,
)
from jaxsparse.transforms.dst import (
    GROWTH_MODES,
    SNFSState,
    _drop_and_grow_rule,
    granet,
    rigl,
    set_training,
    snfs,
    static_sparse,
)
from jaxsparse.transforms.dst_ee import DSTEEState, dst_ee
from jaxsparse.transforms.gsm import global_sparse_momentum
from jaxsparse.transforms.movement import (
    MOVEMENT_METHODS,
    init_movement_scores,
    movement_masked,
    movement_masks,
    movement_regularizer,
    movement_schedule,
)
from jaxsparse.transforms.nm import sr_ste_decay
from jaxsparse.transforms.pruning import fixed_masks, gradual_magnitude_pruning, one_shot_pruning
from jaxsparse.transforms.soups import (
    SOUPS,
    SoupResult,
    greedy_soup,
    soup,
    sparse_model_soups,
    swa_update,
)
from jaxsparse.transforms.srigl import (
    ConstantFanIn,
    SRigLState,
    constant_fan_in,
    fan_in_matmul,
    srigl,
)

__version__ = "0.2.0.dev0"

__all__ = [
    # leaf selection and budgets
    "DISTRIBUTIONS",
    "Budget",
    "budget",
    "keep_count",
    "layer_axes",
    "overall_sparsity",
    "leaf_paths",
    "prunable",
    "leaf_sparsities",
    # masks
    "apply_masks",
    "block_mask",
    "block_scores",
    "global_topk_masks",
    "magnitude_masks",
    "masks_from_scores",
    "nm_mask",
    "nm_masks",
    "random_mask",
    "random_masks",
    "random_scores",
    "snip_masks",
    "topk_mask",
    "topk_masks",
    "transposable_nm_mask",
    "place_like",
    # schedules and gates
    "ANNEALING_KINDS",
    "DECAYS",
    "MASK_DECAY_KINDS",
    "drop_fraction_schedule",
    "gradient_annealing_schedule",
    "mask_decay_schedule",
    "polynomial_sparsity",
    "update_gate",
    # training transformations
    "MaskAlgorithm",
    "MaskContext",
    "SparseState",
    "sparse_training",
    "state_masks",
    "fixed_masks",
    "one_shot_pruning",
    "gradual_magnitude_pruning",
    "GROWTH_MODES",
    "SNFSState",
    "static_sparse",
    "set_training",
    "rigl",
    "snfs",
    "granet",
    "sr_ste_decay",
    # second wave: structured DST, alternating, soups, movement, GSM, pruning at init
    "srigl",
    "SRigLState",
    "ConstantFanIn",
    "constant_fan_in",
    "fan_in_matmul",
    "acdc",
    "acdc_phases",
    "chase",
    "ChaseState",
    "chase_compact",
    "CHANNEL_SCORES",
    "dst_ee",
    "DSTEEState",
    "global_sparse_momentum",
    "MOVEMENT_METHODS",
    "init_movement_scores",
    "movement_masked",
    "movement_masks",
    "movement_regularizer",
    "movement_schedule",
    "SOUPS",
    "SoupResult",
    "soup",
    "greedy_soup",
    "swa_update",
    "sparse_model_soups",
    "grasp_masks",
    "synflow_masks",
    # forward-time estimators
    "BACKWARDS",
    "STRUCTURE_DECAY_KINDS",
    "StructureDecay",
    "annealed_masking",
    "annealed_nm",
    "annealed_topk",
    "autosparse_threshold",
    "decayed_nm",
    "init_sste_scale",
    "init_thresholds",
    "soft_nm",
    "ste_nm",
    "structure_decay",
    "structure_decayed_nm",
    # N:M compression
    "NMLeaf",
    "compress_nm",
    "decompress_nm",
    "one_shot_nm",
    # lottery tickets, statistics, checkpoints
    "imp_masks",
    "flops",
    "global_sparsity",
    "sparsity_summary",
    "checkpoint",
    "lottery",
    "stats",
    # multi-host
    "distributed_initialize",
]

__getattr__ = _module_getattr(
    __name__,
    {
        "sparse_evolutionary_training": ("jaxsparse.set_training", set_training),
        "cosine_fraction": (
            "jaxsparse.drop_fraction_schedule(fraction, end_step, 'cosine')",
            lambda initial_fraction, end_step: drop_fraction_schedule(
                initial_fraction, end_step, "cosine"
            ),
        ),
        "dst_algorithm": (
            "jaxsparse.rigl.rule / set_training.rule / snfs.rule",
            _drop_and_grow_rule,
        ),
        "static_sparse_algorithm": ("jaxsparse.static_sparse.rule", static_sparse.rule),
        "set_algorithm": ("jaxsparse.set_training.rule", set_training.rule),
        "rigl_algorithm": ("jaxsparse.rigl.rule", rigl.rule),
        "snfs_algorithm": ("jaxsparse.snfs.rule", snfs.rule),
        "granet_algorithm": ("jaxsparse.granet.rule", granet.rule),
        "fixed_masks_algorithm": ("jaxsparse.fixed_masks.rule", fixed_masks.rule),
        "one_shot_algorithm": ("jaxsparse.one_shot_pruning.rule", one_shot_pruning.rule),
        "gmp_algorithm": (
            "jaxsparse.gradual_magnitude_pruning.rule",
            gradual_magnitude_pruning.rule,
        ),
    },
)
