"""The fused eager mask kernels (Triton) against the plain PyTorch formulation, run by Triton's CPU interpreter.

The kernels serve eager CUDA training; here TRITON_INTERPRET=1 runs the same kernel code on CPU tensors, in a
subprocess because the interpreter is chosen when Triton compiles the kernels (at import).
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import contextlib, torch, torchvision
    from superblock import sparsify
    from superblock.sparsity import fused, iter_block_masks
    from superblock.sparsity.blocks import apply_block_mask, tile_sum

    assert fused.usable(torch.zeros(1), (8, 8)), "interpreter not active"
    torch.manual_seed(0)
    cases = [((64, 48), (16, 16)), ((70, 50), (16, 32)), ((33, 70), (8, 8)), ((40, 44), (12, 20))]
    for shape, block in cases:
        w = torch.randn(shape)
        rows, cols = -(-shape[0] // block[0]), -(-shape[1] // block[1])
        mask = (torch.rand(rows, cols) > 0.5).float()
        mask.view(-1)[0] = 0.0
        ref = apply_block_mask(w, mask, block)
        for dtype, tol in ((torch.float32, 0.0), (torch.float16, 0.0), (torch.bfloat16, 1e-2)):
            out = fused.masked_weight(w, mask, block, dtype)
            assert out.dtype == dtype and out.shape == w.shape
            torch.testing.assert_close(out.float(), ref.to(dtype).float(), atol=tol, rtol=tol)
            assert torch.all(out[ref == 0] == 0), "dropped tiles must be exact zeros"
            g = torch.randn(shape).to(dtype)
            for need_w, need_s in ((True, True), (True, False), (False, True)):
                gw, gs = fused.masked_weight_backward(g, w, mask, block, need_w, need_s)
                if need_w:
                    assert gw.dtype == w.dtype
                    torch.testing.assert_close(gw, apply_block_mask(g.float(), mask, block), atol=0, rtol=0)
                else:
                    assert gw is None
                if need_s:
                    torch.testing.assert_close(gs, tile_sum(g.float() * w, block), atol=1e-4, rtol=1e-5)
                else:
                    assert gs is None

    # a whole masked model: fused eager path == plain path, forward and every gradient, fp32 and autocast bf16
    def run(disabled, autocast):
        torch.manual_seed(0)
        model = torchvision.models.VisionTransformer(
            image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
        )
        torch.nn.init.normal_(model.heads.head.weight)
        sparsify(model, sparsity=0.5, block_size=16, targets=["mlp", "attn"], seed=0)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        ctx = fused.disabled() if disabled else contextlib.nullcontext()
        with ctx, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
            y.float().square().mean().backward()
        return y, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    for autocast in (False, True):
        (y1, g1), (y0, g0) = run(False, autocast), run(True, autocast)
        # the interpreter converts to bf16 by truncation (CUDA rounds to nearest): one ulp per cast, compounded
        tol = 1e-1 if autocast else 1e-5
        torch.testing.assert_close(y1.float(), y0.float(), atol=tol, rtol=tol)
        assert g1.keys() == g0.keys() and any(n.endswith("scores") for n in g1)
        for n in g1:
            torch.testing.assert_close(g1[n], g0[n], atol=tol * float(g0[n].abs().max()), rtol=tol)
    print("FUSED-OK")
    """
)


def test_fused_kernels_match_plain_formulation():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "FUSED-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_fused_path_is_off_without_cuda_and_when_disabled():
    import torch

    from superblock.sparsity import fused

    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not fused.usable(torch.zeros(4, 4), (2, 2))  # CPU tensors take the plain path
    with fused.disabled():
        assert not fused.usable(torch.zeros(4, 4), (2, 2))
