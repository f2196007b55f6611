"""KB > 1: the tiled kernel multiplying several kept blocks of a block row per step (tall thin tiles, 64 x 16).

The kernel runs here through Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1); speed is measured on
the GPU (benchmarks/bsr_linear.py), never here."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from superblock.kernels import _runners
from superblock.kernels import tuning as tuning_mod
from tests.helpers.kernels import run_in_interpreter

REPO = Path(__file__).resolve().parents[2]


def test_config_lists_carry_kb_and_keep_older_lists():
    packed = {"BLOCK_M": 128, "G": 1, "num_warps": 8, "num_stages": 3, "TMA": False, "KB": 4}
    assert _runners.config_to_list(packed) == [128, 1, 8, 3, 0, 0, 0, 4]
    assert _runners.config_from_list([128, 1, 8, 3, 0, 0, 0, 4]) == packed
    plain = {k: v for k, v in packed.items() if k != "KB"}
    assert _runners.config_to_list({**packed, "KB": 1}) == [128, 1, 8, 3, 0]  # KB 1 is left off: five entries
    assert _runners.config_from_list([128, 1, 8, 3, 0, 0, 0, 1]) == plain
    with pytest.raises(ValueError, match="power of two"):
        _runners.config_from_list([128, 1, 8, 3, 0, 0, 0, 3])
    with pytest.raises(ValueError, match="x-stationary"):  # the old seventh entry still says where XS went
        _runners.config_from_list([128, 1, 8, 3, 0, 0, 2, 4])


@pytest.mark.parametrize("change", [{"G": 2}, {"TMA": True}], ids=["grouped", "tma"])
def test_kb_runs_only_the_plain_tiled_kernel(change):
    values = torch.zeros(1, 64, 16)
    cfg = {"BLOCK_M": 64, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False, "KB": 2, **change}
    with pytest.raises(ValueError, match="KB > 1"):
        _runners._check_config(64, values, torch.zeros(2, 2, dtype=torch.int32), None, cfg)


def test_tall_thin_tiles_get_packed_candidates_after_the_default():
    for bh, bw, m in ((64, 16, 50432), (128, 32, 50432), (64, 16, 197)):
        cands = tuning_mod.candidate_configs(m, bh, bw, torch.bfloat16)
        packed = [c for c in cands if c.get("KB", 1) > 1]
        assert packed and "KB" not in cands[0], (bh, bw, m, cands)
        assert {c["KB"] * bw for c in packed} == {64, 128}
        for c in packed:  # what _fit promises: the pipelined tiles fit in shared memory
            assert c["num_stages"] * (c["BLOCK_M"] + bh) * bw * c["KB"] * 2 <= tuning_mod.SMEM_BYTES
    decode = tuning_mod.candidate_configs(1, 64, 16, torch.bfloat16, blocks_per_row=40.0)
    assert any(c.get("SPLIT", 0) >= 1 and c.get("KB", 1) > 1 for c in decode)  # one token: packed decode steps
    for bh, bw in ((32, 32), (64, 64), (16, 64)):  # squares and wide tiles: no packed candidates
        assert not any("KB" in c for c in tuning_mod.candidate_configs(50432, bh, bw, torch.bfloat16))


_INTERP_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from superblock.kernels import _runners, bsr_linear, dense_to_bsr

    torch.manual_seed(0)
    cases = [  # (out, in, bh, bw, KB, activation, bias): ragged in (K not a multiple of bw), blocks past a row's end
        (256, 128, 64, 16, 4, None, True), (256, 160, 64, 32, 2, "gelu", False), (256, 120, 64, 16, 4, None, True),
        (256, 256, 128, 16, 8, None, False), (256, 128, 64, 16, 2, "silu_mul", True),
    ]
    for out_f, in_f, bh, bw, kb, act, has_bias in cases:
        n_cols = -(-in_f // bw)
        keep = torch.rand(out_f // bh, n_cols) < 0.4
        keep[0] = False  # an empty block row
        w = torch.randn(out_f, n_cols * bw) * keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
        w = w[:, :in_f].contiguous()
        bias = torch.randn(out_f) if has_bias else None
        values, crow, col = dense_to_bsr(w, (bh, bw))
        x = torch.randn(37, in_f)
        cfg = {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False, "KB": kb}
        ref = _runners.activate(F.linear(x, w, bias), act)
        if act == "silu_mul":
            crow32, col32 = _runners.index32(crow, col)
            y = _runners.run_triton(x, values, crow32, col32, None, bias, out_f, act, "ieee", cfg)
        else:
            y = bsr_linear(x, values, crow, col, (out_f, in_f), bias, act, backend="triton", config=cfg)
        err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        assert err < 1e-5, (out_f, in_f, bh, bw, kb, act, err)

    # the decode kernel with packed steps: SPLIT programs per block row, each taking runs of KB blocks; MODE 2 (the
    # workspace) and MODE 1 (no workspace: a reduce kernel), few tokens, a ragged K
    from superblock.kernels import _triton_bsr

    real_ws = _triton_bsr.decode_workspace
    for out_f, in_f, bh, bw, kb, split, act, mode1 in [
        (256, 512, 64, 16, 4, 2, None, False), (256, 500, 64, 16, 4, 4, None, True),
        (256, 256, 64, 32, 2, 1, "gelu", False), (256, 512, 64, 16, 8, 2, "silu_mul", False),
    ]:
        n_cols = -(-in_f // bw)
        keep = torch.rand(out_f // bh, n_cols) < 0.5
        w = torch.randn(out_f, n_cols * bw) * keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
        w = w[:, :in_f].contiguous()
        bias = torch.randn(out_f)
        values, crow, col = dense_to_bsr(w, (bh, bw))
        crow32, col32 = _runners.index32(crow, col)
        x = torch.randn(3, in_f)
        cfg = {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False, "SPLIT": split, "KB": kb}
        _triton_bsr.decode_workspace = (lambda *a: None) if mode1 else real_ws
        try:
            y = _runners.run_triton(x, values, crow32, col32, None, bias, out_f, act, "ieee", cfg)
        finally:
            _triton_bsr.decode_workspace = real_ws
        ref = _runners.activate(F.linear(x, w, bias), act)
        err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        assert err < 1e-5, ("decode", out_f, in_f, bh, bw, kb, split, act, err)
    # a contiguous 3-D x goes through the bound launch's flat call (no 2-D views): the same products through the
    # TMA, tiled, packed and decode kernels as a 2-D x and a transposed (feature-major) one
    w = torch.randn(256, 128) * (torch.rand(4, 8) < 0.5).repeat_interleave(64, 0).repeat_interleave(16, 1)
    values, crow, col = dense_to_bsr(w, (64, 16))
    bias = torch.randn(256)
    base = {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False}
    for cfg in ({**base, "TMA": True}, base, {**base, "KB": 4}, {**base, "SPLIT": 2}):
        xs = torch.randn(6, 128)
        for x in (xs.view(2, 3, 128), xs, xs.t().contiguous().t()):
            y = bsr_linear(x, values, crow, col, (256, 128), bias, "gelu", backend="triton", config=cfg)
            ref = _runners.activate(F.linear(x, w, bias), "gelu")
            err = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            assert y.shape == ref.shape and err < 1e-5, ("flat", cfg, x.shape, x.stride(), err)
    print("packed ok")
    """
)


def test_packed_kernel_in_interpreter():
    run_in_interpreter(_INTERP_SCRIPT, expect="packed ok")
