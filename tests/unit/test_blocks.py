import math

import pytest
import torch

from superblock.sparsity.blocks import (
    apply_block_mask,
    expand_blocks,
    grid_shape,
    kept_blocks,
    normalize_block_size,
    tile_norms,
    tile_sum,
)


@pytest.mark.parametrize(
    "shape,block", [((64, 96), (32, 32)), ((70, 50), (16, 32)), ((33, 17), (8, 8)), ((5, 7), (5, 7))]
)
def test_apply_mask_equals_expanded_reference(shape, block):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g)
    rows, cols = grid_shape(shape, block)
    assert (rows, cols) == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    mask = (torch.rand(rows, cols, generator=g) > 0.5).float()
    ref = w.clone()
    for r in range(rows):
        for c in range(cols):
            if mask[r, c] == 0:
                ref[r * block[0] : (r + 1) * block[0], c * block[1] : (c + 1) * block[1]] = 0
    torch.testing.assert_close(apply_block_mask(w, mask, block), ref, rtol=0, atol=0)
    assert expand_blocks(mask, shape, block).shape == shape


def test_tile_sum_and_norms_with_edge_tiles():
    w = torch.arange(1.0, 1 + 5 * 7).reshape(5, 7)
    s = tile_sum(w, (2, 3))
    assert s.shape == (3, 3)
    assert s[0, 0] == w[:2, :3].sum() and s[2, 2] == w[4:, 6:].sum()
    torch.testing.assert_close(tile_norms(w, (2, 3))[1, 2], w[2:4, 6:].norm())


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 96, 100, 2304, 1001])
@pytest.mark.parametrize("s", [0.0, 0.25, 0.5, 0.8, 0.9, 0.95, 0.999])
def test_kept_blocks_is_rounded_and_at_least_one(n, s):
    k = kept_blocks(n, s)
    assert 1 <= k <= n
    assert k == max(1, math.floor((1 - s) * n + 0.5 + 1e-9))
    assert kept_blocks(100, 0.9) == 10 and kept_blocks(10, 0.75) == 3


@pytest.mark.parametrize("bad", [0, -4, (0, 4), (4, -1), "x", (1, 2, 3), True])
def test_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size"):
        normalize_block_size(bad)


def test_block_size_forms():
    assert normalize_block_size(16) == (16, 16)
    assert normalize_block_size((16, 32)) == (16, 32)
    assert normalize_block_size([8, 4]) == (8, 4)
