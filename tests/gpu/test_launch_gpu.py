"""Direct launches (kernels._launch) on the GPU: after the first call of each specialization no call goes through
Triton's JIT front door, and a call whose specialization differs (x not 16-byte aligned, one token, a multiple of 16
tokens) gets its own compiled kernel and the right answer, for the tiled, TMA and decode kernels, through the
functional op and BlockSparseLinear. Every output is checked against float64.

Run on a CUDA machine: python -m pytest -m gpu tests/gpu/test_launch_gpu.py
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from superblock.kernels import BlockSparseLinear, _launch, bsr_linear, dense_to_bsr  # noqa: E402
from superblock.timing import capture_graph  # noqa: E402

CONFIGS = {
    "tiled": {"BLOCK_M": 64, "G": 1, "num_warps": 4, "num_stages": 3, "TMA": False},
    "tma": {"BLOCK_M": 128, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": True},
    "grouped": {"BLOCK_M": 64, "G": 2, "num_warps": 4, "num_stages": 2, "TMA": False},
    "decode": {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False, "SPLIT": 4},
}


def weight(out_f=768, in_f=1024, block=64, density=0.15, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    keep = torch.rand(out_f // block, in_f // block, generator=g, device="cuda") < density
    keep[0, 0] = True
    mask = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return (torch.randn(out_f, in_f, generator=g, device="cuda") * mask).bfloat16()


def inputs(in_f: int) -> list[torch.Tensor]:
    """x of several specializations: aligned, not 16-byte aligned (a view one element in), 1 token, 16 tokens; 3-D
    (the bound launch's flat call: read as it is), aligned and not."""
    buf = torch.randn(197 * in_f + 1, device="cuda").bfloat16()
    return [
        torch.randn(197, in_f, device="cuda").bfloat16(),
        buf[1:].view(197, in_f),
        torch.randn(1, in_f, device="cuda").bfloat16(),
        torch.randn(16, in_f, device="cuda").bfloat16(),
        torch.randn(2, 99, in_f, device="cuda").bfloat16(),
        buf[1:].view(1, 197, in_f),
    ]


def check(y, x, w, bias):
    ref = x.double() @ w.double().t() + bias.double()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("kind", list(CONFIGS))
@torch.no_grad()
def test_direct_launches_are_correct_and_skip_the_jit(kind):
    w = weight()
    bias = torch.randn(w.shape[0], device="cuda").bfloat16()
    values, crow, col = dense_to_bsr(w, 64)
    mod = BlockSparseLinear.from_bsr(values, crow, col, w.shape, bias, backend="triton")
    xs = inputs(w.shape[1])
    for x in xs:
        m = x.numel() // x.shape[-1]
        mod.set_choice(1 << max(4, (m - 1).bit_length()), {"backend": "triton", "config": CONFIGS[kind]})
    cfg = CONFIGS[kind]
    for _ in range(2):  # the first round compiles every specialization
        for x in xs:
            check(bsr_linear(x, values, crow, col, w.shape, bias, backend="triton", config=cfg), x, w, bias)
            check(mod(x), x, w, bias)
    settled = _launch.KernelLaunch.jit_calls
    for _ in range(3):
        for x in xs:
            check(bsr_linear(x, values, crow, col, w.shape, bias, backend="triton", config=cfg), x, w, bias)
            check(mod(x), x, w, bias)
    assert _launch.KernelLaunch.jit_calls == settled, "a call after the first ones went through the JIT front door"


@torch.no_grad()
def test_direct_launches_inside_a_cuda_graph():
    """A captured direct launch replays on new inputs (the launcher reads the stream torch captures on)."""
    w = weight(seed=3)
    bias = torch.randn(w.shape[0], device="cuda").bfloat16()
    mod = BlockSparseLinear.from_dense(w, bias, 64, backend="triton")
    x = torch.randn(197, w.shape[1], device="cuda").bfloat16()
    mod.set_choice(256, {"backend": "triton", "config": CONFIGS["tiled"]})
    mod(x)
    out = {}
    graph = capture_graph(lambda: out.update(y=mod(x)))  # warmed up on a side stream, then captured
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).bfloat16())
        graph.replay()
        check(out["y"], x, w, bias)
