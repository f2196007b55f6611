"""Tiles chosen by the output error their removal leaves once the rest is refit (`sparsity.select=output_error`).

A score ranks tiles by what they hold (activation-aware: weights times their inputs' norms) and the refit then makes
up for the removed ones with the kept. That ranking ignores the refit: a tile whose inputs are correlated with kept
inputs costs little once the row is refit, however large it is. This module ranks tiles by what their removal costs
after the refit, the Optimal Brain Surgeon rule on a group of inputs (Hassibi & Stork 1993; Frantar & Alistarh's
OBC / SparseGPT do it for single weights and N:M groups): with H the Gram matrix of the layer's inputs (damped) and
H^-1 its inverse over the inputs a block row still keeps, removing the tile of input columns C from that block row
costs sum over its rows of w_C [H^-1]_CC^-1 w_C^T in output error, and the row's other kept weights move by
-w_C [H^-1]_CC^-1 [H^-1]_C,: to make up for it. Tiles are removed one at a time, the cheapest in the whole weight
first, each block row's inverse downdated after every removal of its own, until the weight keeps as many tiles as
its mask did. The weights left are the least-squares refit of the kept tiles (what `refit_rows` gives for the same
tiles, but damped toward the dense weights rather than toward zero), and the tiles' scores are reordered so that a
top-k of them keeps exactly these tiles.
"""

from __future__ import annotations

import torch

from superblock.sparsity.blocks import BlockSize, expand_blocks

SELECTIONS = ("scores", "output_error")  # which tiles a refit keeps: the scores' top-k, or its own greedy choice
MEMORY_LIMIT = 8 * 2**30  # bytes of per-block-row inverse Gram matrices one weight may hold (float64)


def removal_costs(rows: torch.Tensor, hinv: torch.Tensor, alive: torch.Tensor, width: int) -> torch.Tensor:
    """(tiles,) output error of removing each still-kept column tile of one block row `rows` (bh, in) given the
    inverse Gram `hinv` over its kept inputs; +inf for tiles already removed."""
    n = alive.numel()
    idx = torch.arange(n * width, device=rows.device).view(n, width)[alive]
    diag = hinv[idx[:, :, None], idx[:, None, :]]  # (kept tiles, width, width)
    w = rows.view(rows.shape[0], n, width)[:, alive].transpose(0, 1)  # (kept tiles, bh, width)
    cost = torch.full((n,), float("inf"), dtype=rows.dtype, device=rows.device)
    cost[alive] = torch.einsum("trb,tbc,trc->t", w, torch.linalg.inv(diag), w)
    return cost


def _remove(rows: torch.Tensor, hinv: torch.Tensor, cols: slice) -> None:
    """Drop the input columns `cols` from one block row in place: its kept weights refit, its inverse downdated."""
    sinv = torch.linalg.inv(hinv[cols, cols])
    rows -= (rows[:, cols] @ sinv) @ hinv[cols, :]
    rows[:, cols] = 0
    hinv -= hinv[:, cols] @ sinv @ hinv[cols, :]


def check_memory(shape: tuple[int, int] | torch.Size, tiles: tuple[int, int] | torch.Size, block: BlockSize) -> None:
    """Raise before any work if one weight's selection would hold more than MEMORY_LIMIT of inverse Gram matrices
    (one per block row, over its padded inputs, float64)."""
    need = tiles[0] * (tiles[1] * block[1]) ** 2 * 8
    if need > MEMORY_LIMIT:
        raise ValueError(
            f"sparsity.select=output_error would hold {need / 2**30:.1f} GiB of inverse Gram matrices for a "
            f"{tuple(shape)} weight ({tiles[0]} block rows of {shape[1]} inputs); use sparsity.select=scores (or "
            "taller tiles: fewer block rows)"
        )


def select_tiles(
    weight: torch.Tensor, tiles: torch.Tensor, block: BlockSize, gram: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy removal for `weight` (out, in) under a tile grid `tiles` (out // bh, in // bw) whose kept count it
    keeps, on inputs of Gram matrix `gram` (in, in) damped by `damping` of its mean diagonal. Returns the refit
    weight (float64; removed tiles keep `weight`'s values, as `refit_rows` leaves them), the kept tiles (0/1,
    `tiles`' dtype) and each tile's removal step (0 = kept)."""
    bh, bw = block
    n_rows, n_cols = tiles.shape
    out_f, in_f = weight.shape
    check_memory(weight.shape, tiles.shape, block)
    # Edge tiles past the weight's end are padded with zero weights and zero inputs (damped like the others).
    w = torch.zeros(n_rows * bh, n_cols * bw, dtype=torch.float64, device=weight.device)
    w[:out_f, :in_f] = weight.double()
    h = torch.zeros(n_cols * bw, n_cols * bw, dtype=torch.float64, device=weight.device)
    h[:in_f, :in_f] = gram.double()
    h.diagonal().add_(damping * gram.double().diagonal().mean().clamp_min(1e-12))
    base = torch.linalg.inv(h)
    hinv = [base.clone() for _ in range(n_rows)]
    alive = torch.ones(n_rows, n_cols, dtype=torch.bool, device=w.device)
    cost = torch.stack([removal_costs(w[r * bh : (r + 1) * bh], hinv[r], alive[r], bw) for r in range(n_rows)])
    step = torch.zeros(n_rows, n_cols, dtype=torch.long, device=w.device)
    for s in range(1, n_rows * n_cols - int(tiles.sum().item()) + 1):
        r, c = divmod(int(torch.argmin(cost).item()), n_cols)
        rows = w[r * bh : (r + 1) * bh]
        _remove(rows, hinv[r], slice(c * bw, (c + 1) * bw))
        alive[r, c] = False
        step[r, c] = s
        cost[r] = removal_costs(rows, hinv[r], alive[r], bw)
    keep = expand_blocks(alive, weight.shape, block)
    return torch.where(keep, w[:out_f, :in_f], weight.double()), alive.to(tiles.dtype), step


def reorder_scores(scores: torch.Tensor, kept: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The same score values, reassigned so their order is the selection's: every kept tile above every removed
    one (kept tiles in their old order, removed ones the later removed the higher). A layer's set of values, so its
    mean and spread, does not change (but for a nudge where values tie at the boundary), and a top-k of as many
    tiles as `kept` holds keeps exactly those tiles."""
    flat = scores.detach().reshape(-1).double()
    n = flat.numel()
    old_rank = torch.empty(n, dtype=torch.float64, device=flat.device)
    old_rank[torch.argsort(flat, stable=True)] = torch.arange(n, dtype=torch.float64, device=flat.device)
    key = torch.where(kept.reshape(-1).bool(), n + 1 + old_rank, step.reshape(-1).double())
    out = torch.empty_like(flat)
    out[torch.argsort(key, stable=True)] = torch.sort(flat).values
    out = out.to(scores.dtype)
    keep = kept.reshape(-1).bool()
    if keep.any() and not keep.all():  # equal values at the boundary: lift the kept ones just above it
        top = out[~keep].max()
        out[keep & (out <= top)] = torch.nextafter(top, torch.tensor(float("inf"), dtype=out.dtype, device=out.device))
    return out.view(scores.shape)
