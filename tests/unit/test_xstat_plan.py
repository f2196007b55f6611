"""The x-stationary kernel's launch arithmetic, on the CPU: row chunks that never start past the last block row (a
chunk that did read crow out of bounds and faulted the tuner's first ViT-B run on an H200) and W rings that fit in
shared memory."""

from __future__ import annotations

import pytest
import torch

from superblock.kernels import _gluon_bsr
from superblock.kernels import tuning as tuning_mod


@pytest.mark.parametrize("n_rows", [1, 7, 24, 49, 72, 96, 192])
@pytest.mark.parametrize("requested", [1, 2, 3, 5, 36, 66, 100, 1000])
def test_row_chunks_cover_every_row_and_none_starts_past_the_end(n_rows, requested):
    chunks = _gluon_bsr.row_chunks(n_rows, requested)
    per = -(-n_rows // chunks)  # as the kernel splits them
    starts = [c * per for c in range(chunks)]
    assert 1 <= chunks <= min(max(requested, 1), n_rows)
    assert all(s < n_rows for s in starts)  # every chunk has a row
    assert min(starts[-1] + per, n_rows) == n_rows  # and together they reach the last one


def test_row_chunks_of_the_case_that_faulted():
    assert _gluon_bsr.row_chunks(72, 66) == 36


@pytest.mark.parametrize(("block_m", "k_in", "bh", "bw"), [(64, 768, 16, 16), (64, 768, 32, 32), (128, 768, 16, 16)])
def test_max_stages_is_the_deepest_ring_that_fits(block_m, k_in, bh, bw):
    stages = _gluon_bsr.max_stages(block_m, k_in, bh, bw)
    assert 2 <= stages <= 64
    assert _gluon_bsr.smem_bytes(block_m, k_in, bh, bw, stages) <= _gluon_bsr.SMEM_BUDGET
    if stages < 64:
        assert _gluon_bsr.smem_bytes(block_m, k_in, bh, bw, stages + 1) > _gluon_bsr.SMEM_BUDGET
    half = _gluon_bsr.max_stages(block_m, k_in, bh, bw, budget=_gluon_bsr.SMEM_BUDGET // 2)
    assert half < stages


def test_max_stages_is_zero_when_x_alone_does_not_fit():
    assert _gluon_bsr.max_stages(128, 3072, 16, 16) == 0


def test_no_xstat_candidates_off_the_gpu():
    x = torch.randn(256, 768, dtype=torch.bfloat16)
    values = torch.randn(10, 16, 16, dtype=torch.bfloat16)
    assert tuning_mod.xstat_configs(x, values, 3072) == []
