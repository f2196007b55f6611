"""The sparsity core: exact kept counts, STE gradients, options, state dicts, allocation, bad input."""

import copy
import io

import pytest
import timm
import torch
import torchvision
from torch import nn

from superblock import block_sparsity, fold_masks, get_controller, mask_parameters, sparsify
from superblock.sparsity import iter_block_masks, kept_blocks, refresh_masks
from superblock.sparsity.blocks import expand_blocks, tile_sum


class Net(nn.Module):
    """Weights of awkward sizes under names that the presets recognize."""

    def __init__(self, shapes=((48, 40), (70, 48), (33, 70))):
        super().__init__()
        self.mlp = nn.ModuleList(nn.Linear(i, o) for o, i in shapes)
        self.head = nn.Linear(shapes[-1][0], 5)

    def forward(self, x):
        for layer in self.mlp:
            x = torch.relu(layer(x))
        return self.head(x)


def tiny_tv_vit(**kw):
    return torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=7,
        **kw,
    )


def masked_copy_equals(model, folded, x):
    model.eval()
    folded.eval()
    with torch.no_grad():
        return torch.allclose(model(x), folded(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.9, 0.97])
@pytest.mark.parametrize("block", [8, (4, 16), 16])
def test_exact_kept_counts_and_whole_block_zeros(sparsity, block):
    net = Net()
    report = sparsify(net, sparsity=sparsity, block_size=block, targets=["mlp"])
    assert len(report) == 3
    for row in report.rows:
        assert row.kept == kept_blocks(row.total, sparsity)
    for name, _, _, m in iter_block_masks(net):
        assert int(m.mask.sum()) == kept_blocks(m.n_blocks, sparsity)
        w = dict(net.named_modules())[name.rsplit(".", 1)[0]].weight
        bh, bw = m.block
        full = expand_blocks(m.mask, w.shape, m.block)
        assert torch.all(w[full == 0] == 0)
        # every tile is either all-zero or untouched (random init has no zeros)
        nz = tile_sum((w != 0).float(), m.block)
        sizes = tile_sum(torch.ones_like(w), m.block)
        assert torch.all((nz == 0) | (nz == sizes))
        assert bh and bw


def test_ties_are_broken_deterministically():
    net = Net()
    sparsify(net, sparsity=0.5, block_size=8, targets=["mlp"])
    for _, _, _, m in iter_block_masks(net):
        with torch.no_grad():
            m.scores.fill_(1.0)  # all tied: the lowest indices win
    refresh_masks(net)
    for _, _, _, m in iter_block_masks(net):
        flat = m.mask.reshape(-1)
        k = kept_blocks(m.n_blocks, 0.5)
        assert torch.all(flat[:k] == 1) and torch.all(flat[k:] == 0)


def test_ste_gradients():
    torch.manual_seed(3)
    lin = nn.Linear(40, 24)
    w0 = lin.weight.detach().clone()
    wrap = nn.Sequential()
    wrap.add_module("mlp", lin)
    sparsify(wrap, sparsity=0.5, block_size=(8, 16), targets=["mlp"])
    ((_, _, _, m),) = iter_block_masks(wrap)
    x = torch.randn(5, 40)
    g_out = torch.randn(5, 24)
    wrap(x).backward(g_out)
    grad_eff = g_out.t() @ x  # dL/dW_effective
    full = expand_blocks(m.mask, (24, 40), (8, 16))
    torch.testing.assert_close(lin.parametrizations.weight.original.grad, grad_eff * full)
    torch.testing.assert_close(m.scores.grad, tile_sum(grad_eff * w0, (8, 16)))


def _train_steps(model, n=3, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    ctrl = get_controller(model)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(8, 40)).pow(2).sum().backward()
        opt.step()
        ctrl.step()


def test_fixed_weight_trains_scores_only():
    net = Net(((48, 40), (30, 48)))
    sparsify(net, sparsity=0.5, block_size=8, targets=["mlp"], fixed_weight=True)
    originals = [l.parametrizations.weight.original.detach().clone() for l in net.mlp]
    scores = [s.detach().clone() for s in mask_parameters(net)]
    _train_steps(net)
    for layer, before in zip(net.mlp, originals, strict=True):
        assert not layer.parametrizations.weight.original.requires_grad
        assert torch.equal(layer.parametrizations.weight.original, before)
    assert any(not torch.equal(a, b) for a, b in zip(scores, mask_parameters(net), strict=True))


