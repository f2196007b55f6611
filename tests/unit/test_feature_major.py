"""Feature-major x and y: the tiled and TMA kernels read x and write y as transposed views ([M, C] stored as
[C, M]) without a copy, so a thin tile's 16 columns of x are 16 runs of tokens rather than M runs of 16 features.

The kernels run here through Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1); whether the layout
is faster is measured on the GPU (benchmarks/bsr_linear.py --x-layout feature_major), never here."""

from __future__ import annotations

import textwrap

import pytest
import torch

from superblock.kernels import _runners, _triton_bsr, bsr_linear, dense_to_bsr
from tests.helpers.kernels import run_in_interpreter


def test_layouts_are_told_apart_and_only_others_are_copied():
    x = torch.randn(8, 32)
    assert not _triton_bsr.feature_major(x) and _runners.kernel_layout(x) is x
    xt = torch.randn(32, 8).t()  # [8, 32] stored as [32, 8]
    assert _triton_bsr.feature_major(xt) and _runners.kernel_layout(xt) is xt
    one = torch.randn(32, 1).t()  # one token: token-major whatever its strides say
    assert not _triton_bsr.feature_major(one)
    strided = torch.randn(8, 64)[:, ::2]  # neither: copied to token-major
    kept = _runners.kernel_layout(strided)
    assert kept is not strided and kept.is_contiguous() and torch.equal(kept, strided)


def test_hand_off_marks_layers_that_feed_layers_and_leaves_dense_calls_alone():
    from torch import nn

    from superblock.kernels import BlockSparseLinear, hand_off_feature_major

    def bsl(out_f, in_f):
        w = torch.randn(out_f, in_f) * (torch.rand(out_f, in_f) < 0.5)
        return BlockSparseLinear.from_dense(w, None, (16, 16), backend="dense")

    seq = nn.Sequential(bsl(64, 32), nn.Identity(), nn.Dropout(0.1), bsl(32, 64), nn.LayerNorm(32), bsl(16, 32))

    class TimmMlp(nn.Module):  # timm's Mlp after fuse_linear_gelu: fc1, act (Identity), fc2
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = bsl(64, 32), nn.Identity(), bsl(32, 64)

    timm = TimmMlp()
    assert hand_off_feature_major(nn.ModuleList([seq, timm])) == 2
    assert [m.out_layout for m in (seq[0], seq[3], seq[5], timm.fc1, timm.fc2)] == [
        "feature",
        "token",
        "token",
        "feature",
        "token",
    ]  # fmt: skip  (a LayerNorm between two layers ends the hand-off)
    with torch.no_grad():  # a dense choice ignores the layout: F.linear's output as it is
        assert seq[0](torch.randn(8, 32)).is_contiguous()


def test_out_may_be_feature_major_but_not_any_layout():
    w = torch.randn(64, 32) * (torch.rand(64, 32) < 0.5)
    values, crow, col = dense_to_bsr(w, (16, 16))
    x = torch.randn(8, 32)
    out = torch.empty(64, 8).t()
    y = bsr_linear(x, values, crow, col, (64, 32), backend="torch", out=out)
    assert y is out and torch.allclose(out, x @ w.t(), atol=1e-5)
    with pytest.raises(ValueError, match="feature-major"):
        bsr_linear(x, values, crow, col, (64, 32), backend="torch", out=torch.empty(8, 128)[:, ::2])


