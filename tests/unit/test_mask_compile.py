"""Masked models under torch.compile: one graph, no graph break, no recompilation, same numbers as eager.

Also the shared parametrized class that makes this possible (one class per original class, not per module):
deepcopy, fold, `parametrize.cached()` and foreign parametrizations keep working with it.
"""

import copy
import pickle

import pytest
import timm
import torch
import torch._dynamo
import torchvision
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.nn.utils import parametrize

from superblock import fold_masks, get_controller, mask_parameters, sparsify
from superblock.sparsity import iter_block_masks


def tiny_tv_vit():
    # nn.MultiheadAttention inside: its in_proj_weight is read directly, not through a Linear
    return torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )


def tiny_timm_vit():
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=5,
    )


def _optimizer(model):
    scores = {id(p) for p in mask_parameters(model)}
    rest = [p for p in model.parameters() if id(p) not in scores]
    # a large scores lr so that masks really change from step to step
    return torch.optim.SGD([{"params": rest}, {"params": mask_parameters(model), "lr": 2.0}], lr=0.05)


def _masks(model):
    return [m.mask.clone() for _, _, _, m in iter_block_masks(model)]


def _train(model, run, steps, inputs):
    opt, ctrl = _optimizer(model), get_controller(model)
    outs, masks = [], [_masks(model)]
    for i in range(steps):
        out = run(inputs[i % len(inputs)])
        out.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctrl is not None:
            ctrl.step()
        outs.append(out.detach())
        masks.append(_masks(model))
    return outs, masks


def _dynamo_breaks():
    return dict(counters["graph_break"]), dict(counters["resumes"])


@pytest.mark.parametrize("build", [tiny_tv_vit, tiny_timm_vit], ids=["torchvision", "timm"])
def test_compiled_training_matches_eager_in_one_graph_without_recompiles(build):
    torch.manual_seed(0)
    model = build()
    nn.init.normal_(model.get_submodule("heads.head" if hasattr(model, "heads") else "head").weight, std=0.5)
    sparsify(model, sparsity=0.5, block_size=16, targets=["mlp", "attn"], seed=0)
    eager = copy.deepcopy(model)
    inputs = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    steps = 4
    frames_after_first = []

    def run(x):
        out = compiled(x)
        frames_after_first.append(counter.frame_count)
        return out

    outs_c, masks_c = _train(model, run, steps, inputs)
    outs_e, masks_e = _train(eager, eager, steps, inputs)

    assert counter.frame_count == 1, f"{counter.frame_count} graphs for one input shape (graph breaks?)"
    assert frames_after_first == [1] * steps, "recompiled after the first step"
    assert _dynamo_breaks() == ({}, {})
    assert counters["stats"]["unique_graphs"] == 1
    for a, b in zip(outs_c, outs_e, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    changed = 0
    for step, (mc, me) in enumerate(zip(masks_c, masks_e, strict=True)):
        for a, b in zip(mc, me, strict=True):
            assert torch.equal(a, b), f"compiled and eager masks differ after step {step}"
        changed += any(not torch.equal(a, b) for a, b in zip(mc, masks_c[0], strict=True))
    assert changed >= 2, "masks did not change during training: the test would not see stale masks"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_compile_modes_train_without_recompiles(mode):
    torch.manual_seed(0)
    model = tiny_tv_vit()
    sparsify(model, sparsity=0.5, block_size=16, targets=["mlp", "attn"], seed=0)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode=mode)
    inputs = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    _train(model, compiled, 3, inputs)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["frames"]["total"] == 1
    assert _dynamo_breaks() == ({}, {})


def test_masked_forward_has_no_graph_break_and_recompiles_nothing_across_layers():
    """Regional compilation (each encoder layer compiled on its own, as large-model recipes do) reuses one graph
    for all identical layers: the masked attention of every layer has the same class, and a frame never breaks."""

    def frames(masked):
        torch.manual_seed(0)
        model = torchvision.models.VisionTransformer(
            image_size=16, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
        )
        if masked:
            sparsify(model, sparsity=0.5, block_size=16, targets=["mlp", "attn"])
        torch._dynamo.reset()
        counters.clear()
        counter = CompileCounterWithBackend("eager")
        for layer in model.encoder.layers:
            layer.compile(backend=counter)
        for _ in range(2):
            model(torch.randn(2, 3, 16, 16)).sum().backward()
        return counter.frame_count, _dynamo_breaks()

    dense, masked = frames(False), frames(True)
    assert masked == dense
    assert masked[1] == ({}, {})


def test_modules_share_one_parametrized_class():
    model = tiny_tv_vit()
    sparsify(model, sparsity=0.5, block_size=16, targets=["mlp", "attn"])
    layers = model.encoder.layers
    attn = [layer.self_attention for layer in layers]
    assert type(attn[0]) is type(attn[1]) and type(attn[0]).__name__ == "ParametrizedMultiheadAttention"
    assert type(layers[0].mlp[0]) is type(layers[1].mlp[0])
    assert parametrize.type_before_parametrizations(attn[0]) is nn.MultiheadAttention
    # a different original class, or other masked names, get a class of their own
    assert type(attn[0].out_proj) is not type(layers[0].mlp[0])
    other = tiny_tv_vit()
    sparsify(other, sparsity=0.5, block_size=16, targets=["mlp", "attn"])
    assert type(other.encoder.layers[0].self_attention) is type(attn[0])