def test_fixed_mask_freezes_mask_and_trains_weights():
    net = Net(((48, 40), (30, 48)))
    sparsify(net, sparsity=0.5, block_size=8, targets=["mlp"], fixed_mask=True, score_init="magnitude")
    masks = [m.mask.clone() for _, _, _, m in iter_block_masks(net)]
    w = net.mlp[0].parametrizations.weight.original.detach().clone()
    _train_steps(net)
    assert all(not s.requires_grad for s in mask_parameters(net))
    for (_, _, _, m), before in zip(iter_block_masks(net), masks, strict=True):
        assert torch.equal(m.mask, before)
    assert not torch.equal(net.mlp[0].parametrizations.weight.original, w)


def test_freeze_after_ramp_keeps_the_masks_of_the_ramps_end():
    """freeze_after_ramp: masks follow the scores until the ramp reaches the final sparsity, then stay as they were
    at that step (weights go on training); a state dict round trip keeps the frozen masks, not ones recomputed from
    the loaded scores; refresh(force=True) still recomputes."""
    kw = dict(sparsity=0.5, block_size=8, targets=["mlp"], schedule="linear", ramp_steps=3, freeze_after_ramp=True)
    net = Net(((48, 40), (30, 48)))
    sparsify(net, **kw)
    ctrl = get_controller(net)
    assert ctrl.freeze_step == 3 and not ctrl.frozen
    _train_steps(net, n=3)
    assert ctrl.step_count == 3 and ctrl.sparsity == 0.5 and not ctrl.frozen
    at_end = [m.mask.clone() for _, _, _, m in iter_block_masks(net)]
    w = net.mlp[0].parametrizations.weight.original.detach().clone()
    for _, _, _, m in iter_block_masks(net):  # scores that would pick other tiles
        m.scores.data.copy_(-m.scores.data)
    _train_steps(net, n=2)
    assert ctrl.frozen and ctrl.step_count == 5
    assert all(torch.equal(m.mask, a) for (_, _, _, m), a in zip(iter_block_masks(net), at_end, strict=True))
    assert not torch.equal(net.mlp[0].parametrizations.weight.original, w)
    refresh_masks(net)  # the documented refresh does not unfreeze
    assert all(torch.equal(m.mask, a) for (_, _, _, m), a in zip(iter_block_masks(net), at_end, strict=True))

    other = Net(((48, 40), (30, 48)))
    sparsify(other, **kw)
    other.load_state_dict(_roundtrip(net.state_dict()))
    assert get_controller(other).frozen
    assert all(torch.equal(m.mask, a) for (_, _, _, m), a in zip(iter_block_masks(other), at_end, strict=True))
    plain = Net(((48, 40), (30, 48)))
    sparsify(plain, **{**kw, "freeze_after_ramp": False})
    with pytest.raises(ValueError, match="freeze_step"):
        plain.load_state_dict(_roundtrip(net.state_dict()))

    ctrl.refresh(force=True)
    assert any(not torch.equal(m.mask, a) for (_, _, _, m), a in zip(iter_block_masks(net), at_end, strict=True))


def test_masks_follow_scores_after_optimizer_steps():
    net = Net(((48, 40), (30, 48)))
    sparsify(net, sparsity=0.5, block_size=8, targets=["mlp"])
    (_, _, _, m), _ = iter_block_masks(net)
    mask_obj = m.mask
    target = torch.arange(m.n_blocks, dtype=torch.float32).reshape(m.scores.shape)
    opt = torch.optim.SGD([m.scores], lr=1.0)
    m.scores.grad = m.scores.detach() - target  # one SGD step lands exactly on `target`
    opt.step()
    get_controller(net).step()
    k = kept_blocks(m.n_blocks, 0.5)
    assert torch.all(m.mask.reshape(-1)[-k:] == 1) and torch.all(m.mask.reshape(-1)[:-k] == 0)
    assert m.mask is mask_obj  # updated in place: a compiled graph keeps reading the same buffer


