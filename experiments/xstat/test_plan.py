"""The x-stationary kernel's launch arithmetic, on the CPU: row chunks that never start past the last block row (a
chunk that did read crow out of bounds and faulted the tuner's first ViT-B run on an H200) and W rings that fit in
shared memory; and the runner's refusals, which come before any launch."""

from __future__ import annotations

import pytest
import torch

from experiments.xstat import gluon_bsr, runner


@pytest.mark.parametrize("n_rows", [1, 7, 24, 49, 72, 96, 192])
@pytest.mark.parametrize("requested", [1, 2, 3, 5, 36, 66, 100, 1000])
def test_row_chunks_cover_every_row_and_none_starts_past_the_end(n_rows, requested):
    chunks = gluon_bsr.row_chunks(n_rows, requested)
    per = -(-n_rows // chunks)  # as the kernel splits them
    starts = [c * per for c in range(chunks)]
    assert 1 <= chunks <= min(max(requested, 1), n_rows)
    assert all(s < n_rows for s in starts)  # every chunk has a row
    assert min(starts[-1] + per, n_rows) == n_rows  # and together they reach the last one


def test_row_chunks_of_the_case_that_faulted():
    assert gluon_bsr.row_chunks(72, 66) == 36


@pytest.mark.parametrize(("block_m", "k_in", "bh", "bw"), [(64, 768, 16, 16), (64, 768, 32, 32), (128, 768, 16, 16)])
def test_max_stages_is_the_deepest_ring_that_fits(block_m, k_in, bh, bw):
    stages = gluon_bsr.max_stages(block_m, k_in, bh, bw)
    assert 2 <= stages <= 64
    assert gluon_bsr.smem_bytes(block_m, k_in, bh, bw, stages) <= gluon_bsr.SMEM_BUDGET
    if stages < 64:
        assert gluon_bsr.smem_bytes(block_m, k_in, bh, bw, stages + 1) > gluon_bsr.SMEM_BUDGET
    half = gluon_bsr.max_stages(block_m, k_in, bh, bw, budget=gluon_bsr.SMEM_BUDGET // 2)
    assert half < stages


def test_max_stages_is_zero_when_x_alone_does_not_fit():
    assert gluon_bsr.max_stages(128, 3072, 16, 16) == 0


def test_no_configs_off_the_gpu():
    x = torch.randn(256, 768, dtype=torch.bfloat16)
    values = torch.randn(10, 16, 16, dtype=torch.bfloat16)
    assert runner.configs(x, values, 3072) == []


def _problem():
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    values = torch.randn(2, 16, 16, dtype=torch.bfloat16)
    crow = torch.tensor([0, 1, 2, 2, 2], dtype=torch.int32)
    col = torch.tensor([0, 3], dtype=torch.int32)
    return x, values, crow, col


def _config(**kw):
    return {"BLOCK_M": 64, "G": 1, "num_warps": 4, "num_stages": 4, "TMA": False, "XS": 1, **kw}


@pytest.mark.parametrize(
    ("activation", "config", "match"),
    [
        ("silu_mul", _config(), "activation"),
        (None, _config(G=2), "G == 1"),
        (None, _config(SPLIT=2), "G == 1"),
        ("gelu", _config(), "sm_90"),  # a CPU tensor: no GPU to run on
    ],
)
def test_run_refuses_what_the_kernel_cannot_do_with_a_clear_error(activation, config, match):
    x, values, crow, col = _problem()
    with pytest.raises(ValueError, match=match) as err:
        runner.run(x, values, crow, col, None, 64, activation, config)
    assert "x-stationary" in str(err.value)


def test_run_checks_the_output_and_returns_it_for_no_tokens():
    x, values, crow, col = _problem()
    with pytest.raises(ValueError, match="y must be"):
        runner.run(x, values, crow, col, None, 64, None, _config(), y=torch.empty(8, 32, dtype=torch.bfloat16))
    empty = runner.run(x[:0], values, crow, col, None, 64, None, _config())
    assert empty.shape == (0, 64) and empty.dtype == torch.bfloat16
