"""jaxsparse: sparse training and serving for JAX/Flax."""

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