def test_magnitude_init_keeps_largest_tiles():
    lin = nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 32) * 0.01)
        lin.weight[:8, :8] += 5.0  # tile (0, 0) dominates
        lin.weight[24:, 8:16] += 3.0  # tile (3, 1) second
    wrap = nn.Sequential()
    wrap.add_module("mlp", lin)
    sparsify(wrap, sparsity=0.875, block_size=8, targets=["mlp"], score_init="magnitude")
    mask = next(iter_block_masks(wrap))[3].mask
    assert mask.sum() == 2 and mask[0, 0] == 1 and mask[3, 1] == 1


def test_no_host_sync_in_forward(monkeypatch):
    """A forward + backward of a masked model calls nothing that reads tensor values on the host."""
    net = Net()
    sparsify(net, sparsity=0.7, block_size=8, targets=["mlp"])
    x = torch.randn(4, 40)
    net(x)

    def boom(*_a, **_k):
        raise AssertionError("host sync in forward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(x).sum().backward()
    opt.step()
    get_controller(net).step()
    net(x).sum().backward()  # the refresh in step() is sync-free too


def test_torchvision_vit_attention_masks_apply():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head; make logits informative
    dense = copy.deepcopy(model)
    report = sparsify(model, sparsity=0.9, block_size=32, targets=["mlp", "attn"])
    names = report.names
    assert len(names) == 48
    assert any(n.endswith("self_attention.in_proj_weight") for n in names)
    assert any(n.endswith("self_attention.out_proj.weight") for n in names)
    x = torch.randn(2, 3, 32, 32)
    folded = fold_masks(copy.deepcopy(model))
    # folded weights load into a vanilla model: same function as the masked one, different from the dense one
    vanilla = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    vanilla.load_state_dict(folded.state_dict())
    assert masked_copy_equals(model, vanilla, x)
    with torch.no_grad():
        assert not torch.allclose(dense.eval()(x), model(x), atol=1e-3)
    sp = block_sparsity(vanilla, 32)
    assert sp["encoder.layers.encoder_layer_3.self_attention.in_proj_weight"] == pytest.approx(0.9, abs=1e-3)
    assert sp["encoder.layers.encoder_layer_3.self_attention.out_proj.weight"] == pytest.approx(0.9, abs=1e-2)


def test_timm_vit_masks_apply():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=7)
    report = sparsify(model, sparsity=0.8, block_size=(16, 32), targets=["mlp", "attn"])
    kinds = {n.split(".", 2)[2] for n in report.names}
    assert kinds == {"attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"}
    vanilla = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=7)
    vanilla.load_state_dict(fold_masks(copy.deepcopy(model)).state_dict())
    assert masked_copy_equals(model, vanilla, torch.randn(2, 3, 32, 32))


def test_skip_head_and_first_block():
    model = tiny_tv_vit()
    all_lin = sparsify(model, targets=["all_linear"], block_size=4, skip_head=False, dry_run=True)
    assert "heads.head.weight" in all_lin.names
    default = sparsify(model, targets=["all_linear"], block_size=16, dry_run=True)
    assert "heads.head.weight" not in default.names
    skipped = sparsify(model, targets=["mlp", "attn"], block_size=16, skip_first_block=True, dry_run=True)
    assert skipped.names and not any("encoder_layer_0." in n for n in skipped.names)
    excluded = sparsify(model, targets=["mlp"], block_size=16, exclude=["*encoder_layer_1.mlp.3"], dry_run=True)
    assert excluded.names == [
        "encoder.layers.encoder_layer_0.mlp.0.weight",
        "encoder.layers.encoder_layer_0.mlp.3.weight",
        "encoder.layers.encoder_layer_1.mlp.0.weight",
    ]
    pattern = sparsify(model, targets=["encoder.layers.*.mlp.0"], block_size=16, dry_run=True)
    assert len(pattern) == 2


