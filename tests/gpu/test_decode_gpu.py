"""GPU tests of the decode kernel (few tokens, SPLIT programs per block row) against a float64 reference.

Run on a CUDA machine: python -m pytest -m gpu tests/gpu/test_decode_gpu.py
Every output is poisoned with NaN before the kernel runs, so an unwritten element fails the test.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from superblock.kernels import BlockSparseLinear, _triton_bsr, bsr_linear, dense_to_bsr  # noqa: E402
from superblock.kernels import tuning as tuning_mod  # noqa: E402

DTYPES = {"bf16": (torch.bfloat16, 1e-2), "fp16": (torch.float16, 2e-3), "fp32": (torch.float32, 1e-5)}
# (tokens, SPLIT, bias, activation): M = 1..64 incl. ragged counts, one and several programs per block row, each
# epilogue; a handful of cases per dtype and shape, since every (block, tile, SPLIT, epilogue) is a compilation
CASES = [
    (1, 1, True, None),
    (1, 16, False, None),
    (3, 4, True, "gelu"),
    (8, 16, True, None),
    (17, 4, False, None),
    (64, 1, True, "gelu"),
    (64, 4, True, None),
]
# (out, in, block): not multiples of 128, multiples of the block; one shape with a non-square block
SHAPES = [(960, 704, (64, 64)), (736, 544, (32, 32)), (448, 320, (32, 64))]


def random_weight(out_f, in_f, block, density, dtype, seed=0):
    """Random whole blocks kept; block row 1 and the last block row empty (their outputs are the bias alone)."""
    g = torch.Generator().manual_seed(seed)
    bh, bw = block
    keep = torch.rand(out_f // bh, in_f // bw, generator=g) < density
    keep[0, 0] = True
    keep[1] = False
    keep[-1] = False
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return (torch.randn(out_f, in_f, generator=g) * mask).to("cuda", dtype)


def reference(x, w, bias=None, activation=None):
    y = x.double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    return F.gelu(y) if activation == "gelu" else y


def check(y, ref, tol, what):
    assert torch.isfinite(y).all(), f"{what}: non-finite output (an element was never written)"
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def decode_cfg(m, split, warps=4, stages=2):
    block_m = min(64, max(16, 1 << (m - 1).bit_length()))
    return {"BLOCK_M": block_m, "G": 1, "num_warps": warps, "num_stages": stages, "TMA": False, "SPLIT": split}


@pytest.mark.parametrize("reduction", ["workspace", "two_kernels"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-b{s[2][0]}x{s[2][1]}")
def test_decode_kernel_matches_float64(dtype_name, shape, reduction, monkeypatch):
    """SPLIT > 1 sums in the device's zeroed workspace (one launch) or, without one, in fp32 partials that a
    second kernel reduces; both against float64, and the workspace is left zeroed."""
    if reduction == "two_kernels":
        if dtype_name != "bf16":
            pytest.skip("the reduction path does not depend on the dtype: bf16 only")
        monkeypatch.setattr(_triton_bsr, "WORKSPACE_MAX", 0)
    dtype, tol = DTYPES[dtype_name]
    out_f, in_f, block = shape
    w = random_weight(out_f, in_f, block, 0.3, dtype, seed=out_f)
    values, crow, col = dense_to_bsr(w, block)
    bias = torch.randn(out_f, device="cuda").to(dtype)
    for m, split, with_bias, act in CASES:
        x = torch.randn(m, in_f, device="cuda").to(dtype)
        b = bias if with_bias else None
        out = torch.full((m, out_f), float("nan"), device="cuda", dtype=dtype)
        bsr_linear(x, values, crow, col, (out_f, in_f), b, act, "triton", config=decode_cfg(m, split), out=out)
        check(out, reference(x, w, b, act), tol, f"{dtype_name} M={m} SPLIT={split} bias={with_bias} {act}")
    # a token tile smaller than M (several tiles, each reading the weight)
    x = torch.randn(40, in_f, device="cuda").to(dtype)
    y = bsr_linear(x, values, crow, col, (out_f, in_f), bias, None, "triton", config=decode_cfg(16, 4))
    check(y, reference(x, w, bias), tol, f"{dtype_name} M=40 BLOCK_M=16")
    torch.cuda.synchronize()
    for sums, counters in _triton_bsr._workspaces.values():
        assert sums.abs().sum().item() == 0 and counters.abs().sum().item() == 0, "workspace left dirty"


@pytest.mark.parametrize("reduction", ["workspace", "two_kernels"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-b{s[2][0]}x{s[2][1]}")
def test_balanced_decode_matches_float64(shape, reduction, monkeypatch):
    """BAL: programs per block row by that row's kept blocks, on a weight whose rows differ in length (row 0 keeps
    every block, row 1 and the last none), eager and replayed from a CUDA graph, against float64."""
    from superblock.timing import capture_graph

    if reduction == "two_kernels":
        monkeypatch.setattr(_triton_bsr, "WORKSPACE_MAX", 0)
    dtype, tol = DTYPES["bf16"]
    out_f, in_f, block = shape
    w = random_weight(out_f, in_f, block, 0.3, dtype, seed=out_f)
    w[: block[0]] = torch.randn(block[0], in_f, device="cuda").to(dtype)
    values, crow, col = dense_to_bsr(w, block)
    bias = torch.randn(out_f, device="cuda").to(dtype)
    for m, bal, act in ((1, 1, None), (3, 2, "gelu"), (17, 4, None)):
        cfg = {**decode_cfg(m, 2), "BAL": bal}
        x = torch.randn(m, in_f, device="cuda").to(dtype)
        out = torch.full((m, out_f), float("nan"), device="cuda", dtype=dtype)
        bsr_linear(x, values, crow, col, (out_f, in_f), bias, act, "triton", config=cfg, out=out)
        check(out, reference(x, w, bias, act), tol, f"M={m} BAL={bal} {act}")
        out.fill_(float("nan"))
        call = (x, values, crow, col, (out_f, in_f), bias, act, "triton")
        graph = capture_graph(lambda call=call, cfg=cfg, out=out: bsr_linear(*call, config=cfg, out=out))
        graph.replay()
        check(out, reference(x, w, bias, act), tol, f"M={m} BAL={bal} {act}, CUDA graph")
    torch.cuda.synchronize()
    for sums, counters in _triton_bsr._workspaces.values():
        assert sums.abs().sum().item() == 0 and counters.abs().sum().item() == 0, "workspace left dirty"


def test_tuning_measures_the_decode_kernel(tmp_path, monkeypatch):
    """`auto` at one token measures the decode configurations next to the tiled kernel and dense (both targets),
    and whatever it picks is correct."""
    monkeypatch.setenv("SUPERBLOCK_CACHE_DIR", str(tmp_path))
    tuning_mod.clear_tuning()
    w = random_weight(4096, 4096, (64, 64), 0.1, torch.bfloat16, 3)
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    for target in ("eager", "graph"):
        mod = BlockSparseLinear.from_dense(w, None, 64)
        mod.tuning_target = target
        with torch.no_grad():
            mod.prepare(1)
            check(mod(x), reference(x, w), 1e-2, f"auto ({target})")
        scope = tuning_mod.scope_for()
        key = tuning_mod.problem_key(
            1, 4096, 4096, 64, 64, mod.values.shape[0], torch.bfloat16, "ieee", False, None, target
        )
        entry = tuning_mod.lookup(scope, key)
        labels = list(entry["gpu_us"])
        assert any("SPLIT=" in k for k in labels) and any("SPLIT=" not in k for k in labels), labels
        assert "dense" in entry["times_us"]
    tuning_mod.clear_tuning()


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("split", [1, 8])
def test_decode_under_cuda_graph_and_compile(split):
    """Two decode layers in sequence (through BlockSparseLinear and the custom op; with SPLIT 8 they share the
    workspace) inside a CUDA graph and under torch.compile (fullgraph, inductor and reduce-overhead) give the
    eager output (up to the order of fp32 atomic sums), with no recompilation."""
    from torch._dynamo.utils import counters

    dtype = torch.bfloat16
    w1 = random_weight(1536, 1024, (64, 64), 0.15, dtype, 11)
    w2 = random_weight(1024, 1536, (64, 64), 0.15, dtype, 12)
    bias = torch.randn(1536, device="cuda").to(dtype)
    model = torch.nn.Sequential(
        BlockSparseLinear.from_dense(w1, bias, 64, activation="gelu", backend="triton"),
        BlockSparseLinear.from_dense(w2, None, 64, backend="triton"),
    )
    for mod in model:
        mod.dispatch[16] = {"backend": "triton", "config": decode_cfg(1, split), "precision": "ieee"}
    xs = [torch.randn(1, 1, 1024, device="cuda").to(dtype) for _ in range(3)]

    def close(y, ref, what):
        torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2, msg=what)

    with torch.no_grad():
        eager = [model(x) for x in xs]
        for x, ref in zip(xs, eager, strict=True):
            check(ref, reference(F.gelu(reference(x, w1, bias)).to(dtype), w2), 2e-2, "eager")
        x = xs[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = model(x)
        for xi, ref in zip(xs, eager, strict=True):
            x.copy_(xi)
            graph.replay()
            close(y, ref, "graph replay")
        # a failure under reduce-overhead ("tensor(s) in the cudagraph pool not tracked as outputs") then names the
        # allocation's stack: what our code created during warm-up or capture and kept
        from torch._inductor import config as inductor_config

        with inductor_config.patch({"triton.cudagraph_trees_history_recording": True}):
            _compiled_modes_match(model, xs, eager, close, counters)


def _compiled_modes(under_sanitizer: bool) -> tuple[str, ...]:
    """torch.compile modes the test runs: not reduce-overhead under compute-sanitizer, where launch frames outlive
    their calls and keep tensors of the graph pool alive (scripts/sanitize_kernels.sh); everywhere else both."""
    return ("default",) if under_sanitizer else ("default", "reduce-overhead")


def _compiled_modes_match(model, xs, eager, close, counters) -> None:
    with torch.no_grad():
        for mode in _compiled_modes(os.environ.get("SUPERBLOCK_UNDER_SANITIZER") == "1"):
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(model, fullgraph=True, dynamic=False, mode=mode)
            for _ in range(2):
                for xi, ref in zip(xs, eager, strict=True):
                    close(compiled(xi).clone(), ref, mode)
            assert counters["stats"]["unique_graphs"] == 1, mode
            assert not counters["recompiles"], mode
