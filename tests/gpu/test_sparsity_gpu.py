"""GPU checks of the sparsity core (run on the device: python -m pytest -m gpu tests/gpu)."""

import pytest
import torch
import torchvision

from superblock import fold_masks, get_controller, mask_parameters, sparsify

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def test_training_step_never_syncs_with_the_host():
    model = torchvision.models.vit_b_16(image_size=64, num_classes=10).cuda()
    sparsify(model, sparsity=0.9, block_size=32, targets=["mlp", "attn"])
    ids = {id(p) for p in mask_parameters(model)}
    opt = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if id(p) not in ids]}, {"params": mask_parameters(model)}],
        fused=True,
    )
    x = torch.randn(4, 3, 64, 64, device="cuda")
    y = torch.randint(0, 10, (4,), device="cuda")
    ctrl = get_controller(model)
    for _ in range(2):  # warm up allocator / lazy init outside the checked region
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ctrl.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            ctrl.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_fused_adamw_updates_refresh_masks_and_fold_matches():
    model = torchvision.models.vit_b_16(image_size=64, num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head: no gradient would flow
    model = model.cuda()
    sparsify(model, sparsity=0.5, block_size=32, targets=["mlp", "attn"])
    opt = torch.optim.AdamW(mask_parameters(model), lr=1.0, fused=True)
    scores_before = [p.detach().clone() for p in mask_parameters(model)]
    x = torch.randn(2, 3, 64, 64, device="cuda")
    masks_before = [m.mask.clone() for m in (p for p in model.modules() if hasattr(p, "scores"))]
    model(x).square().sum().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(scores_before, mask_parameters(model), strict=True))
    model.eval()
    with torch.no_grad():
        masked = model(x)
    masks_after = [m.mask for m in (p for p in model.modules() if hasattr(p, "scores"))]
    changed = any(not torch.equal(a, b) for a, b in zip(masks_before, masks_after, strict=True))
    assert changed, "masks did not follow a fused AdamW update of the scores (version counter not bumped?)"
    fold_masks(model)
    with torch.no_grad():
        folded = model(x)
    # Same weights, but cuDNN/cuBLAS may pick other algorithms for the two graphs: compare at fp32-TF32 tolerance.
    torch.testing.assert_close(folded, masked, atol=1e-3, rtol=1e-3)
