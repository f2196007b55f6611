"""GPU tests of the Triton block-sparse linear kernel against a float64 masked-dense reference.

Run on a CUDA machine: python -m pytest -m gpu tests/gpu (add -n 8 with pytest-xdist: compilation dominates).
Every output is poisoned with NaN before the kernel runs, so an unwritten tile fails the test.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from superblock.kernels import (  # noqa: E402
    BlockSparseLinear,
    BlockSparseMultiheadAttention,
    bsr_linear,
    dense_to_bsr,
    fuse_linear_gelu,
)
from superblock.kernels import tuning as tuning_mod  # noqa: E402

MODES = {  # name: (dtype, fp32 precision, max relative Frobenius error)
    "bf16": (torch.bfloat16, "ieee", 1e-2),
    "fp16": (torch.float16, "ieee", 2e-3),
    "fp32": (torch.float32, "ieee", 1e-5),
    "tf32": (torch.float32, "tf32", 2e-3),
}
BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (32, 64)]
LAYERS = {"fc1": (3072, 768), "fc2": (768, 3072), "qkv": (2304, 768), "odd": (1000, 700)}
# 50,432 tokens (256 ViT-B images) is the big-problem check: marked slow, so `pytest -m "gpu and not slow"` is the
# quick GPU suite and `pytest -m "gpu and slow"` adds these (docs in README, "Tests")
BIG = pytest.param(50432, marks=pytest.mark.slow, id="50432")
TOKENS = [1, 7, 197, BIG]


def random_weight(out_f, in_f, block, density, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bh, bw = block
    rows, cols = -(-out_f // bh), -(-in_f // bw)
    keep = torch.rand(rows, cols, generator=g, device="cuda") < density
    keep[0, 0] = True
    keep[-1] = False  # an empty block row
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:out_f, :in_f]
    w = (torch.rand(out_f, in_f, generator=g, device="cuda") + 0.5) * torch.randn(
        out_f, in_f, generator=g, device="cuda"
    ).sign()
    return (w * mask / (in_f * density) ** 0.5).to(dtype)


def reference(x, w, bias, activation):
    y = x.double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    return F.gelu(y) if activation == "gelu" else y


def check(y, ref, tol, what):
    assert not torch.isnan(y).any(), f"{what}: unwritten (NaN) outputs"
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


def run_poisoned(x, values, crow, col, shape, bias, act, prec, config=None):
    out = torch.full((*x.shape[:-1], shape[0]), float("nan"), device=x.device, dtype=x.dtype)
    return bsr_linear(
        x, values, crow, col, shape, bias, act, backend="triton", fp32_precision=prec, config=config, out=out
    )


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("mode", list(MODES))
def test_triton_matches_reference(mode, block, layer, tokens):
    dtype, prec, tol = MODES[mode]
    out_f, in_f = LAYERS[layer]
    seed = hash((mode, block, layer, tokens)) % 2**31
    w = random_weight(out_f, in_f, block, 0.25, dtype, seed)
    values, crow, col = dense_to_bsr(w, block)
    x = torch.randn(tokens, in_f, device="cuda").to(dtype)
    bias = torch.randn(out_f, device="cuda").to(dtype)
    y = run_poisoned(x, values, crow, col, (out_f, in_f), bias, "gelu", prec)
    check(y, reference(x, w, bias, "gelu"), tol, f"{mode} {block} {layer} M={tokens}")


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (32, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("mode", ["bf16", "fp32", "tf32"])
@pytest.mark.parametrize("tokens", [197, BIG])
def test_every_candidate_config(mode, block, tokens):
    """Every launch configuration the tuner may pick is correct (grouped rows, TMA, tile sizes)."""
    dtype, prec, tol = MODES[mode]
    out_f, in_f = 1000, 700 if tokens == 197 else 768
    w = random_weight(out_f, in_f, block, 0.2, dtype, 7)
    values, crow, col = dense_to_bsr(w, block)
    x = torch.randn(3, tokens // 3 + 1, in_f, device="cuda").to(dtype)
    ref = reference(x, w, None, None)
    M = x.shape[0] * x.shape[1]
    cands = tuning_mod.candidate_configs(M, *block, dtype, prec) + tuning_mod.candidate_configs(
        M, *block, dtype, prec, "graph"
    )
    for cfg in {tuple(sorted(c.items())): c for c in cands}.values():
        try:
            y = run_poisoned(x, values, crow, col, (out_f, in_f), None, None, prec, cfg)
        except Exception as err:  # a config the tuner would skip (out of resources) is not an error
            if "OutOfResources" in type(err).__name__ or "out of resource" in str(err):
                continue
            raise
        check(y, ref, tol, f"{mode} {block} {cfg}")


def test_tf32x3_is_near_fp32():
    w = random_weight(768, 3072, (64, 64), 0.1, torch.float32, 3)
    values, crow, col = dense_to_bsr(w, 64)
    x = torch.randn(4099, 3072, device="cuda")
    check(
        run_poisoned(x, values, crow, col, (768, 3072), None, None, "tf32x3"), reference(x, w, None, None), 1e-5, "x3"
    )


def test_int64_indices_and_strided_input():
    w = random_weight(512, 256, (32, 32), 0.3, torch.bfloat16, 5)
    values, crow, col = dense_to_bsr(w, 32, index_dtype=torch.int64)
    x = torch.randn(300, 512, device="cuda").bfloat16()[:, ::2]  # non-contiguous rows
    check(run_poisoned(x, values, crow, col, (512, 256), None, None, "ieee"), reference(x, w, None, None), 1e-2, "i64")


@pytest.mark.parametrize("block", [(64, 16), (64, 32), (128, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_feature_major_x_and_y_every_candidate(block):
    """x and y as transposed views (feature-major, what a layer writing its output transposed hands on): every
    candidate configuration of a tall thin tile (tiled, packed, TMA with transposed boxes) reads and writes them
    as they are and matches the reference."""
    out_f, in_f, M = 768, 3072, 1000
    w = random_weight(out_f, in_f, block, 0.15, torch.bfloat16, 21)
    values, crow, col = dense_to_bsr(w, block)
    bias = torch.randn(out_f, device="cuda").bfloat16()
    x = torch.randn(in_f, M, device="cuda").bfloat16().t()  # [M, in] stored as [in, M]
    ref = reference(x, w, bias, "gelu")
    for cfg in tuning_mod.candidate_configs(M, *block, torch.bfloat16, "ieee"):
        for y_t in (False, True):
            out = torch.full((out_f, M) if y_t else (M, out_f), float("nan"), device="cuda", dtype=torch.bfloat16)
            out = out.t() if y_t else out
            y = bsr_linear(x, values, crow, col, (out_f, in_f), bias, "gelu", backend="triton", config=cfg, out=out)
            assert y.data_ptr() == out.data_ptr()
            check(out, ref, 1e-2, f"{block} {cfg} y_t={y_t}")


def test_feature_major_hand_off_eager_graphed_and_compiled():
    """fc1 -> fc2 with hand_off_feature_major: fc1 writes its output feature-major in eager calls and inside a CUDA
    graph capture, fc2 reads it as it is; compiled, both stay token-major; every way gives the same output."""
    from superblock.kernels import hand_off_feature_major

    w1 = random_weight(3072, 768, (64, 16), 0.1, torch.bfloat16, 31)
    w2 = random_weight(768, 3072, (64, 16), 0.1, torch.bfloat16, 32)
    mlp = nn.Sequential(
        BlockSparseLinear.from_dense(w1, None, (64, 16), activation="gelu", backend="auto"),
        nn.Dropout(0.0),
        BlockSparseLinear.from_dense(w2, None, (64, 16), backend="auto"),
    ).eval()
    assert hand_off_feature_major(mlp) == 1
    x = torch.randn(4, 197, 768, device="cuda").bfloat16()
    ref = reference(F.gelu(reference(x, w1, None, None)).bfloat16(), w2, None, None)
    from superblock.timing import capture_graph

    outs = []
    with torch.no_grad():
        check(mlp(x), ref, 1e-2, "eager")
        capture_graph(lambda: outs.append(mlp(x))).replay()  # the served model's way of capturing
        check(outs[-1], ref, 1e-2, "graph")
        check(torch.compile(mlp, fullgraph=True)(x), ref, 1e-2, "compiled")


@pytest.mark.parametrize("backend", ["torch", "dense", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_other_backends(backend, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERBLOCK_CACHE_DIR", str(tmp_path))
    tuning_mod.clear_tuning()
    w = random_weight(3072, 768, (64, 64), 0.1, dtype, 11)
    values, crow, col = dense_to_bsr(w, 64)
    bias = torch.randn(3072, device="cuda").to(dtype)
    x = torch.randn(8, 197, 768, device="cuda").to(dtype)
    try:
        y = bsr_linear(x, values, crow, col, (3072, 768), bias, "gelu", backend=backend)
    except RuntimeError as err:
        pytest.skip(f"torch has no BSR kernel here: {err}")
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # torch/dense fp32 may use tf32 if the user enabled it
    check(y, reference(x, w, bias, "gelu"), tol, backend)
    if backend == "auto":
        table = json.loads((tmp_path / "tuning.json").read_text())
        (entries,) = table["scopes"].values()
        (entry,) = entries.values()
        assert entry["backend"] in ("triton", "torch", "dense") and "dense" in entry["times_us"]
        tuning_mod.clear_tuning()  # next process: the disk answers, nothing is measured again
        monkeypatch.setattr(tuning_mod, "measure", lambda *a, **k: pytest.fail("measured twice"))
        check(bsr_linear(x, values, crow, col, (3072, 768), bias, "gelu"), reference(x, w, bias, "gelu"), tol, "2nd")
    tuning_mod.clear_tuning()


def test_modules_on_cuda_bf16():
    from torchvision.models.vision_transformer import EncoderBlock

    torch.manual_seed(0)
    blk = EncoderBlock(12, 768, 3072, 0.0, 0.0).eval().cuda()
    with torch.no_grad():
        for lin in (blk.mlp[0], blk.mlp[3], blk.self_attention.out_proj):
            lin.weight.copy_(random_weight(*lin.weight.shape, (64, 64), 0.1, torch.float32, 1) * 0.5)
        blk.self_attention.in_proj_weight.copy_(random_weight(2304, 768, (64, 64), 0.1, torch.float32, 2) * 0.5)
    blk = blk.bfloat16()
    x = torch.randn(4, 197, 768, device="cuda").bfloat16()
    with torch.no_grad():
        dense = EncoderBlock(12, 768, 3072, 0.0, 0.0).eval().cuda().double()
        dense.load_state_dict(blk.state_dict())
        ref = dense(x.double())
        blk.mlp[0] = BlockSparseLinear.from_dense(blk.mlp[0], block_size=64, backend="triton")
        blk.mlp[3] = BlockSparseLinear.from_dense(blk.mlp[3], block_size=64, backend="triton")
        assert fuse_linear_gelu(blk) == 1
        blk.self_attention = BlockSparseMultiheadAttention.from_mha(blk.self_attention, 64, backend="triton")
        y = blk(x)
    check(y, ref, 2e-2, "encoder block")


def test_blocksparse_linear_matches_nn_linear_fp32():
    lin = nn.Linear(700, 1000).cuda()
    with torch.no_grad():
        lin.weight.copy_(random_weight(1000, 700, (32, 64), 0.2, torch.float32, 9))
    mod = BlockSparseLinear.from_dense(lin, block_size=(32, 64), backend="triton")
    x = torch.randn(5, 33, 700, device="cuda")
    with torch.no_grad():
        check(mod(x), reference(x, lin.weight, lin.bias, None), 1e-5, "module")


def test_auto_graph_target(tmp_path, monkeypatch):
    """With set_tuning_target("graph"), auto compares GPU times (graph replays) and keys its choice apart."""
    from superblock.kernels import set_tuning_target

    monkeypatch.setenv("SUPERBLOCK_CACHE_DIR", str(tmp_path))
    tuning_mod.clear_tuning()
    w = random_weight(3072, 768, (64, 64), 0.1, torch.bfloat16, 13)
    values, crow, col = dense_to_bsr(w, 64)
    x = torch.randn(197, 768, device="cuda").bfloat16()
    set_tuning_target("graph")
    try:
        y = bsr_linear(x, values, crow, col, (3072, 768))
    finally:
        set_tuning_target("eager")
    check(y, reference(x, w, None, None), 1e-2, "graph target")
    (entries,) = json.loads((tmp_path / "tuning.json").read_text())["scopes"].values()
    (key,) = entries
    assert key.endswith("|graph") and "dense" in entries[key]["times_us"]
    tuning_mod.clear_tuning()


# ---------------------------------------------------------------------------------- custom op, compile, graphs

GPU_DTYPES = {"bf16": (torch.bfloat16, 1e-2), "fp16": (torch.float16, 2e-3), "fp32": (torch.float32, 1e-5)}


@pytest.mark.parametrize("group", [1, 2])
def test_opcheck_triton(group):
    w = random_weight(512, 256, (32, 32), 0.3, torch.bfloat16, 21)
    values, crow, col = dense_to_bsr(w, 32)
    from superblock.kernels._runners import layout_for

    crow, col, gidx = layout_for(crow, col, group)
    x = torch.randn(3, 77, 256, device="cuda").bfloat16()
    bias = torch.randn(512, device="cuda").bfloat16()
    cfg = [64, group, 4, 2, 0]
    args = (x, values, crow, col, gidx, bias, 512, "gelu", "triton", "ieee", cfg)
    torch.library.opcheck(torch.ops.superblock.bsr_linear.default, args)
    check(torch.ops.superblock.bsr_linear(*args), reference(x, w, bias, "gelu"), 1e-2, f"op G={group}")


@pytest.mark.parametrize("dtype_name", list(GPU_DTYPES))
def test_module_compiled_and_captured_match_eager(dtype_name):
    """BlockSparseLinear (triton, prepared) under torch.compile (inductor, fullgraph, no recompiles) and inside a
    CUDA graph gives its eager outputs."""
    from torch._dynamo.utils import counters

    dtype, tol = GPU_DTYPES[dtype_name]
    w = random_weight(3072, 768, (64, 64), 0.1, dtype, 23)
    bias = torch.randn(3072, device="cuda").to(dtype)
    mod = BlockSparseLinear.from_dense(w, bias, 64, activation="gelu", backend="triton")
    xs = [torch.randn(b, 197, 768, device="cuda").to(dtype) for b in (1, 8)]
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        mod.prepare([x.shape[0] * x.shape[1] for x in xs])
        eager = [mod(x) for x in xs]
        for x, ref in zip(xs, eager, strict=True):
            check(ref, reference(x, w, bias, "gelu"), tol, f"eager {dtype_name}")
        compiled = torch.compile(mod, dynamic=False, fullgraph=True)
        for x, ref in zip(xs, eager, strict=True):
            torch.testing.assert_close(compiled(x), ref, atol=0, rtol=0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for x in xs:
                compiled(x)
        assert counters["stats"]["unique_graphs"] == 2
        x = xs[1]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            mod(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = mod(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(y, mod(x), atol=0, rtol=0)
    torch._dynamo.reset()


def test_triton_op_opcheck_and_inlined_under_compile():
    """superblock::bsr_linear_triton passes opcheck, and a compiled BlockSparseLinear launches our tiled kernel from
    inductor's own code (no call into the opaque custom op), with the eager outputs."""
    from torch._inductor.utils import run_and_get_code

    w = random_weight(1024, 768, (64, 64), 0.1, torch.bfloat16, 29)
    values, crow, col = dense_to_bsr(w, 64)
    bias = torch.randn(1024, device="cuda").bfloat16()
    x = torch.randn(2, 197, 768, device="cuda").bfloat16()
    args = (x, values, crow, col, None, bias, 1024, "gelu", "ieee", [64, 1, 4, 2, 0])
    torch.library.opcheck(torch.ops.superblock.bsr_linear_triton.default, args)
    check(torch.ops.superblock.bsr_linear_triton(*args), reference(x, w, bias, "gelu"), 1e-2, "triton op")
    mod = BlockSparseLinear.from_dense(w, bias, 64, activation="gelu", backend="triton")
    with torch.no_grad():
        mod.prepare(x.shape[0] * x.shape[1])
        for entry in mod.dispatch.values():  # the tiled kernel (a TMA pick would stay an opaque op)
            entry["config"] = {**entry["config"], "TMA": False}
        mod._plans.clear()
        ref = mod(x)
        torch._dynamo.reset()
        y, code = run_and_get_code(torch.compile(mod, dynamic=False, fullgraph=True), x)
    source = "\n".join(code)
    assert "_bsr_linear_kernel" in source and "superblock.bsr_linear.default" not in source
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    torch._dynamo.reset()


def test_attention_with_dense_projections_matches_mha_fast_path():
    """Block-sparse attention whose projections run dense uses torch's fused MHA kernel: same output as
    nn.MultiheadAttention's fast path (bf16, CUDA)."""
    mha = nn.MultiheadAttention(768, 12, batch_first=True).cuda().bfloat16().eval()
    smha = BlockSparseMultiheadAttention.from_mha(mha, 64, backend="dense").eval()
    x = torch.randn(8, 197, 768, device="cuda").bfloat16()
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(smha(x, x, x)[0], ref, atol=0, rtol=0)
