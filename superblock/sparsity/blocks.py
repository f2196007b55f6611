"""Block geometry: tiling a 2-D weight, expanding a per-tile mask, summing per tile.

Edge tiles are allowed: a weight of shape (out, in) cut into (bh, bw) tiles has ceil(out/bh) x ceil(in/bw) tiles,
the last row/column of tiles being smaller. Divisible shapes take a zero-copy view path.
"""

from __future__ import annotations

import math

import torch

BlockSize = tuple[int, int]


def normalize_block_size(block_size: int | tuple[int, int] | list[int]) -> BlockSize:
    """Return (rows, cols) from an int or a pair; ValueError on anything else or on non-positive sizes."""
    if isinstance(block_size, bool):
        raise ValueError(f"block_size must be an int or (rows, cols), got {block_size!r}")
    if isinstance(block_size, int):
        bh = bw = block_size
    else:
        try:
            bh, bw = (int(v) for v in block_size)
        except (TypeError, ValueError):
            raise ValueError(f"block_size must be an int or (rows, cols), got {block_size!r}") from None
    if bh <= 0 or bw <= 0:
        raise ValueError(f"block_size must be positive, got {(bh, bw)}: use e.g. block_size=32 or (16, 32)")
    return bh, bw


def grid_shape(shape: tuple[int, int] | torch.Size, block: BlockSize) -> tuple[int, int]:
    """Number of tiles along each dimension (edge tiles included)."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def expand_blocks(mask: torch.Tensor, shape: tuple[int, int] | torch.Size, block: BlockSize) -> torch.Tensor:
    """Expand a per-tile mask [R, C] to a full [out, in] mask (materialized; used on the rare ragged path)."""
    bh, bw = block
    return mask.repeat_interleave(bh, 0)[: shape[0]].repeat_interleave(bw, 1)[:, : shape[1]]


def is_divisible(shape: tuple[int, int] | torch.Size, block: BlockSize) -> bool:
    return shape[0] % block[0] == 0 and shape[1] % block[1] == 0


def apply_block_mask(weight: torch.Tensor, mask: torch.Tensor, block: BlockSize) -> torch.Tensor:
    """weight * (mask expanded to tiles), without materializing the expanded mask when tiles divide the weight."""
    out_f, in_f = weight.shape
    bh, bw = block
    mask = mask.to(weight.dtype)
    if is_divisible(weight.shape, block):
        tiled = weight.reshape(out_f // bh, bh, in_f // bw, bw)
        return (tiled * mask[:, None, :, None]).reshape(out_f, in_f)
    return weight * expand_blocks(mask, weight.shape, block)


def tile_sum(values: torch.Tensor, block: BlockSize) -> torch.Tensor:
    """Sum a [out, in] tensor over each tile -> [R, C]; edge tiles sum over their smaller extent."""
    out_f, in_f = values.shape
    bh, bw = block
    rows, cols = grid_shape(values.shape, block)
    pad_r, pad_c = rows * bh - out_f, cols * bw - in_f
    if pad_r or pad_c:
        values = torch.nn.functional.pad(values, (0, pad_c, 0, pad_r))
    return values.reshape(rows, bh, cols, bw).sum(dim=(1, 3))


def tile_norms(weight: torch.Tensor, block: BlockSize) -> torch.Tensor:
    """L2 norm of every tile of a weight -> [R, C] (magnitude score init, magnitude pruning)."""
    return tile_sum(weight.detach().float().pow(2), block).sqrt()


def kept_blocks(n_blocks: int, sparsity: float) -> int:
    """Number of tiles kept at a sparsity: round-half-up((1 - s) * n), at least 1.

    Computed on the host from Python numbers, so choosing k never syncs with the GPU. The small epsilon absorbs
    float error such as (1 - 0.9) * 100 = 9.999999999999998.
    """
    return max(1, min(n_blocks, math.floor((1.0 - sparsity) * n_blocks + 0.5 + 1e-9)))
