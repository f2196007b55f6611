"""Activation-aware tile scores (`sparsity.score_init=activation`): a tile's score is the RMS of its weights, each
scaled by the norm of the input feature it multiplies, measured on a few calibration batches.

A weight's magnitude alone says nothing about the scale of what it multiplies; in pretrained language models a few
input features (after RMSNorm's gain) are orders of magnitude larger than the rest, and magnitude tiles cut exactly
those columns (Wanda: Sun et al., 2023, scores |W_ij| * ||X_j||; here per tile). `input_norms` runs the model on the
batches with a forward hook on every masked module and keeps, per masked weight, sum over tokens of x_j^2 (all-reduced
across ranks, so every rank gets the same scores); `calibrate_scores` turns them into scores and refreshes the masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from superblock.sparsity.api import get_controller, iter_block_masks
from superblock.sparsity.mask import init_scores
from superblock.sparsity.targets import is_conv1d


def input_dim(module: nn.Module) -> int:
    """The stored weight's dimension that meets the input's features: 0 for GPT-2's Conv1D (stored (in, out)), else
    1 (nn.Linear's (out, in))."""
    return 0 if is_conv1d(module) else 1


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")  # fmt: skip
_MHA_INPUT = {"q_proj_weight": "query", "k_proj_weight": "key", "v_proj_weight": "value"}


def _add(sums: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    sq = x.detach().reshape(-1, x.shape[-1]).float().pow(2).sum(0)
    sums[name] = sq if name not in sums else sums[name] + sq


def _mha_call(args: tuple, kwargs: dict) -> dict:
    return {**dict(zip(_MHA_ARGS, args, strict=False)), **kwargs}  # positional, then keyword


def attention_context(mha: nn.MultiheadAttention, call: dict) -> torch.Tensor:
    """What `mha.out_proj.weight` multiplies in a call of `mha` (nn.MultiheadAttention reads that weight itself, so
    no hook on out_proj sees it): the same attention with an identity output projection, heads concatenated."""
    q, k, v = call["query"], call.get("key", call["query"]), call.get("value", call["query"])
    if mha.batch_first and q.dim() == 3:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    eye = torch.eye(mha.embed_dim, device=q.device, dtype=q.dtype)
    out, _ = F.multi_head_attention_forward(
        q, k, v, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k, mha.bias_v,
        mha.add_zero_attn, 0.0, eye, None, training=False, key_padding_mask=call.get("key_padding_mask"),
        need_weights=False, attn_mask=call.get("attn_mask"), use_separate_proj_weight=not mha._qkv_same_embed_dim,
        q_proj_weight=mha.q_proj_weight, k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight,
        is_causal=bool(call.get("is_causal", False)),
    )  # fmt: skip
    return out


def _hook(
    owners: dict[int, nn.MultiheadAttention], name: str, module: nn.Module, pname: str, add: Callable
) -> torch.utils.hooks.RemovableHandle:
    """The hook that sees what one masked weight multiplies and hands it to `add(name, x)`: its module's input, or
    for nn.MultiheadAttention's projections the attention's inputs (in_proj) or context (out_proj, found in
    `owners`: id(out_proj) -> its attention), taken from the attention's own call."""
    owner = owners.get(id(module))
    if owner is not None:
        return owner.register_forward_pre_hook(
            lambda mha, a, kw: add(name, attention_context(mha, _mha_call(a, kw))), with_kwargs=True
        )
    if isinstance(module, nn.MultiheadAttention):  # the query for in_proj_weight (self-attention: q = k = v)
        key = _MHA_INPUT.get(pname, "query")
        return module.register_forward_pre_hook(lambda _m, a, kw: add(name, _mha_call(a, kw)[key]), with_kwargs=True)
    return module.register_forward_hook(lambda _m, inputs, _out: add(name, inputs[0]))


@contextmanager
def watch_inputs(model: nn.Module, add: Callable[[str, torch.Tensor], object]) -> Iterator[None]:
    """Within the block, every forward call hands what each masked weight of `model` multiplies to `add(name, x)`
    (x: (..., in_features), the name of the masked weight as iter_block_masks gives it)."""
    owners = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    hooks = [_hook(owners, name, module, pname, add) for name, module, pname, _ in iter_block_masks(model)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def input_norms(
    model: nn.Module,
    batches: Iterable,
    forward: Callable[[nn.Module, object], object],
    reduce: Callable[[torch.Tensor], object] | None = None,
) -> dict[str, torch.Tensor]:
    """{masked weight name: sum over the batches' tokens of each input feature squared} (float32, the weight's
    device). `forward(model, batch)` runs one batch; `reduce` (e.g. an all-reduce sum) is applied to each total."""
    sums: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with watch_inputs(model, lambda name, x: _add(sums, name, x)):
            for batch in batches:
                forward(model, batch)
    finally:
        model.train(was_training)
    if reduce is not None:
        for total in sums.values():
            reduce(total)
    return sums


def activation_scores(weight: torch.Tensor, block, squares: torch.Tensor, dim: int) -> torch.Tensor:
    """Tile RMS of the weight with each input feature scaled by its norm (sqrt of `squares`): the scores."""
    scale = squares.sqrt().to(torch.float32)
    return init_scores(weight.float() * (scale[None, :] if dim == 1 else scale[:, None]), block, "magnitude")


@torch.no_grad()
def calibrate_scores(
    model: nn.Module,
    batches: Iterable,
    forward: Callable[[nn.Module, object], object],
    reduce: Callable[[torch.Tensor], object] | None = None,
    followers: Iterable[nn.Module] = (),
) -> int:
    """Set every mask's scores from activation-aware tile magnitudes measured on `batches`, copy them into
    `followers` (an EMA copy: same masked weights in the same order) and refresh the masks. Returns the number of
    calibrated weights."""
    squares = input_norms(model, batches, forward, reduce)
    masks = list(iter_block_masks(model))
    missing = [name for name, *_ in masks if name not in squares]
    if missing:
        raise ValueError(
            f"calibration never ran these masked weights (no input reached them): {missing[:3]}. A module that reads "
            "a weight without calling its layer cannot be measured: leave those weights out of sparsity.targets, or "
            "use sparsity.score_init=magnitude"
        )
    for name, module, pname, mask in masks:
        weight = module.parametrizations[pname].original
        dim = input_dim(module)
        mask.scores.copy_(activation_scores(weight, mask.block, squares[name].to(weight.device), dim))
    for follower in followers:
        for (_, _, _, live), (_, _, _, copy) in zip(masks, iter_block_masks(follower), strict=True):
            copy.scores.copy_(live.scores)
    for m in (model, *followers):
        controller = get_controller(m)
        if controller is not None:
            controller.refresh(force=True)
    return len(masks)
