"""sparsity.reconstruct: the kept tiles of every masked weight refit by least squares to the dense outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from superblock import sparsify
from superblock.sparsity import get_controller, iter_block_masks
from superblock.sparsity.blocks import expand_blocks
from superblock.sparsity.reconstruct import (
    DAMPING,
    group_key,
    output_error,
    reconstruct_weights,
    refit_rows,
)


def _correlated(n: int, width: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are correlated (as a network's are): what a refit can use."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width // 2, generator=g) @ torch.randn(width // 2, width, generator=g) + 0.1 * torch.randn(
        n, width, generator=g
    )


def test_refit_rows_solves_each_block_row_by_damped_least_squares():
    torch.manual_seed(0)
    w, x = torch.randn(8, 16), _correlated(200, 16)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)  # (8/4) x (16/4) tiles of 4 x 4
    gram = x.double().T @ x.double()
    new = refit_rows(w, mask, (4, 4), gram)
    keep = expand_blocks(mask.bool(), w.shape, (4, 4))
    torch.testing.assert_close(new[~keep], w[~keep].double())  # masked entries are left as they were
    lam = DAMPING * gram.diagonal().mean()
    for start, cols in ((0, [0, 1, 2, 3, 8, 9, 10, 11]), (4, [12, 13, 14, 15])):
        # the same fit from the normal equations' other form: min ||X W_r^T - X_K V^T||^2 + lam ||V||^2
        xk = x[:, cols].double()
        a = torch.cat([xk, lam.sqrt() * torch.eye(len(cols), dtype=torch.float64)])
        b = torch.cat([x.double() @ w[start : start + 4].double().T, torch.zeros(len(cols), 4, dtype=torch.float64)])
        expect = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(new[start : start + 4, cols], expect)
    before = output_error(w, w * keep, gram)
    after = output_error(w, new * keep, gram)
    assert after < 0.5 * before  # correlated inputs: the kept columns take back most of what was cut


class Stack(nn.Module):
    """Two numbered blocks of two layers each (named like a transformer's `layers.0.*`)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)) for _ in range(2)
        )

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def _sparse_stack(level: float = 0.5, block=(16, 8)) -> tuple[Stack, Stack]:
    torch.manual_seed(0)
    dense = Stack()
    model = Stack()
    model.load_state_dict(dense.state_dict())
    sparsify(model, sparsity=level, block_size=block, targets=["*.0.weight", "*.2.weight"], score_init="magnitude",
             schedule="constant")  # fmt: skip
    return dense, model


def test_reconstruction_brings_a_masked_network_back_toward_its_dense_outputs():
    dense, model = _sparse_stack()
    batches = [(_correlated(64, 32, seed=s),) for s in range(3)]
    held_out = _correlated(256, 32, seed=9)
    with torch.no_grad():
        target = dense(held_out)
        err_before = (model(held_out) - target).pow(2).mean()
    masks_before = {n: m.mask.clone() for n, _, _, m in iter_block_masks(model)}
    cut_before = {n: mod.parametrizations[p].original.detach().clone() for n, mod, p, _ in iter_block_masks(model)}
    follower = Stack()
    sparsify(follower, sparsity=0.5, block_size=(16, 8), targets=["*.0.weight", "*.2.weight"], schedule="constant")
    calls = []
    model.layers[1][0].register_forward_pre_hook(lambda *_: calls.append(1))
    done = reconstruct_weights(model, batches, lambda m, b: m(b[0]), followers=[follower])
    assert len(calls) == 1 + 0 + 3  # the order pass; layers.0's passes stop before layers.1; then layers.1's
    with torch.no_grad():
        err_after = (model(held_out) - target).pow(2).mean()
    assert done.weights == 4 and done.groups == 2  # layers.0 and layers.1, in forward order
    assert done.error_after < done.error_before
    assert err_after < 0.97 * err_before  # also on inputs the refit never saw (random weights: little to take back)
    for name, mod, pname, mask in iter_block_masks(model):
        assert torch.equal(mask.mask, masks_before[name])  # the masks are not touched
        w = mod.parametrizations[pname].original
        keep = expand_blocks(mask.mask.bool(), w.shape, mask.block)
        assert torch.equal(w[~keep], cut_before[name][~keep])  # masked tiles keep their pretrained weights
        assert not torch.equal(w[keep], cut_before[name][keep])
    for (_, a, pa, _), (_, b, pb, _) in zip(iter_block_masks(model), iter_block_masks(follower), strict=True):
        assert torch.equal(a.parametrizations[pa].original, b.parametrizations[pb].original)  # the EMA copy follows


def test_a_weight_that_keeps_every_tile_is_left_as_it_is():
    """A level-0 override (SmolLM2's first two layers stay dense) gives its dense outputs already: the ridge refit
    would only shrink its weights. It is not refit, not counted, and its block gets no measuring passes."""
    torch.manual_seed(0)
    model = Stack()
    sparsify(model, sparsity=0.5, block_size=(16, 8), targets=["*.0.weight", "*.2.weight"], score_init="magnitude",
             schedule="constant", level_overrides=[{"match": "layers.0.*", "level": 0.0}])  # fmt: skip
    weights = {n: mod.parametrizations[p].original.detach().clone() for n, mod, p, _ in iter_block_masks(model)}
    calls = []
    model.layers[0][0].register_forward_pre_hook(lambda *_: calls.append(1))
    batches = [(_correlated(64, 32, seed=s),) for s in range(3)]
    done = reconstruct_weights(model, batches, lambda m, b: m(b[0]))
    assert done.weights == 2 and done.groups == 1
    assert len(calls) == 1 + 3  # the order pass, then layers.1's passes (through layers.0); none for layers.0
    for name, mod, pname, _ in iter_block_masks(model):
        same = torch.equal(mod.parametrizations[pname].original, weights[name])
        assert same == name.startswith("layers.0."), name


