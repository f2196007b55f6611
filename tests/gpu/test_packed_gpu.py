"""GPU tests of the packed steps (KB kept blocks per step) of the tiled and decode kernels, for tall thin tiles,
against a float64 reference; and that `auto` measures them.

Run on a CUDA machine: python -m pytest -m gpu tests/gpu/test_packed_gpu.py
Every output is poisoned with NaN before the kernel runs, so an unwritten element fails the test.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from superblock.kernels import _runners, bsr_linear, dense_to_bsr  # noqa: E402
from superblock.kernels import tuning as tuning_mod  # noqa: E402
from tests.helpers.kernels import random_block_sparse, reference, rel_err  # noqa: E402


def random_weight(out_f, in_f, tile, density, dtype, seed):
    return random_block_sparse(out_f, in_f, tile, density, dtype, seed).to("cuda")


def check(y, ref, tol, what):
    err = rel_err(y, ref)
    assert err < tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


DTYPES = {"bf16": (torch.bfloat16, 1e-2), "fp16": (torch.float16, 2e-3)}
# (out, in, tile, KB): ragged token counts below; in_f not a multiple of 128; rows with fewer kept blocks than KB
SHAPES = [(960, 720, (64, 16), 4), (960, 720, (64, 16), 8), (768, 544, (64, 32), 2), (1024, 608, (128, 32), 4)]


@pytest.mark.parametrize("dtype_name", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
@pytest.mark.parametrize(("out_f", "in_f", "tile", "kb"), SHAPES)
def test_packed_tiled_kernel_matches_the_reference(dtype_name, out_f, in_f, tile, kb):
    dtype, tol = DTYPES[dtype_name]
    w = random_weight(out_f, in_f, tile, 0.2, dtype, seed=kb)
    bias = torch.randn(out_f, device="cuda").to(dtype)
    values, crow, col = dense_to_bsr(w, tile)
    for m, act in ((1, None), (197, "gelu"), (1000, None)):
        x = torch.randn(m, in_f, device="cuda").to(dtype)
        cfg = {"BLOCK_M": 64 if m < 512 else 128, "G": 1, "num_warps": 4, "num_stages": 3, "TMA": False, "KB": kb}
        out = torch.full((m, out_f), float("nan"), device="cuda", dtype=dtype)
        y = bsr_linear(x, values, crow, col, (out_f, in_f), bias, act, backend="triton", config=cfg, out=out)
        check(y, reference(x, w, bias, act), tol, f"{tile} KB={kb} M={m} {act}")


@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize(("out_f", "in_f", "tile", "kb"), SHAPES[:3])
def test_packed_decode_kernel_matches_the_reference(split, out_f, in_f, tile, kb):
    dtype, tol = DTYPES["bf16"]
    w = random_weight(out_f, in_f, tile, 0.2, dtype, seed=kb)
    bias = torch.randn(out_f, device="cuda").to(dtype)
    values, crow, col = dense_to_bsr(w, tile)
    crow32, col32 = _runners.index32(crow, col)
    for m in (1, 5):
        x = torch.randn(m, in_f, device="cuda").to(dtype)
        cfg = {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False, "SPLIT": split, "KB": kb}
        out = torch.full((m, out_f), float("nan"), device="cuda", dtype=dtype)
        _runners.run_triton(x, values, crow32, col32, None, bias, out_f, None, "ieee", cfg, out)
        check(out, reference(x, w, bias), tol, f"decode {tile} KB={kb} SPLIT={split} M={m}")


def test_auto_measures_packed_candidates_for_tall_thin_tiles(tmp_path, monkeypatch):
    """auto's candidates for a 64 x 16 tile include packed steps (KB > 1); each computes the product, and auto's
    pick (whichever wins: measure keeps only the best Triton time) does too."""
    monkeypatch.setenv("SUPERBLOCK_CACHE_DIR", str(tmp_path))
    tuning_mod.clear_tuning()
    w = random_weight(3072, 768, (64, 16), 0.1, torch.bfloat16, seed=3)
    values, crow, col = dense_to_bsr(w, (64, 16))
    x = torch.randn(4096, 768, device="cuda").to(torch.bfloat16)
    ref = reference(x, w)
    per_row = values.shape[0] / (crow.numel() - 1)
    candidates = tuning_mod.candidate_configs(x.shape[0], 64, 16, x.dtype, "ieee", "eager", per_row)
    packed = [c for c in candidates if c.get("KB", 1) > 1]
    assert packed, f"no packed candidate among {candidates}"
    for cfg in packed:
        check(bsr_linear(x, values, crow, col, (3072, 768), config=cfg), ref, 1e-2, f"packed candidate {cfg}")
    times, entry = tuning_mod.measure((x, values, crow, col, (3072, 768), None, None), "ieee")
    assert "dense" in times and any(label.startswith("triton:") for label in times)
    y = bsr_linear(x, values, crow, col, (3072, 768))
    check(y, ref, 1e-2, f"auto ({entry['backend']} {entry.get('config')})")
    tuning_mod.clear_tuning()
