"""Activation-aware tile scores (`sparsity.score_init=activation`): a tile's score is the RMS of its weights, each
scaled by the norm of the input feature it multiplies, measured on a few calibration batches.

A weight's magnitude alone says nothing about the scale of what it multiplies; in pretrained language models a few
input features (after RMSNorm's gain) are orders of magnitude larger than the rest, and magnitude tiles cut exactly
those columns (Wanda: Sun et al., 2023, scores |W_ij| * ||X_j||; here per tile). `input_norms` runs the model on the
batches with a forward hook on every masked module and keeps, per masked weight, sum over tokens of x_j^2 (all-reduced
across ranks, so every rank gets the same scores); `calibrate_scores` turns them into scores and refreshes the masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from superblock.sparsity.api import get_controller, iter_block_masks
from superblock.sparsity.mask import init_scores
from superblock.sparsity.targets import is_conv1d


def _input_dim(module: nn.Module) -> int:
    """The stored weight's dimension that meets the input's features: 0 for GPT-2's Conv1D (stored (in, out)), else
    1 (nn.Linear's (out, in))."""
    return 0 if is_conv1d(module) else 1


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
    hooks = []
    for name, module, _, _ in iter_block_masks(model):

        def hook(_mod, inputs, _out, name=name) -> None:
            x = inputs[0].detach()
            sq = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)
            sums[name] = sq if name not in sums else sums[name] + sq

        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
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
            "a weight without calling its layer (torchvision's MultiheadAttention and out_proj.weight) cannot be "
            "measured: leave those weights out of sparsity.targets, or use sparsity.score_init=magnitude"
        )
    for name, module, pname, mask in masks:
        weight = module.parametrizations[pname].original
        dim = _input_dim(module)
        mask.scores.copy_(activation_scores(weight, mask.block, squares[name].to(weight.device), dim))
    for follower in followers:
        for (_, _, _, live), (_, _, _, copy) in zip(masks, iter_block_masks(follower), strict=True):
            copy.scores.copy_(live.scores)
    for m in (model, *followers):
        controller = get_controller(m)
        if controller is not None:
            controller.refresh(force=True)
    return len(masks)