def test_dry_run_leaves_model_untouched():
    model = tiny_tv_vit()
    keys = set(model.state_dict())
    report = sparsify(model, sparsity=0.5, block_size=16, dry_run=True)
    assert len(report) == 8 and report.dry_run and "would mask" in str(report)
    assert set(model.state_dict()) == keys and get_controller(model) is None


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_restores_masks_and_schedule():
    kw = dict(sparsity=0.9, block_size=8, targets=["mlp"], schedule="cubic", initial_sparsity=0.2, ramp_steps=10)
    net = Net()
    sparsify(net, **kw)
    _train_steps(net, n=4)
    ctrl = get_controller(net)
    assert ctrl.step_count == 4 and 0.2 < ctrl.sparsity < 0.9
    x = torch.randn(3, 40)
    with torch.no_grad():
        ref = net(x)
    state = _roundtrip(net.state_dict())
    other = Net()
    sparsify(other, **kw)
    other.load_state_dict(state)
    assert get_controller(other).step_count == 4
    with torch.no_grad():
        torch.testing.assert_close(other(x), ref)
    for (_, _, _, a), (_, _, _, b) in zip(iter_block_masks(net), iter_block_masks(other), strict=True):
        assert torch.equal(a.mask, b.mask)
    # a different recipe refuses the state instead of silently mixing
    third = Net()
    sparsify(third, **{**kw, "schedule": "linear"})
    with pytest.raises(ValueError, match="different sparsity recipe"):
        third.load_state_dict(state)


def test_global_allocation_keeps_total_density_and_floor():
    torch.manual_seed(1)
    net = Net(((64, 64), (64, 64), (32, 64)))
    with torch.no_grad():
        net.mlp[0].weight.mul_(100)  # layer 0 dominates a magnitude ranking...
    report = sparsify(
        net,
        sparsity=0.75,
        block_size=8,
        targets=["mlp"],
        allocation="global",
        min_density=0.1,
        score_init="magnitude",
    )
    total = sum(r.total for r in report.rows)
    assert sum(r.kept for r in report.rows) == kept_blocks(total, 0.75)
    for r in report.rows:
        assert r.kept >= kept_blocks(r.total, 0.9)  # ...but every layer keeps its 10% floor
    # standardized scores: the scaled layer does not take everything
    assert report.rows[0].kept < report.rows[0].total
    with pytest.raises(ValueError, match="min_density"):
        sparsify(Net(), sparsity=0.9, block_size=8, targets=["mlp"], allocation="global", min_density=0.5)


def test_global_allocation_follows_learned_cross_layer_signal():
    """Scores that rise in one layer relative to the others win that layer more tiles (per-layer standardization by
    the live statistics would cancel this); at the start both layers get about the same share, as with layerwise."""
    torch.manual_seed(0)
    net = Net(((64, 64), (64, 64), (32, 64)))
    sparsify(net, sparsity=0.5, block_size=8, targets=["mlp.0", "mlp.1"], allocation="global", seed=0)
    ctrl = get_controller(net)
    masks = [m for _, m in ctrl.masks]
    start = [int(m.mask.sum()) for m in masks]
    assert sum(start) == 64 and abs(start[0] - start[1]) <= 4, start
    with torch.no_grad():
        masks[0].scores.add_(10 * masks[0].scores.std())  # layer 0 learned it matters more than layer 1
    ctrl.refresh()
    kept = [int(m.mask.sum()) for m in masks]
    assert sum(kept) == 64 and kept[0] > 60, kept
    resumed = Net(((64, 64), (64, 64), (32, 64)))
    sparsify(resumed, sparsity=0.5, block_size=8, targets=["mlp.0", "mlp.1"], allocation="global", seed=1)
    resumed.load_state_dict(net.state_dict())  # the reference scales travel in the checkpoint
    assert [int(m.mask.sum()) for _, m in get_controller(resumed).masks] == kept


