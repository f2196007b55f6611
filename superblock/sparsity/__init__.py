"""Learned block masks: tiles of every targeted weight, top-k by trainable score, straight-through gradients."""

from superblock.sparsity.api import (
    CONTROLLER_ATTR,
    SparsityReport,
    block_sparsity,
    fold_masks,
    get_controller,
    iter_block_masks,
    mask_parameters,
    refresh_masks,
    sparsify,
)
from superblock.sparsity.blocks import kept_blocks, normalize_block_size
from superblock.sparsity.calibrate import calibrate_scores
from superblock.sparsity.controller import SparsityController
from superblock.sparsity.mask import BlockMask
from superblock.sparsity.reconstruct import Reconstruction, reconstruct_weights
from superblock.sparsity.schedule import SparsitySchedule
from superblock.sparsity.targets import PRESETS, linear_weights, select_targets

__all__ = [
    "CONTROLLER_ATTR",
    "PRESETS",
    "BlockMask",
    "Reconstruction",
    "SparsityController",
    "SparsityReport",
    "SparsitySchedule",
    "block_sparsity",
    "calibrate_scores",
    "fold_masks",
    "get_controller",
    "iter_block_masks",
    "kept_blocks",
    "linear_weights",
    "mask_parameters",
    "normalize_block_size",
    "reconstruct_weights",
    "refresh_masks",
    "select_targets",
    "sparsify",
]
