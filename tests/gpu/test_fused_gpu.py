"""GPU tests of the fused projections: the silu_mul Triton kernels (tiled, decode through the workspace and through
the reduce kernel) against a float64 reference, `auto` tuning of a fused layer, and a tiny Llama fused vs unfused in
bf16: eager, greedy generation, torch.compile and a CUDA graph of the decode step.

Run on a CUDA machine: python -m pytest -m gpu tests/gpu/test_fused_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from superblock.kernels import BlockSparseLinear, _runners, _triton_bsr, dense_to_bsr  # noqa: E402
from superblock.kernels.projection_fusion import FusedGateUpLinear, FusedQKV, fuse_projections  # noqa: E402
from superblock.sparsity.targets import LLAMA_PROJECTIONS  # noqa: E402

TILED = {"BLOCK_M": 64, "G": 1, "num_warps": 4, "num_stages": 3, "TMA": True}  # TMA: refused for silu_mul
CONFIGS = [
    TILED,
    {**TILED, "G": 2, "TMA": False},
    {**TILED, "BLOCK_M": 16, "SPLIT": 1},
    {**TILED, "BLOCK_M": 16, "SPLIT": 4},
]


def weight(out_f, in_f, block, seed):
    g = torch.Generator().manual_seed(seed)
    bh, bw = block
    keep = torch.rand(out_f // bh, -(-in_f // bw), generator=g) < 0.3
    keep[1] = False  # an empty block row
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:, :in_f]
    return torch.randn(out_f, in_f, generator=g) * 0.05 * mask


def reference(x, wg, wu, bias):
    g, u = x.double() @ wg.double().t(), x.double() @ wu.double().t()
    if bias is not None:
        g, u = g + bias[: wg.shape[0]].double(), u + bias[wg.shape[0] :].double()
    return F.silu(g) * u


@pytest.mark.parametrize("block", [(64, 64), (32, 32), (16, 16)])
@pytest.mark.parametrize("m", [1, 17, 65, 300])
@pytest.mark.parametrize("mode1", [False, True])
def test_silu_mul_kernels_match_reference(block, m, mode1, monkeypatch):
    if mode1:  # no workspace: partial sums reduced by the second kernel
        monkeypatch.setattr(_triton_bsr, "decode_workspace", lambda *a: None)
    n, k = 512, 448
    wg, wu = weight(n, k, block, 1), weight(n, k, block, 2)
    values, crow, col = (t.cuda() for t in dense_to_bsr(torch.cat([wg, wu]).to(torch.bfloat16), block))
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    bias = torch.randn(2 * n, device="cuda").to(torch.bfloat16)
    for cfg in CONFIGS:
        lc, lcol, gidx = _runners.layout_for(crow, col, cfg["G"])
        for b in (None, bias):
            y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            _runners.run_triton(x, values, lc, lcol, gidx, b, 2 * n, "silu_mul", "ieee", cfg, y)
            ref = reference(
                x.float().cpu(),
                wg.to(torch.bfloat16).float(),
                wu.to(torch.bfloat16).float(),
                None if b is None else b.float().cpu(),
            )
            err = ((y.double().cpu() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (block, m, cfg, b is not None, err)


@pytest.mark.parametrize("target", ["eager", "graph"])
def test_auto_tunes_a_fused_gate_up_layer(target):
    wg, wu = weight(1024, 512, (64, 64), 3), weight(1024, 512, (64, 64), 4)
    gate, up = (BlockSparseLinear.from_dense(w, block_size=64).cuda().to(torch.bfloat16) for w in (wg, wu))
    fused = FusedGateUpLinear.from_gate_up(gate, up)
    fused.set_tuning_target(target)
    for m in (1, 8, 64, 2048):
        x = torch.randn(m, 512, device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            y = fused(x)
        ref = reference(x.float().cpu(), wg.to(torch.bfloat16).float(), wu.to(torch.bfloat16).float(), None)
        assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < 1e-2, (m, fused.choices())


def test_fused_qkv_triton_matches_separate():
    parts = [
        BlockSparseLinear.from_dense(weight(o, 512, (64, 64), s), torch.randn(o), block_size=64, backend="triton")
        for o, s in ((512, 5), (128, 6), (128, 7))
    ]
    parts = [p.cuda().to(torch.bfloat16) for p in parts]
    fused = FusedQKV.from_qkv(*parts)
    x = torch.randn(3, 7, 512, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for got, p in zip(fused(x), parts, strict=True):
            torch.testing.assert_close(got, p(x), rtol=2e-2, atol=2e-2)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=300,
        max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    for i, (layer, name) in enumerate((layer, name) for layer in model.model.layers for name in LLAMA_PROJECTIONS):
        owner_name, attr = name.rsplit(".", 1)
        owner = layer.get_submodule(owner_name)
        lin = getattr(owner, attr)
        w = lin.weight.detach() * weight(*lin.weight.shape, (64, 64), i).ne(0)
        setattr(owner, attr, BlockSparseLinear.from_dense(w, block_size=64))
    return model.cuda().to(torch.bfloat16)


def test_tiny_llama_fused_generates_like_unfused_eager_compiled_and_graphed():
    plain = _tiny_llama()
    fused = copy.deepcopy(plain)
    assert fuse_projections(fused) == {"qkv": 2, "gate_up": 2}
    ids = torch.randint(0, 300, (1, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        want, got = plain(ids).logits.float(), fused(ids).logits.float()
        assert (got - want).abs().max() <= 3e-2 * want.abs().max()
        assert torch.equal(
            fused.generate(ids, max_new_tokens=8, do_sample=False),
            plain.generate(ids, max_new_tokens=8, do_sample=False),
        )
        compiled = torch.compile(fused)
        torch.testing.assert_close(compiled(ids).logits.float(), got, rtol=3e-2, atol=3e-2)
        static = fused.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
        assert torch.equal(static, fused.generate(ids, max_new_tokens=8, do_sample=False))
        # a CUDA graph of the fused forward (the q call's product is kept and dropped while capturing)
        out = {}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fused(ids)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out["y"] = fused(ids).logits
        graph.replay()
        torch.testing.assert_close(out["y"].float(), got, rtol=0, atol=1e-2)
        assert fused.model.layers[0].self_attn.qkv_proj._kept is None