def test_optimizer_groups_from_mask_parameters():
    net = Net()
    sparsify(net, block_size=8, targets=["mlp"])
    scores = mask_parameters(net)
    ids = {id(p) for p in scores}
    rest = [p for p in net.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": rest}, {"params": scores, "lr": 0.1, "weight_decay": 0.0}], lr=1e-3)
    assert len(scores) == 3 and len(opt.param_groups[1]["params"]) == 3


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"sparsity": 1.5}, r"\[0, 1\)"),
        ({"sparsity": 1.0}, r"\[0, 1\)"),
        ({"sparsity": -0.1}, r"\[0, 1\)"),
        ({"block_size": 0}, "positive"),
        ({"block_size": -8}, "positive"),
        ({"block_size": 512}, "larger than weight"),
        ({"targets": ["mlpp"]}, "mlpp"),
        ({"targets": ["conv_proj"]}, "2-D"),
        ({"targets": ["encoder.layers.*.ln_1"]}, "2-D"),
        ({"targets": ["nothing.*"]}, "nothing"),
        ({"exclude": ["heads.typo"]}, "heads.typo"),
        ({"targets": []}, "empty"),
        ({"allocation": "random"}, "allocation"),
        ({"score_init": "zeros"}, "score_init"),
        ({"schedule": "linear"}, "ramp_steps"),
        ({"fixed_weight": True, "fixed_mask": True}, "choose one"),
    ],
)
def test_bad_input_raises_and_leaves_model_unchanged(kwargs, msg):
    model = tiny_tv_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=msg):
        sparsify(model, **{"block_size": 16, **kwargs})
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert get_controller(model) is None


def test_double_sparsify_and_fold_of_dense_model_are_errors():
    model = tiny_tv_vit()
    with pytest.raises(ValueError, match="no block masks"):
        fold_masks(model)
    sparsify(model, block_size=16)
    with pytest.raises(ValueError, match="already sparsified"):
        sparsify(model, block_size=16)


def test_masks_follow_any_optimizer_step_even_without_version_bumps():
    """Fused optimizers update scores without bumping version counters: controller.step() refreshes anyway."""
    net = Net(((48, 40), (30, 48)))
    sparsify(net, sparsity=0.5, block_size=8, targets=["mlp"])
    (_, _, _, m), _ = iter_block_masks(net)
    net(torch.randn(2, 40))
    opt = torch.optim.SGD([m.scores], lr=1.0)
    with torch.no_grad():
        # write through .data: invisible to the version counter, like a fused kernel
        m.scores.data.copy_(torch.arange(m.n_blocks, dtype=torch.float32).reshape(m.scores.shape))
    before = m.mask.clone()
    net(torch.randn(2, 40))
    assert torch.equal(m.mask, before)  # forward never recomputes masks
    opt.step()  # no grads: parameters unchanged
    get_controller(net).step()
    k = kept_blocks(m.n_blocks, 0.5)
    assert torch.all(m.mask.reshape(-1)[-k:] == 1) and not torch.equal(m.mask, before)


def test_stale_mask_regression_refresh_masks_after_data_copy():
    """`scores.data.copy_(...)` then the documented `refresh_masks(model)` gives the new mask; forward alone never
    recomputes it, and on a dense model the call is a no-op."""
    net = Net(((48, 40), (30, 48)))
    sparsify(net, sparsity=0.75, block_size=8, targets=["mlp"])
    masks = [m for _, _, _, m in iter_block_masks(net)]
    objs = [m.mask for m in masks]
    for m in masks:
        m.scores.data.copy_(-torch.arange(m.n_blocks, dtype=torch.float32).reshape(m.scores.shape))
    refresh_masks(net)
    for m, obj in zip(masks, objs, strict=True):
        k = kept_blocks(m.n_blocks, 0.75)
        assert torch.all(m.mask.reshape(-1)[:k] == 1) and torch.all(m.mask.reshape(-1)[k:] == 0)
        assert m.mask is obj
    x = torch.randn(3, 40)
    w = net.mlp[0].weight
    assert torch.equal(w, net.mlp[0].parametrizations.weight.original * expand_blocks(masks[0].mask, w.shape, (8, 8)))
    refresh_masks(Net())  # dense: nothing to do
    net(x)


