"""superblock: train transformers with learned block-sparse masks, export them as block-sparse weights."""

from superblock.sparsity import (
    SparsityReport,
    block_sparsity,
    fold_masks,
    get_controller,
    mask_parameters,
    refresh_masks,
    sparsify,
)
from superblock.version import __version__ as __version__  # the facade re-exports it

__all__ = [
    "SparsityReport",
    "block_sparsity",
    "fold_masks",
    "get_controller",
    "load_sparse",
    "mask_parameters",
    "refresh_masks",
    "sparsify",
]


def __getattr__(name: str) -> object:
    # load_sparse pulls in the kernels (and Triton where installed): imported on first use, not with the package.
    if name == "load_sparse":
        from superblock.export import load_sparse

        return load_sparse
    raise AttributeError(f"module 'superblock' has no attribute {name!r}")
