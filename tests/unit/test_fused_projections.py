"""Fused projections (superblock.kernels.projection_fusion): q/k/v as one block-sparse product, gate/up as one with
silu(gate) * up fused into the kernels ("silu_mul"), built by load_sparse by default. CPU: dense / torch backends,
tiny transformers models built from configs; the Triton kernels under the interpreter in a subprocess."""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from superblock.kernels import BlockSparseLinear, _runners, ops
from superblock.kernels.projection_fusion import (
    FusedGatedMLP,
    FusedGateUpLinear,
    FusedQKV,
    QKVSlice,
    concat_rows,
    fusable_gate_up,
    fuse_projections,
)
from superblock.sparsity.targets import LLAMA_PROJECTIONS
from tests.helpers.kernels import block_sparse, glu_reference, rel, run_in_interpreter

REPO = Path(__file__).resolve().parents[2]


def test_concat_rows_stacks_the_weights_and_refuses_ragged_middles():
    ws = [block_sparse(32, 48, seed=1), block_sparse(16, 48, seed=2), block_sparse(20, 48, seed=3)]  # v ragged
    layers = [
        BlockSparseLinear.from_dense(w, torch.randn(w.shape[0]) if i != 1 else None, block_size=16)
        for i, w in enumerate(ws)
    ]
    values, crow, col, bias = concat_rows(layers)
    assert crow.dtype == torch.int32 and crow.numel() == 2 + 1 + 2 + 1
    dense = _runners.bsr_to_dense(values, crow, col, (68, 48))
    torch.testing.assert_close(dense, torch.cat(ws), rtol=0, atol=0)
    torch.testing.assert_close(bias, torch.cat([layers[0].bias, torch.zeros(16), layers[2].bias]))
    with pytest.raises(ValueError, match="multiple of 16"):
        concat_rows([layers[2], layers[0]])
    with pytest.raises(ValueError, match="one block size"):
        concat_rows([layers[0], BlockSparseLinear.from_dense(ws[1], block_size=8)])


@pytest.mark.parametrize("backend", ["dense", "torch"])
def test_fused_qkv_equals_the_separate_projections(backend):
    ws = [block_sparse(64, 48, seed=1), block_sparse(32, 48, seed=2), block_sparse(32, 48, seed=3, empty_rows=(1,))]
    sep = [BlockSparseLinear.from_dense(w, torch.randn(w.shape[0]), block_size=16, backend=backend) for w in ws]
    fused = FusedQKV.from_qkv(*sep)
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        for got, layer in zip(fused(x), sep, strict=True):
            torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
        slices = [QKVSlice(fused, i) for i in range(3)]
        for s, layer in zip(slices, sep, strict=True):
            torch.testing.assert_close(s(x), layer(x), rtol=1e-5, atol=1e-5)


def test_qkv_slices_compute_once_per_input_and_keep_nothing():
    ws = [block_sparse(32, 32, seed=s) for s in (1, 2, 3)]
    sep = [BlockSparseLinear.from_dense(w, block_size=16) for w in ws]
    fused = FusedQKV.from_qkv(*sep)
    q, k, v = (QKVSlice(fused, i) for i in range(3))
    calls = []
    fused.proj.register_forward_hook(lambda *a: calls.append(1))
    x, other = torch.randn(4, 32), torch.randn(4, 32)
    with torch.no_grad():
        outs = [q(x), k(x), v(x)]
        assert len(calls) == 1 and fused._kept is None  # one product, nothing kept after v
        assert outs[1].data_ptr() == outs[0].data_ptr() + 32 * 4  # views of the one product
        # another input for k / v (cross-attention, an odd call order) is computed afresh: slower, never wrong
        torch.testing.assert_close(q(x), sep[0](x))
        torch.testing.assert_close(k(other), sep[1](other))
        torch.testing.assert_close(v(x), sep[2](x))
        assert len(calls) == 4 and fused._kept is None
        # an interrupted sequence (q only) leaves a product that the next q replaces, whatever its input
        q(x)
        x.add_(1.0)  # the same tensor object with new contents
        torch.testing.assert_close(q(x), sep[0](x))
        torch.testing.assert_close(k(x), sep[1](x))
        torch.testing.assert_close(v(x), sep[2](x))


