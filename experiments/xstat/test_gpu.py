"""GPU tests of the x-stationary Gluon kernel (sm_90, config XS >= 1; runner.run) against a float64 masked-dense
reference, on awkward problems: output dims that are not block multiples, empty block rows, one kept block, token
counts that are not tile multiples. Outputs are poisoned with NaN first, so an unwritten tile fails. Quick: ~20 s on
an H200. Under compute-sanitizer: experiments/xstat/README.md."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU"
    ),
]

from experiments.xstat import gluon_bsr, runner  # noqa: E402
from superblock.kernels import dense_to_bsr  # noqa: E402


def sparse_weight(out_f, in_f, block, density, seed, *, empty_rows=True, only_one=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bh, bw = block
    rows, cols = -(-out_f // bh), -(-in_f // bw)
    keep = torch.rand(rows, cols, generator=g, device="cuda") < density
    if only_one:
        keep.zero_()
        keep[rows // 2, cols - 1] = True
    elif empty_rows:
        keep[::3] = False
        keep[1, 0] = True
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:out_f, :in_f]
    w = torch.randn(out_f, in_f, generator=g, device="cuda") * mask / (in_f * density) ** 0.5
    return w.to(torch.bfloat16)


def reference(x, w, bias, activation):
    y = x.double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    return F.gelu(y) if activation == "gelu" else y


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def xs_config(block_m=64, stages=8, chunks=1):
    return {"BLOCK_M": block_m, "G": 1, "num_warps": 4, "num_stages": stages, "TMA": False, "XS": chunks}


CASES = [  # (out, in, block, density)
    (3072, 768, (16, 16), 0.1),
    (2304, 768, (32, 32), 0.1),
    (200, 768, (32, 32), 0.3),  # 200 outputs: the last block row is partly outside the matrix
    (776, 256, (16, 16), 0.2),
    (512, 1536, (64, 64), 0.2),
    (64, 64, (16, 32), 0.5),  # non-square blocks
]


@pytest.mark.parametrize(("out_f", "in_f", "block", "density"), CASES)
@pytest.mark.parametrize("tokens", [1, 17, 65, 300])
@pytest.mark.parametrize(("block_m", "chunks"), [(64, 1), (128, 3)])
def test_xstat_matches_dense(out_f, in_f, block, density, tokens, block_m, chunks):
    w = sparse_weight(out_f, in_f, block, density, seed=tokens + out_f)
    values, crow, col = dense_to_bsr(w, block)
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(out_f, device="cuda", dtype=torch.bfloat16)
    if not gluon_bsr.usable(x, values, out_f, block_m, 8):
        pytest.skip("x's tile does not fit in shared memory at this BLOCK_M")
    for b, act in ((bias, "gelu"), (None, None)):
        out = torch.full((tokens, out_f), float("nan"), device="cuda", dtype=torch.bfloat16)
        runner.run(x, values, crow, col, b, out_f, act, xs_config(block_m, 8, chunks), y=out)
        assert rel_err(out, reference(x, w, b, act)) < 1e-2


def test_xstat_one_kept_block_and_many_token_tiles():
    w = sparse_weight(256, 512, (16, 16), 0.1, seed=3, only_one=True)
    values, crow, col = dense_to_bsr(w, 16)
    assert values.shape[0] == 1
    x = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16)
    out = torch.full((1000, 256), float("nan"), device="cuda", dtype=torch.bfloat16)
    runner.run(x, values, crow, col, None, 256, None, xs_config(64, 4, 2), y=out)
    assert rel_err(out, reference(x, w, None, None)) < 1e-2


@pytest.mark.parametrize(("chunks", "stages"), [(66, 8), (5, 54), (1000, 64)])
def test_xstat_chunks_that_do_not_divide_the_rows_and_deep_rings(chunks, stages):
    """72 block rows asked for 66 chunks (the tuner's choice at one ViT-B image): chunks past the last row used to
    read crow out of bounds (an illegal memory access); deep W rings (what the tuner offers now)."""
    block = (32, 32) if stages < 64 else (16, 16)
    w = sparse_weight(2304, 768, block, 0.1, seed=chunks)
    values, crow, col = dense_to_bsr(w, block)
    x = torch.randn(197, 768, device="cuda", dtype=torch.bfloat16)
    out = torch.full((197, 2304), float("nan"), device="cuda", dtype=torch.bfloat16)
    runner.run(x, values, crow, col, None, 2304, "gelu", xs_config(64, stages, chunks), y=out)
    torch.cuda.synchronize()
    assert rel_err(out, reference(x, w, None, "gelu")) < 1e-2


def test_xstat_refuses_problems_it_cannot_run_with_a_clear_error():
    w = sparse_weight(256, 100, (16, 16), 0.3, seed=4)  # K = 100 is not a multiple of the block width
    values, crow, col = dense_to_bsr(w, 16)
    x = torch.randn(8, 100, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x-stationary"):
        runner.run(x, values, crow, col, None, 256, None, xs_config())
    with pytest.raises(ValueError, match="x-stationary"):
        runner.run(x.float(), values.float(), crow, col, None, 256, None, xs_config())


def test_xstat_configs_run_and_under_a_cuda_graph():
    w = sparse_weight(3072, 768, (16, 16), 0.1, seed=5)
    values, crow, col = dense_to_bsr(w, 16)
    bias = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
    cands = runner.configs(x, values, 3072)
    assert cands and all(c["XS"] >= 1 and c["G"] == 1 for c in cands)
    for cfg in cands:
        assert rel_err(runner.run(x, values, crow, col, bias, 3072, None, cfg), reference(x, w, bias, None)) < 1e-2
    y = torch.empty(4096, 3072, device="cuda", dtype=torch.bfloat16)
    runner.run(x, values, crow, col, bias, 3072, None, cands[0], y=y)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        runner.run(x, values, crow, col, bias, 3072, None, cands[0], y=y)
    x.copy_(torch.randn_like(x))
    y.fill_(float("nan"))
    graph.replay()
    assert rel_err(y, reference(x, w, bias, None)) < 1e-2
