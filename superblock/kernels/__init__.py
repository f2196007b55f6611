"""Block-sparse matmul for inference: a Triton kernel for CUDA, torch's BSR path, a dense reference.

y = bsr_linear(x, values, crow_indices, col_indices, (out, in), bias, activation="gelu")
layer = BlockSparseLinear.from_dense(linear, block_size=32)     # zeroed blocks dropped
layer.prepare([197, 1576])                                    # choose (tune) per token bucket now, outside traces
prepare_layers(model, [1, 8])                                 # the same for every block-sparse layer of a model
fuse_linear_gelu(model)                                       # Linear -> GELU pairs become one kernel
hand_off_feature_major(model)                                 # fc1 writes its output transposed for fc2 (eager)
choice_counts(model)                                          # {token bucket: {backend / kernel: layers}}

Which backend, kernel and call run a product is decided in one place, dispatch.py (its docstring is the table):
eager calls launch the kernel bound to the weight or call the op's kernel directly; inside torch.compile and
torch.export a product is one node: torch.ops.superblock.bsr_linear_triton (inductor launches the tiled kernel) or
the opaque torch.ops.superblock.bsr_linear (ops.py).
"""

from superblock.kernels import ops  # noqa: F401 - registers torch.ops.superblock.*
from superblock.kernels.bsr_linear import (
    BACKENDS,
    FP32_PRECISIONS,
    block_density,
    bsr_linear,
    bsr_to_dense,
    check_bsr,
    clear_caches,
    get_fp32_precision,
    set_fp32_precision,
)
from superblock.kernels.modules import (
    BlockSparseLinear,
    BlockSparseMultiheadAttention,
    choice_counts,
    dense_to_bsr,
    fuse_linear_gelu,
    hand_off_feature_major,
    prepare_layers,
)
from superblock.kernels.tuning import (
    cache_path,
    clear_tuning,
    get_tuning_target,
    load_tuning,
    set_tuning_target,
    token_bucket,
    tuning_table,
)

__all__ = [
    "BACKENDS",
    "FP32_PRECISIONS",
    "BlockSparseLinear",
    "BlockSparseMultiheadAttention",
    "block_density",
    "bsr_linear",
    "bsr_to_dense",
    "check_bsr",
    "choice_counts",
    "cache_path",
    "clear_caches",
    "clear_tuning",
    "dense_to_bsr",
    "fuse_linear_gelu",
    "get_fp32_precision",
    "get_tuning_target",
    "hand_off_feature_major",
    "load_tuning",
    "prepare_layers",
    "set_fp32_precision",
    "set_tuning_target",
    "token_bucket",
    "tuning_table",
]