def test_shared_class_survives_deepcopy_fold_and_cached():
    torch.manual_seed(0)
    model = tiny_tv_vit().eval()
    sparsify(model, sparsity=0.5, block_size=16, targets=["mlp", "attn"])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    twin = copy.deepcopy(model)
    folded = fold_masks(copy.deepcopy(model))
    assert type(folded.encoder.layers[0].self_attention) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)  # folding a copy leaves the shared class intact
        torch.testing.assert_close(twin(x), ref)
        torch.testing.assert_close(folded(x), ref, atol=1e-5, rtol=1e-5)
        # parametrize.cached(): one cache entry per module, not one per shared class
        with parametrize.cached():
            torch.testing.assert_close(model(x), ref)
    weights = [layer.self_attention.in_proj_weight for layer in model.encoder.layers]
    assert not torch.equal(weights[0], weights[1])
    with pytest.raises(RuntimeError, match="state_dict"):
        pickle.dumps(model.encoder.layers[0].self_attention)


def test_fold_with_a_foreign_parametrization_does_not_touch_other_modules():
    """A module that also carries a user's parametrization is unparametrized with torch's own remover, which edits
    the class: that must never be a class other modules (or copies) use."""

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    model = tiny_tv_vit().eval()
    parametrize.register_parametrization(model.encoder.layers[0].mlp[0], "bias", Scale())
    sparsify(model, sparsity=0.5, block_size=16, targets=["mlp", "attn"])
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    fold_masks(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
        torch.testing.assert_close(twin(x), ref)
    assert not parametrize.is_parametrized(model.encoder.layers[1].mlp[0])


def test_ema_copy_masks_follow_its_own_averaged_scores():
    """ModelEma (a deepcopy, parameters lerped, schedule position copied) needs no refresh call of its own."""
    from superblock.engine.ema import ModelEma

    torch.manual_seed(0)
    model = tiny_tv_vit()
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-inits the head: no gradient would flow
    sparsify(model, sparsity=0.5, block_size=16, targets=["mlp", "attn"], schedule="linear", ramp_steps=3)
    ema = ModelEma(model, decay=0.9)
    ema.updates = 100  # past the warm-up: the average lags the live scores
    inputs = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    opt, ctrl = _optimizer(model), get_controller(model)
    for i in range(3):
        model(inputs[i % 2]).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctrl.step()
        ema.update(model)
    ema_ctrl = get_controller(ema.module)
    assert ema_ctrl is not ctrl and ema_ctrl.step_count == ctrl.step_count == 3
    masks = _masks(ema.module)
    ema_ctrl.refresh()
    assert all(torch.equal(a, b) for a, b in zip(masks, _masks(ema.module), strict=True)), "EMA masks were stale"
    live = _masks(model)
    assert any(not torch.equal(a, b) for a, b in zip(masks, live, strict=True)), "EMA masks just copy the live ones"
    assert all(int(a.sum()) == int(b.sum()) for a, b in zip(masks, live, strict=True))


def test_multihead_attention_evaluates_each_masked_weight_once_per_forward(monkeypatch):
    """nn.MultiheadAttention reads in_proj_weight three times per training forward (fast-path checks) and more in
    eval: eager evaluates every masked tensor once per call, and keeps nothing after it."""
    from collections import Counter

    from superblock.sparsity import BlockMask

    torch.manual_seed(0)
    model = tiny_tv_vit()
    sparsify(model, sparsity=0.5, block_size=16, targets=["mlp", "attn"])
    folded = fold_masks(copy.deepcopy(model)).eval()
    calls = Counter()
    forward = BlockMask.forward

    def counting(self, weight):
        calls[id(self)] += 1
        return forward(self, weight)

    monkeypatch.setattr(BlockMask, "forward", counting)
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    assert len(calls) == 8 and set(calls.values()) == {1}
    calls.clear()
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert len(calls) == 8 and set(calls.values()) == {1}
    with torch.no_grad():
        torch.testing.assert_close(out, folded(x), atol=1e-5, rtol=1e-5)
    assert not any("_superblock_reads" in m.__dict__ for m in model.modules())


@pytest.mark.slow
def test_compiled_ddp_training_compiles_like_dense_without_recompiles(tmp_path):
    """torch.compile(DDP(model)) (as the trainer wraps it): the masked model compiles into as many graphs as the
    dense one (DDP's optimizer splits at bucket boundaries) and never recompiles after the first step."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:

        def graphs(masked):
            torch.manual_seed(0)
            model = tiny_tv_vit()
            nn.init.normal_(model.heads.head.weight, std=0.5)
            if masked:
                sparsify(model, sparsity=0.5, block_size=16, targets=["mlp", "attn"], seed=0)
            ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
            torch._dynamo.reset()
            counters.clear()
            counter = CompileCounterWithBackend("eager")
            run = torch.compile(ddp, backend=counter)
            frames = []
            _train(model, lambda x: (run(x), frames.append(counter.frame_count))[0], 4, [torch.randn(4, 3, 16, 16)])
            return counter.frame_count, frames, counters["stats"]["unique_graphs"]

        dense, masked = graphs(False), graphs(True)
        assert masked[1] == [masked[0]] * 4, "recompiled after the first step"
        assert masked[0] == dense[0] and masked[2] == dense[2]
    finally:
        dist.destroy_process_group()