def test_a_refit_on_fewer_tokens_than_inputs_says_so():
    """24 calibration tokens for weights of 32 and 64 inputs: the Gram matrices are singular, the refit matches
    them exactly and generalises poorly (SmolLM2's CPU smoke run: 256 tokens, 1,536 inputs, perplexity 600,000)."""
    _, model = _sparse_stack()
    few = [(_correlated(8, 32, seed=s),) for s in range(3)]
    with pytest.warns(RuntimeWarning, match="saw 24 calibration tokens for a weight with 64 inputs"):
        reconstruct_weights(model, few, lambda m, b: m(b[0]))
    _, model = _sparse_stack()
    with pytest.warns(RuntimeWarning, match="saw 48 calibration tokens for a weight with 64 inputs"):  # all ranks
        reconstruct_weights(model, few, lambda m, b: m(b[0]), reduce=lambda t: t.mul_(2))
    _, model = _sparse_stack()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reconstruct_weights(model, few, lambda m, b: m(b[0]), reduce=lambda t: t.mul_(3))  # 72 of 64: enough


def test_later_groups_are_fitted_through_the_refit_earlier_ones():
    """Group by group: the second block's inputs come from the first block already refit and masked, so reducing
    the Gram matrices of a second rank (here: doubling every one) changes nothing but the scale."""
    _, a = _sparse_stack()
    _, b = _sparse_stack()
    batches = [(_correlated(64, 32, seed=s),) for s in range(2)]
    reconstruct_weights(a, batches, lambda m, x: m(x[0]))
    reconstruct_weights(b, batches, lambda m, x: m(x[0]), reduce=lambda t: t.mul_(2))
    for (_, ma, pa, _), (_, mb, pb, _) in zip(iter_block_masks(a), iter_block_masks(b), strict=True):
        torch.testing.assert_close(ma.parametrizations[pa].original, mb.parametrizations[pb].original)


def test_group_keys_follow_numbered_blocks():
    assert group_key("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert group_key("blocks.11.attn.qkv.weight") == "blocks.11"
    assert group_key("encoder.layers.encoder_layer_2.mlp.0.weight") == "encoder.layers.encoder_layer_2"
    assert group_key("head.weight") == "head.weight"


@pytest.mark.parametrize("select", ["scores", "output_error"])
def test_a_gpt2_conv1d_weight_is_refit_in_its_stored_transpose(select):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=32, vocab_size=97)
    torch.manual_seed(0)
    dense = transformers.GPT2LMHeadModel(cfg).eval()
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.load_state_dict(dense.state_dict())
    sparsify(model, sparsity=0.5, block_size=(32, 16), targets=["mlp", "attn"], schedule="constant")
    ids = [torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    held = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        target = dense(held).logits
        before = (model(held).logits - target).pow(2).mean()
        done = reconstruct_weights(model, [(i,) for i in ids], lambda m, b: m(b[0]), select=select)
        after = (model(held).logits - target).pow(2).mean()
    assert done.weights == 8 and done.groups == 2
    assert after < before
    chosen = [m.mask.clone() for *_, m in iter_block_masks(model)]
    get_controller(model).refresh(force=True)  # the stored (in, out) scores give the chosen tiles back
    assert all(torch.equal(m.mask, c) for (*_, m), c in zip(iter_block_masks(model), chosen, strict=True))


def test_a_group_is_measured_dense_through_the_refit_groups_before_it():
    """Within a group every weight is fitted to the inputs the group gives with its own weights dense (SparseGPT's
    sequential measure); the next group's inputs come through this group as refit and masked."""
    dense, model = _sparse_stack()
    batches = [(_correlated(64, 32, seed=s),) for s in range(2)]
    x = torch.cat([b[0] for b in batches])
    second, nxt = model.layers[0][2], model.layers[1][0]  # second reads GELU(layers.0.0 x) with layers.0.0 dense
    w2, w_next = (m.parametrizations.weight.original.detach().clone() for m in (second, nxt))
    m2, m_next = second.parametrizations.weight[0], nxt.parametrizations.weight[0]
    with torch.no_grad():
        hidden = dense.layers[0][1](dense.layers[0][0](x)).double()
        reconstruct_weights(model, batches, lambda m, b: m(b[0]))
        torch.testing.assert_close(
            second.parametrizations.weight.original, refit_rows(w2, m2.mask, m2.block, hidden.T @ hidden).float()
        )
        through = (x + model.layers[0](x)).double()  # what layers.1 reads: block 0 refit and masked
        expect = refit_rows(w_next, m_next.mask, m_next.block, through.T @ through)
    torch.testing.assert_close(nxt.parametrizations.weight.original, expect.float())
