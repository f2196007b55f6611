"""superblock: train transformers with learned block-sparse masks, export them as block-sparse weights."""

from superblock.sparsity import (
    SparsityReport,
    block_sparsity,
    fold_masks,
    get_controller,
    mask_parameters,
    sparsify,
)

__version__ = "0.1.0"

__all__ = ["SparsityReport", "block_sparsity", "fold_masks", "get_controller", "mask_parameters", "sparsify"]
