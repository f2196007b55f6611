"""Fused eager kernels (Triton, CUDA) for the masked weight and its straight-through backward.

Eager PyTorch needs several passes over every weight per step for a mask: multiply, autocast's cast, and in
backward the masked gradient plus a tile-summed product for the scores, each with its own launch. One program per
tile here does:
  forward   out[tile] = weight[tile] * mask[tile] in the output dtype (the autocast dtype, when the caller asks for
            it: then autocast has nothing left to cast). Dropped tiles are written as zeros without reading the
            weight, so the masked forward reads less than a plain cast would.
  backward  grad_weight[tile] = grad[tile] * mask[tile] (in the weight's dtype) and
            grad_scores[tile] = sum(grad[tile] * weight[tile]) (fp32), from one read of grad and weight.
Used only in eager mode on CUDA: under torch.compile the plain formulation is traced and the compiler fuses it
with its neighbours. `trainer.fused_mask=false` (`set_enabled(False)`) switches this path off for the process, and
so does any failure to compile or launch a kernel (with a warning); the plain PyTorch formulation takes over.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from superblock.sparsity.blocks import BlockSize

try:  # Triton ships with CUDA builds of torch; CPU-only installs do without
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_MAX_TILE = 128 * 128  # elements per program; larger tiles would spill registers: use the plain path
_state = {"enabled": True}  # trainer.fused_mask=false turns it off (set_enabled); a kernel failure too (disable)


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def usable(weight: torch.Tensor, block: BlockSize) -> bool:
    """Whether the fused kernels serve this weight (CUDA tensor, Triton present, not disabled, tile not huge)."""
    return (
        triton is not None
        and _state["enabled"]
        and (weight.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
        and _pow2(block[0]) * _pow2(block[1]) <= _MAX_TILE
    )


def set_enabled(enabled: bool) -> None:
    """Whether masked weights may use the fused kernels in this process (the trainer sets trainer.fused_mask)."""
    _state["enabled"] = bool(enabled)


@contextmanager
def disabled() -> Iterator[None]:
    """Use the plain PyTorch formulation inside this block (A/B measurements, debugging)."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before


def disable(reason: BaseException) -> None:
    _state["enabled"] = False
    warnings.warn(
        f"superblock: fused mask kernels failed ({type(reason).__name__}: {reason}); using the plain PyTorch path",
        RuntimeWarning,
        stacklevel=3,
    )


if triton is not None:

    @triton.jit
    def _tile_offsets(r, c, rows, cols, stride_r, bh, bw, BH: tl.constexpr, BW: tl.constexpr):
        i = r * bh + tl.arange(0, BH)
        j = c * bw + tl.arange(0, BW)
        valid = ((tl.arange(0, BH) < bh) & (i < rows))[:, None] & ((tl.arange(0, BW) < bw) & (j < cols))[None, :]
        return i[:, None] * stride_r + j[None, :], valid

    @triton.jit
    def _masked_weight_kernel(
        w_ptr,
        m_ptr,
        out_ptr,
        rows,
        cols,
        n_tile_cols,
        bh,
        bw,
        stride_w,
        stride_o,
        BH: tl.constexpr,
        BW: tl.constexpr,
    ):
        tile = tl.program_id(0)
        r = tile // n_tile_cols
        c = tile % n_tile_cols
        keep = tl.load(m_ptr + tile).to(tl.float32)
        offs_w, valid = _tile_offsets(r, c, rows, cols, stride_w, bh, bw, BH, BW)
        offs_o, _ = _tile_offsets(r, c, rows, cols, stride_o, bh, bw, BH, BW)
        kept = valid & ((tl.zeros([BH, BW], dtype=tl.float32) + keep) != 0)  # dropped tile: nothing to read
        w = tl.load(w_ptr + offs_w, mask=kept, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_o, (w * keep).to(out_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _masked_weight_backward_kernel(
        g_ptr,
        w_ptr,
        m_ptr,
        gw_ptr,
        gs_ptr,
        rows,
        cols,
        n_tile_cols,
        bh,
        bw,
        stride_g,
        stride_w,
        stride_gw,
        BH: tl.constexpr,
        BW: tl.constexpr,
        GRAD_WEIGHT: tl.constexpr,
        GRAD_SCORES: tl.constexpr,
    ):
        tile = tl.program_id(0)
        r = tile // n_tile_cols
        c = tile % n_tile_cols
        keep = tl.load(m_ptr + tile).to(tl.float32)
        offs_g, valid = _tile_offsets(r, c, rows, cols, stride_g, bh, bw, BH, BW)
        if GRAD_SCORES:
            g = tl.load(g_ptr + offs_g, mask=valid, other=0.0).to(tl.float32)
            offs_w, _ = _tile_offsets(r, c, rows, cols, stride_w, bh, bw, BH, BW)
            w = tl.load(w_ptr + offs_w, mask=valid, other=0.0).to(tl.float32)
            tl.store(gs_ptr + tile, tl.sum(tl.sum(g * w, axis=1), axis=0))
        else:
            kept = valid & ((tl.zeros([BH, BW], dtype=tl.float32) + keep) != 0)
            g = tl.load(g_ptr + offs_g, mask=kept, other=0.0).to(tl.float32)
        if GRAD_WEIGHT:
            offs_gw, _ = _tile_offsets(r, c, rows, cols, stride_gw, bh, bw, BH, BW)
            tl.store(gw_ptr + offs_gw, (g * keep).to(gw_ptr.dtype.element_ty), mask=valid)


def _grid(mask: torch.Tensor) -> tuple[int]:
    return (mask.numel(),)


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, block: BlockSize, dtype: torch.dtype) -> torch.Tensor:
    """weight * expand(mask), returned in `dtype`, one kernel."""
    rows, cols = weight.shape
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    out = torch.empty((rows, cols), dtype=dtype, device=weight.device)
    bh, bw = block
    _masked_weight_kernel[_grid(mask)](
        weight,
        mask.contiguous(),
        out,
        rows,
        cols,
        mask.shape[1],
        bh,
        bw,
        weight.stride(0),
        out.stride(0),
        BH=_pow2(bh),
        BW=_pow2(bw),
    )
    return out


def masked_weight_backward(
    grad: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, block: BlockSize, grad_weight: bool, grad_scores: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad * expand(mask) in the weight's dtype, tile sums of grad * weight in fp32), one kernel."""
    rows, cols = weight.shape
    grad = grad if grad.stride(1) == 1 else grad.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    gw = torch.empty((rows, cols), dtype=weight.dtype, device=weight.device) if grad_weight else None
    gs = torch.empty(mask.shape, dtype=torch.float32, device=weight.device) if grad_scores else None
    bh, bw = block
    _masked_weight_backward_kernel[_grid(mask)](
        grad,
        weight,
        mask.contiguous(),
        gw if gw is not None else grad,
        gs if gs is not None else mask,
        rows,
        cols,
        mask.shape[1],
        bh,
        bw,
        grad.stride(0),
        weight.stride(0),
        cols,
        BH=_pow2(bh),
        BW=_pow2(bw),
        GRAD_WEIGHT=grad_weight,
        GRAD_SCORES=grad_scores,
    )
    return gw, gs