_INTERP_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from superblock.kernels import BlockSparseLinear, _runners, _triton_bsr, bsr_linear, dense_to_bsr

    torch.manual_seed(0)

    def weight(out_f, in_f, bh, bw):
        n_cols = -(-in_f // bw)
        keep = torch.rand(out_f // bh, n_cols) < 0.4
        keep[0] = False  # an empty block row
        w = torch.randn(out_f, n_cols * bw) * keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
        return w[:, :in_f].contiguous()

    def layouts(m, in_f, out_f, dtype):
        x = torch.randn(m, in_f).to(dtype)
        for x_t in (False, True):
            for y_t in (False, True):
                xx = x.t().contiguous().t() if x_t else x
                out = torch.empty(out_f, m, dtype=dtype).t() if y_t else torch.empty(m, out_f, dtype=dtype)
                assert _triton_bsr.feature_major(xx) == x_t and _triton_bsr.feature_major(out) == y_t
                yield x, xx, out, (x_t, y_t)

    base = {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False}
    cases = [  # (out, in, bh, bw, config change, activation, bias, dtype): ragged K, grouped, packed, TMA
        (256, 128, 64, 16, {}, None, True, torch.float32),
        (256, 120, 64, 16, {}, "gelu", False, torch.float32),
        (192, 96, 32, 32, {"G": 2}, None, True, torch.float32),
        (256, 128, 64, 16, {"KB": 4}, None, True, torch.float32),
        (256, 128, 64, 16, {"TMA": True}, "gelu", True, torch.float32),
        (256, 128, 64, 32, {"TMA": True}, None, False, torch.bfloat16),
        (256, 128, 64, 16, {"SPLIT": 2}, None, True, torch.float32),
    ]
    for out_f, in_f, bh, bw, change, act, has_bias, dtype in cases:
        w = weight(out_f, in_f, bh, bw)
        bias = torch.randn(out_f) if has_bias else None
        values, crow, col = dense_to_bsr(w, (bh, bw))
        cfg = {**base, **change}
        if cfg["G"] > 1:
            crow_g, col_g, gidx = _runners.layout_for(crow, col, cfg["G"])
        m = 3 if cfg.get("SPLIT") else 40  # 40: a ragged last token tile, TMA-aligned strides (40 x 2 bytes)
        for x, xx, out, tag in layouts(m, in_f, out_f, dtype):
            ref = _runners.activate(F.linear(x.float(), w, bias), act)
            wv, b = values.to(dtype), None if bias is None else bias.to(dtype)
            if cfg["G"] > 1:
                y = _runners.run_triton(xx, wv, crow_g, col_g, gidx, b, out_f, act, "ieee", cfg, y=out)
            else:
                y = bsr_linear(xx, wv, crow, col, (out_f, in_f), b, act, backend="triton", config=cfg, out=out)
            assert y is out or y.data_ptr() == out.data_ptr()
            err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert err < tol, (out_f, in_f, bh, bw, change, act, tag, err)
            if cfg["TMA"]:  # the TMA kernel took the layout as it is (no fallback to the plain kernel)
                assert _triton_bsr.tma_ok(xx, out, wv)

    # a module pair fc1 -> fc2: fc1 writes its output feature-major, fc2 reads it as it is
    w1, w2 = weight(256, 128, 64, 16), weight(128, 256, 64, 16)
    fc1 = BlockSparseLinear.from_dense(w1, None, (64, 16), activation="gelu", backend="triton")
    fc2 = BlockSparseLinear.from_dense(w2, None, (64, 16), backend="triton")
    x = torch.randn(40, 128)
    h = torch.empty(256, 40).t()
    fc1_out = bsr_linear(x, fc1.values, fc1.crow_indices, fc1.col_indices, (256, 128), None, "gelu", backend="triton",
                         config=base, out=h)
    y = bsr_linear(fc1_out, fc2.values, fc2.crow_indices, fc2.col_indices, (128, 256), backend="triton", config=base)
    ref = F.linear(F.gelu(F.linear(x, w1)), w2)
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5
    # the same pair as modules: hand_off_feature_major makes fc1 write feature-major for fc2 (eager, bound launch)
    from torch import nn
    from superblock.kernels import hand_off_feature_major

    mlp = nn.Sequential(fc1, nn.Identity(), nn.Dropout(0.0), fc2).eval()
    for m in (fc1, fc2):
        m.dispatch[64] = {"backend": "triton", "config": base, "precision": "ieee"}
    assert hand_off_feature_major(mlp) == 1 and fc1.out_layout == "feature" and fc2.out_layout == "token"
    seen = []
    fc1.register_forward_hook(lambda _m, _i, out: seen.append(_triton_bsr.feature_major(out.reshape(-1, 256))))
    x3 = torch.randn(2, 20, 128)
    with torch.no_grad():
        y3 = mlp(x3)
    ref3 = F.linear(F.gelu(F.linear(x3, w1)), w2)
    assert seen == [True] and y3.shape == (2, 20, 128) and ((y3 - ref3).abs().max() / ref3.abs().max()).item() < 1e-5
    print("feature-major ok")
    """
)


def test_feature_major_x_and_y_in_interpreter():
    run_in_interpreter(_INTERP_SCRIPT, expect="feature-major ok", timeout=900)


def test_the_benchmark_times_both_layouts():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import bsr_linear as bench

    args = bench.parse_args(["--layers", "vitb_fc2", "--blocks", "64x16", "--sparsity", "0.9", "--modes", "bf16",
                             "--batches", "1", "--x-layouts", "token,feature"])  # fmt: skip
    cases = bench.build_cases(args)
    assert [c["x_layout"] for c in cases] == ["token", "feature"]
    token, feature = (bench.make_tensors(c, torch.device("cpu"))["xs"][0] for c in cases)
    assert token.shape == feature.shape == (197, 3072)
    assert not _triton_bsr.feature_major(token) and _triton_bsr.feature_major(feature)
    assert torch.equal(bench._layout(token, "feature"), token)  # the same values, stored transposed
    with pytest.raises(SystemExit, match="token and/or feature"):
        bench.build_cases(bench.parse_args(["--x-layouts", "rows"]))
    row = {"layer": "vitb_fc2", "N": 768, "K": 3072, "block": "64x16", "sparsity": 0.9, "mode": "bf16", "tokens": 197,
           "x_layout": "feature", "dense_ms": 1.0, "torch_ms": 1.0, "ours_ms": 0.5, "bound_x": 3.0}  # fmt: skip
    assert "| 64x16 xT |" in bench.markdown([row])