def test_load_state_dict_refreshes_masks_without_extra_call():
    """Loading a state dict gives the masks of the loaded scores and schedule position: no refresh call needed,
    also when the saved masks were stale (scores edited through .data) or the schedule moved on."""
    kw = dict(sparsity=0.8, block_size=8, targets=["mlp"], schedule="linear", initial_sparsity=0.0, ramp_steps=4)
    src = Net()
    sparsify(src, **kw)
    _train_steps(src, n=2)
    for _, _, _, m in iter_block_masks(src):
        m.scores.data.copy_(torch.randn(m.scores.shape))  # masks in the state dict are now stale
    state = _roundtrip(src.state_dict())
    refresh_masks(src)  # the reference: fresh masks of src
    dst = Net()
    sparsify(dst, **kw)
    objs = [m.mask for _, _, _, m in iter_block_masks(dst)]
    dst.load_state_dict(state)
    assert get_controller(dst).step_count == 2
    for (_, _, _, a), (_, _, _, b), obj in zip(iter_block_masks(src), iter_block_masks(dst), objs, strict=True):
        assert torch.equal(a.mask, b.mask) and b.mask is obj
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    # the hook refreshes the controller of the model it is called on: a deepcopy (EMA) refreshes its own only
    ema = copy.deepcopy(dst)
    for _, _, _, m in iter_block_masks(dst):
        m.scores.data.neg_()
    before = [m.mask.clone() for _, _, _, m in iter_block_masks(dst)]
    ema.load_state_dict(state)
    for (_, _, _, a), (_, _, _, e), (_, _, _, d), b in zip(
        iter_block_masks(src), iter_block_masks(ema), iter_block_masks(dst), before, strict=True
    ):
        assert torch.equal(a.mask, e.mask) and torch.equal(d.mask, b)


@pytest.mark.parametrize("build", ["torchvision", "timm"])
def test_eager_autocast_direct_cast_matches_plain_path(build):
    """In eager autocast the masked weight is produced directly in the autocast dtype (for weights only F.linear
    reads): same forward as masking in fp32 and letting autocast cast, same gradients."""
    torch.manual_seed(0)
    if build == "torchvision":
        model = tiny_tv_vit()
        nn.init.normal_(model.heads.head.weight)
    else:
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=7)
    sparsify(model, sparsity=0.5, block_size=16, targets=["mlp", "attn"])
    assert all(m.cast_ok for _, _, _, m in iter_block_masks(model))
    plain = copy.deepcopy(model)
    for _, _, _, m in iter_block_masks(plain):
        m.cast_ok = False
    folded = fold_masks(copy.deepcopy(model))
    x = torch.randn(3, 3, 32, 32)
    outs = []
    for net in (model, plain, folded):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
        y.float().square().mean().backward()
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (_, module, name, _), *_ = iter_block_masks(model)
        assert getattr(module, name).dtype == torch.bfloat16
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_block_overrides_give_named_weights_their_own_tiles():
    net = Net(shapes=((64, 48), (96, 64), (32, 96)))
    overrides = [{"match": "mlp.1", "block": [16, 16]}]
    report = sparsify(net, 0.5, (32, 16), targets=["mlp.*.weight"], block_overrides=overrides)
    blocks = {name: m.block for name, _, _, m in iter_block_masks(net)}
    assert blocks == {"mlp.0.weight": (32, 16), "mlp.1.weight": (16, 16), "mlp.2.weight": (32, 16)}
    assert [r.block for r in report.rows] == [(32, 16), (16, 16), (32, 16)]
    measured = block_sparsity(net, (32, 16), {"mlp.1": [16, 16]})
    assert all(measured[f"mlp.{i}.weight"] == pytest.approx(0.5) for i in range(3))


@pytest.mark.parametrize(
    ("overrides", "msg"),
    [([("mlp.9", 16)], "name no targeted weight"), ({"mlp.0": [16, -1]}, "block_overrides"), ([{"": 8}], "match")],
)
def test_block_override_mistakes_are_named_and_leave_the_model_unchanged(overrides, msg):
    net = Net()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=msg):
        sparsify(net, 0.5, 16, targets=["mlp.*.weight"], block_overrides=overrides)
    assert get_controller(net) is None
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_level_overrides_give_named_weights_their_own_sparsity_along_the_ramp():
    net = Net(shapes=((64, 48), (96, 64), (32, 96)))
    sparsify(net, 0.8, 16, targets=["mlp.*.weight"], level_overrides=[{"match": "mlp.1", "level": 0.4}],
             schedule="linear", ramp_steps=10)  # fmt: skip
    ctrl = get_controller(net)
    for step, expected in ((5, {0: 0.4, 1: 0.2, 2: 0.4}), (10, {0: 0.8, 1: 0.4, 2: 0.8})):
        ctrl.step_count = step
        measured = block_sparsity(net, 16)
        for i, level in expected.items():
            n = {0: 12, 1: 24, 2: 12}[i]  # tiles of 16 x 16
            assert measured[f"mlp.{i}.weight"] == pytest.approx(1 - kept_blocks(n, level) / n), (step, i)
    state = ctrl.get_state()
    assert state["levels"] == {"mlp.1.weight": 0.4}
    other = Net(shapes=((64, 48), (96, 64), (32, 96)))
    sparsify(other, 0.8, 16, targets=["mlp.*.weight"], schedule="linear", ramp_steps=10)
    with pytest.raises(ValueError, match="levels"):  # a checkpoint of another recipe does not resume here
        get_controller(other).set_state(state)