@pytest.mark.parametrize("backend", ["dense", "torch"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_gate_up_equals_silu_gate_times_up(backend, with_bias):
    wg, wu = block_sparse(64, 40, seed=1, empty_rows=(0,)), block_sparse(64, 40, seed=2, empty_rows=(2,))
    bias = torch.randn(128) if with_bias else None
    gate = BlockSparseLinear.from_dense(wg, None if bias is None else bias[:64], block_size=16, backend=backend)
    up = BlockSparseLinear.from_dense(wu, None if bias is None else bias[64:], block_size=16, backend=backend)
    fused = FusedGateUpLinear.from_gate_up(gate, up)
    assert fused.shape == (128, 40) and fused.activation == "silu_mul"
    for m in (1, 17, 65):
        x = torch.randn(m, 40)
        with torch.no_grad():
            y = fused(x)
        assert y.shape == (m, 64) and rel(y, glu_reference(x, wg, wu, bias)) < 1e-5
    # the op itself (what torch.compile sees) and its fake agree on the width; the differentiable path too
    x = torch.randn(2, 3, 40)
    y = torch.ops.superblock.bsr_linear(
        x, fused.values, fused.crow_indices, fused.col_indices, None, fused.bias, 128, "silu_mul", backend, "ieee", []
    )
    assert y.shape == (2, 3, 64) and rel(y, glu_reference(x, wg, wu, bias)) < 1e-5
    assert "silu_mul" in ops.OP_ACTIVATIONS
    xg = torch.randn(5, 40, requires_grad=True)
    yg = FusedGateUpLinear.from_gate_up(
        BlockSparseLinear.from_dense(wg, block_size=16, backend="dense"),
        BlockSparseLinear.from_dense(wu, block_size=16, backend="dense"),
    )(xg)
    yg.sum().backward()
    assert yg.shape == (5, 64) and xg.grad is not None


def test_fused_gate_up_refuses_other_activations_and_ragged_halves():
    layer = FusedGateUpLinear(32, 64, 16, bias=False)
    with pytest.raises(ValueError, match="silu_mul"):
        layer.activation = "gelu"
    with pytest.raises(ValueError, match="whole block rows"):
        FusedGateUpLinear(32, 48, 16)
    x, values = torch.zeros(1, 32), torch.zeros(1, 16, 16)
    crow, col = torch.tensor([0, 1, 1, 1, 1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    cfg = {"BLOCK_M": 16, "G": 4, "num_warps": 4, "num_stages": 2, "TMA": False}
    with pytest.raises(ValueError, match="G=4"):  # 2 gate block rows cannot pair in groups of 4
        _runners.run_triton(x, values, crow, col, None, None, 64, "silu_mul", "ieee", cfg)


# ------------------------------------------------------------------------------------------------ tiny models


def tiny_llama(intermediate: int = 128, block: int = 16, seed: int = 0, **kw):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=97,
        max_position_embeddings=64,
        **kw,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    for i, (layer, name) in enumerate((layer, name) for layer in model.model.layers for name in LLAMA_PROJECTIONS):
        parent, attr = name.rsplit(".", 1)
        owner = layer.get_submodule(parent)
        lin = getattr(owner, attr)
        w = lin.weight.detach() * block_sparse(*lin.weight.shape, (block, block), 0.6, seed + i).ne(0)
        setattr(owner, attr, BlockSparseLinear.from_dense(w, lin.bias, block_size=block))
    return model


def test_fuse_projections_on_a_tiny_llama_keeps_logits_and_generation():
    model = tiny_llama(mlp_bias=True, attention_bias=True)
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == {"qkv": 2, "gate_up": 2}
    assert fuse_projections(fused) == {"qkv": 0, "gate_up": 0}  # already fused: nothing left to do
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, QKVSlice) and isinstance(attn.qkv_proj, FusedQKV)
    assert isinstance(fused.model.layers[0].mlp, FusedGatedMLP)
    kinds = [type(m).__name__ for m in fused.modules() if isinstance(m, BlockSparseLinear)]
    assert sorted(kinds) == sorted(["BlockSparseLinear"] * 6 + ["FusedGateUpLinear"] * 2)  # 4 products a layer
    assert not any(
        k.startswith(("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj.")) for k in fused.state_dict()
    )
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        want = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        assert torch.equal(fused.generate(ids[:1], max_new_tokens=6, do_sample=False), want)
        static = fused.generate(ids[:1], max_new_tokens=6, do_sample=False, cache_implementation="static")
        assert torch.equal(static, want)
    assert attn.qkv_proj._kept is None  # nothing kept between calls


def test_gate_up_fusion_needs_pairable_rows_and_silu():
    # blocks of 16: the intermediate size must be a multiple of 4 block rows (the grouped kernel's G)
    model = tiny_llama(intermediate=96)
    assert fuse_projections(copy.deepcopy(model)) == {"qkv": 2, "gate_up": 0}
    gelu = tiny_llama(hidden_act="gelu")
    assert not fusable_gate_up(gelu.model.layers[0].mlp)
    assert fuse_projections(copy.deepcopy(model), qkv=False) == {"qkv": 0, "gate_up": 0}


def test_fused_llama_traces_as_one_graph(fresh_dynamo):
    """The q call's kept product is a side effect inside one frame: no graph break, no recompilation."""
    from torch._dynamo.utils import counters

    model = tiny_llama()
    fuse_projections(model)
    compiled = torch.compile(model, backend="eager")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(2):
            ids = torch.randint(0, 97, (2, 9), generator=gen)
            want = model(ids).logits  # eager first: the layers' plans exist before the trace (no recompile for them)
            torch.testing.assert_close(compiled(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1


def test_gpt2_has_nothing_to_fuse():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert fuse_projections(model) == {"qkv": 0, "gate_up": 0}  # c_attn is one matrix already


# ------------------------------------------------------------------------------------------------ load_sparse


def test_load_sparse_fuses_by_default_and_generates_what_the_unfused_model_does(tmp_path):
    pytest.importorskip("transformers")
    from superblock.export import export_checkpoint, load_sparse
    from tests.helpers.hf import CONFIGS
    from tests.helpers.runs import make_run

    llama = CONFIGS["llama"]
    make_run(
        tmp_path / "run",
        "hf:llama",
        num_classes=61,
        model_kwargs={"task": "causal_lm", "config": llama},
        block_size=8,
        sparsity=0.75,
    )
    export_checkpoint(
        tmp_path / "run", tmp_path / "exp", device="cpu", layout="bsr", probe_batch=2, echo=lambda _: None
    )
    fused, plain = load_sparse(tmp_path / "exp"), load_sparse(tmp_path / "exp", fuse_projections=False)
    assert sum(isinstance(m, FusedGateUpLinear) for m in fused.modules()) == 2
    assert sum(isinstance(m, FusedQKV) for m in fused.modules()) == 2
    assert not any(isinstance(m, (FusedGateUpLinear, FusedQKV)) for m in plain.modules())
    ids = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
        want = plain.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(fused.generate(ids, max_new_tokens=6, do_sample=False), want)
    bf16 = load_sparse(tmp_path / "exp", dtype="bf16")  # the export tolerance in bf16 (dense CPU path)
    with torch.no_grad():
        got, ref = bf16(ids).logits.float(), plain(ids).logits
    assert (got - ref).abs().max() <= 5e-2 * ref.abs().max()


# ------------------------------------------------------------------------------------------------ interpreter

_INTERP = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn.functional as F
    from superblock.kernels import BlockSparseLinear, _runners, _triton_bsr, dense_to_bsr
    from superblock.kernels.projection_fusion import FusedGateUpLinear, FusedQKV
    from tests.helpers.kernels import block_sparse, glu_reference, rel

    full = sys.argv[1] == "full"
    cases = [(64, 96, (16, 16)), (64, 70, (32, 16)), (128, 64, (32, 32))] if full else [(64, 70, (16, 16))]
    tokens = (1, 17, 65) if full else (17,)
    tiled = {"BLOCK_M": 32, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": True}  # TMA is refused for silu_mul
    configs = [tiled, {**tiled, "G": 2, "TMA": False}, {**tiled, "BLOCK_M": 16, "SPLIT": 1},
               {**tiled, "BLOCK_M": 16, "SPLIT": 2}]
    real_ws = _triton_bsr.decode_workspace
    for n, k, block in cases:
        wg = block_sparse(n, k, block, 0.5, 1, empty_rows=(0,))
        wu = block_sparse(n, k, block, 0.5, 2, empty_rows=(1,))
        values, crow, col = dense_to_bsr(torch.cat([wg, wu]), block)
        bias = torch.randn(2 * n)
        for m in tokens:
            x = torch.randn(m, k)
            for cfg in configs + ([{**tiled, "BLOCK_M": 16, "SPLIT": 2, "mode1": True}] if full else []):
                cfg = dict(cfg)
                mode1 = cfg.pop("mode1", False)
                _triton_bsr.decode_workspace = (lambda *a: None) if mode1 else real_ws  # MODE 1: reduce kernel
                lc, lcol, gidx = _runners.layout_for(crow, col, cfg["G"])
                for b in (None, bias):
                    y = _runners.run_triton(x, values, lc, lcol, gidx, b, 2 * n, "silu_mul", "ieee", cfg)
                    err = rel(y, glu_reference(x, wg, wu, b))
                    assert y.shape == (m, n) and err < 1e-5, (n, k, block, m, cfg, mode1, b is not None, err)
            _triton_bsr.decode_workspace = real_ws
    # modules with backend="triton": the fused gate/up in bf16, and q/k/v as one product
    wg, wu = block_sparse(64, 64, (16, 16), 0.5, 3), block_sparse(64, 64, (16, 16), 0.5, 4)
    gate, up = (BlockSparseLinear.from_dense(w, block_size=16, backend="triton") for w in (wg, wu))
    fused = FusedGateUpLinear.from_gate_up(gate, up).to(torch.bfloat16)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = fused(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and rel(y, glu_reference(x, wg, wu)) < 2e-2, rel(y, glu_reference(x, wg, wu))
    qkv = [BlockSparseLinear.from_dense(block_sparse(o, 64, (16, 16), 0.5, s), block_size=16, backend="triton")
           for o, s in ((64, 5), (32, 6), (32, 7))]
    with torch.no_grad():
        for got, layer in zip(FusedQKV.from_qkv(*qkv)(x), qkv):
            assert rel(got, layer(x).double()) < 1e-5
    print("interpreter ok")
    """
)


def _interpret(mode: str) -> None:
    run_in_interpreter(_INTERP, mode, expect="interpreter ok", timeout=900)


def test_fused_gate_up_kernels_in_interpreter_quick():
    """One awkward shape (K not a block multiple, empty block rows), 17 tokens: tiled G=1/2, decode SPLIT 1/2."""
    _interpret("quick")


@pytest.mark.slow
def test_fused_gate_up_kernels_in_interpreter():
    """Shapes with K a multiple of the block width or not, rectangular blocks, 1 / 17 / 65 tokens, every kernel path
    (tiled G=1/2, decode SPLIT 1 and 2 through the workspace and through the reduce kernel), with and without bias."""
    _interpret("full")


def test_the_old_module_name_still_imports_with_a_warning() -> None:
    import importlib

    sys.modules.pop("superblock.kernels.fused", None)
    with pytest.warns(FutureWarning, match="projection_fusion"):
        old = importlib.import_module("superblock.kernels.fused")
    from superblock.kernels import projection_fusion

    assert old.fuse_projections is projection_fusion.fuse_projections and old.FusedQKV is projection_fusion.FusedQKV
