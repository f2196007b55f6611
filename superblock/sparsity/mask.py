"""The learned block mask: a weight parametrization with one trainable score per tile (Supermask).

A parametrization (torch.nn.utils.parametrize) rather than a Linear subclass, so the mask applies wherever the
weight is read: `nn.MultiheadAttention` reads `in_proj_weight` and `out_proj.weight` directly, bypassing
`out_proj.forward`, and a subclass-based mask silently never applies there.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from superblock.sparsity import fused
from superblock.sparsity.blocks import BlockSize, apply_block_mask, grid_shape, tile_norms, tile_sum

if TYPE_CHECKING:
    from superblock.sparsity.controller import SparsityController

SCORE_INITS = ("kaiming", "magnitude", "activation")  # activation: magnitude until calibrated (calibrate.py)


class _MaskedWeight(torch.autograd.Function):
    """weight * expand(hard_mask) with a straight-through estimator for the scores.

    Forward uses the hard 0/1 mask; backward sends the weight grad * mask to the weight and the gradient of the
    mask (grad * weight, summed over each tile) straight through to the scores. One saved tensor (the weight, which
    is alive anyway) and no expanded mask in memory on the divisible path.

    `dtype` is the dtype of the result: the autocast dtype in eager autocast for weights that only F.linear reads
    (autocast would cast there anyway), else the weight's. In eager mode on CUDA one fused kernel does the forward
    and one the backward (superblock.sparsity.fused); elsewhere, and under torch.compile (whose compiler fuses the
    plain formulation with its neighbours), plain tensor ops do.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, block: BlockSize, dtype):
        ctx.block = block
        ctx.fused = False
        ctx.save_for_backward(weight, mask)
        if not torch.compiler.is_compiling() and fused.usable(weight, block):
            try:
                out = fused.masked_weight(weight, mask, block, dtype)
                ctx.fused = True
                return out
            except Exception as err:  # a Triton/driver problem must not stop training: plain path from now on
                fused.disable(err)
        out = apply_block_mask(weight, mask, block)
        return out if dtype == weight.dtype else out.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        need_weight, need_scores = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.fused:
            try:
                grad_weight, grad_scores = fused.masked_weight_backward(
                    grad, weight, mask, ctx.block, need_weight, need_scores
                )
                return grad_weight, grad_scores, None, None, None
            except Exception as err:
                fused.disable(err)
        grad = grad.to(weight.dtype)
        grad_weight = apply_block_mask(grad, mask, ctx.block) if need_weight else None
        grad_scores = tile_sum(grad.float() * weight.float(), ctx.block) if need_scores else None
        return grad_weight, grad_scores, None, None, None


def _result_dtype(weight: torch.Tensor) -> torch.dtype:
    """In eager autocast, the autocast dtype when it is a lower precision than the weight's; else the weight's."""
    device = weight.device.type
    if torch.compiler.is_compiling() or not torch.is_autocast_enabled(device):
        return weight.dtype
    dtype = torch.get_autocast_dtype(device)
    return dtype if weight.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16) else weight.dtype


def init_scores(
    weight: torch.Tensor, block: BlockSize, method: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Initial tile scores (float32, on the weight's device).

    kaiming: uniform(-1/sqrt(C), 1/sqrt(C)) like the reference (random mask at start);
    magnitude: RMS of each tile of the current weight, to start sparse training from a pretrained dense model;
    activation: the same until superblock.sparsity.calibrate sets them from activation-aware magnitudes.
    RMS rather than the norm so the smaller edge tiles are not penalized for their size.
    """
    rows, cols = grid_shape(weight.shape, block)
    if method == "kaiming":
        bound = 1.0 / math.sqrt(cols)
        scores = torch.rand(rows, cols, generator=generator, dtype=torch.float32)
        return (scores * 2 * bound - bound).to(weight.device)
    if method in ("magnitude", "activation"):  # activation: the trainer calibrates them before the first step
        ones = torch.ones(weight.shape, dtype=torch.float32, device=weight.device)
        return tile_norms(weight, block) / tile_sum(ones, block).sqrt()
    raise ValueError(f"unknown score_init {method!r}: use one of {SCORE_INITS}")


class BlockMask(nn.Module):
    """Parametrization W -> W * expand(mask), mask = top-k tiles of `scores` (chosen by the controller).

    `mask` is recomputed in place (same tensor object) by the controller, never inside forward.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        block: BlockSize,
        score_init: str = "kaiming",
        fixed_mask: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"block masks need a 2-D weight, got shape {tuple(weight.shape)}")
        self.block = block
        self.weight_shape = tuple(weight.shape)
        self.fixed_mask = fixed_mask
        self.scores = nn.Parameter(init_scores(weight, block, score_init, generator), requires_grad=not fixed_mask)
        self.register_buffer("mask", torch.ones(self.scores.shape, dtype=weight.dtype, device=weight.device))
        # Set by sparsify when the owning module reads the weight only through F.linear (which autocast casts
        # anyway): then eager autocast gets the masked weight directly in the autocast dtype.
        self.cast_ok = False
        self._controller: SparsityController | None = None

    @property
    def n_blocks(self) -> int:
        return self.scores.numel()

    def attach(self, controller: SparsityController) -> None:
        self._controller = controller

    # The controller's state (schedule position) travels in every mask's extra state, so the model's own
    # state dict holds it and a resumed run continues the schedule exactly.
    def get_extra_state(self) -> dict:
        return self._controller.get_state() if self._controller is not None else {}

    def set_extra_state(self, state: dict) -> None:
        if self._controller is not None and state:
            self._controller.set_state(state)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # Nothing but tensor math here: no Python state to guard on, nothing that breaks a torch.compile graph.
        # The mask buffer is kept fresh from outside (controller.step(), load_state_dict, refresh_masks).
        dtype = _result_dtype(weight) if self.cast_ok else weight.dtype
        return _MaskedWeight.apply(weight, self.scores, self.mask, self.block, dtype)

    def extra_repr(self) -> str:
        return f"shape={self.weight_shape}, block={self.block}, tiles={tuple(self.scores.shape)}"