def test_level_total_makes_the_other_weights_carry_the_overrides_share():
    """level_total: `sparsity` is the zeroed share of all targeted weights; a dense override makes the others sparser
    by exactly what it leaves (the smollm2 recipe: layers 0-1 dense at the same total as a uniform mask)."""
    shapes = ((64, 64), (128, 64), (64, 128))  # 4,096 / 8,192 / 8,192 weights; tiles of 16 x 16
    net = Net(shapes=shapes)
    report = sparsify(net, 0.4, 16, targets=["mlp.*.weight"], level_overrides=[("mlp.0", 0.0)], level_total=True)
    assert report.sparsity == pytest.approx(0.4)  # what it reports is the total, not the others' 0.5
    measured = block_sparsity(net, 16)
    assert measured["mlp.0.weight"] == 0.0
    assert measured["mlp.1.weight"] == measured["mlp.2.weight"] == pytest.approx(0.4 * 20480 / 16384, abs=1 / 32)
    sizes = [o * i for o, i in shapes]
    total = sum(measured[f"mlp.{k}.weight"] * n for k, n in enumerate(sizes)) / sum(sizes)
    assert total == pytest.approx(0.4, abs=1 / 64)
    ctrl = get_controller(net)  # the logs' sparsity is the total too; the schedule ramps the others' level
    assert ctrl.overall_sparsity == pytest.approx(0.4) and ctrl.sparsity == pytest.approx(0.5)
    plain = Net(shapes=shapes)  # without level_total the others keep `sparsity` and the total falls short
    sparsify(plain, 0.4, 16, targets=["mlp.*.weight"], level_overrides=[("mlp.0", 0.0)])
    assert block_sparsity(plain, 16)["mlp.1.weight"] == pytest.approx(0.4, abs=1 / 32)
    assert get_controller(plain).overall_sparsity == pytest.approx(0.4 * 16384 / 20480)


@pytest.mark.parametrize(
    ("level", "overrides", "msg"),
    [
        (0.9, [("mlp.0", 0.0), ("mlp.1", 0.0)], "would need sparsity 225.0%"),
        (0.1, [("mlp.0", 0.5)], "would need sparsity 0.0%"),
        (0.5, [("mlp.*", 0.3)], "no weight is left"),
    ],
)
def test_level_total_refuses_a_total_the_other_weights_cannot_make_up(level, overrides, msg):
    net = Net(shapes=((64, 64), (128, 64), (64, 128)))
    with pytest.raises(ValueError, match=msg):
        sparsify(net, level, 16, targets=["mlp.*.weight"], level_overrides=overrides, level_total=True)
    assert get_controller(net) is None


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"level_overrides": [("mlp.9", 0.3)]}, "level_overrides pattern"),
        ({"level_overrides": {"mlp.0": 1.5}}, r"level must be a sparsity in \[0, 1\)"),
        ({"level_overrides": [{"match": "mlp.0", "block": 0.3}]}, "level_overrides entries are"),
        ({"level_overrides": {"mlp.0": 0.3}, "allocation": "global"}, "allocation='layerwise'"),
    ],
)
def test_level_override_mistakes_are_named_and_leave_the_model_unchanged(kwargs, msg):
    net = Net()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match=msg):
        sparsify(net, 0.5, 16, targets=["mlp.*.weight"], **kwargs)
    assert get_controller(net) is None
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
