"""Shared test and benchmark helpers: tolerance rule, input factories, fp64 oracles."""

from .inputs import LATENT_GRIDS, TEST_GRIDS, empty_poisoned, make_cache, make_qkv, make_tensor, poison_
from .oracle import (
    attention_lowp,
    attention_oracle,
    block_scores_oracle,
    bsa_token_mask,
    check_selection,
    pooled_oracle,
    prefix_mask,
    rms_norm_oracle,
    rope_oracle,
    selection_oracle,
    token_block_ids,
)
from .tolerance import FLOORS, assert_close, check_close, floor_for, max_abs, rel_l2

__all__ = [
    "LATENT_GRIDS",
    "TEST_GRIDS",
    "empty_poisoned",
    "make_cache",
    "make_qkv",
    "make_tensor",
    "poison_",
    "attention_lowp",
    "attention_oracle",
    "block_scores_oracle",
    "bsa_token_mask",
    "check_selection",
    "pooled_oracle",
    "prefix_mask",
    "rms_norm_oracle",
    "rope_oracle",
    "selection_oracle",
    "token_block_ids",
    "FLOORS",
    "assert_close",
    "check_close",
    "floor_for",
    "max_abs",
    "rel_l2",
]
