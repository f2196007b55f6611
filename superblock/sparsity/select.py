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
its mask did. A block row's costs depend only on its own removals, so every row's sequence is computed for all rows
at once (batched matrix products, one step per removal from each row, on a GPU a few dozen steps a weight) and the
whole weight's greedy order is the merge of the rows' sequences. The weights the removals leave are the
least-squares refit of the kept tiles damped toward the dense weights: `refit_rows(..., toward_dense=True)` in
superblock.sparsity.reconstruct gives them; the tiles' scores are reordered so that a top-k of them keeps exactly
these tiles.
"""

from __future__ import annotations

import torch

from superblock.sparsity.blocks import BlockSize

SELECTIONS = ("scores", "output_error")  # which tiles a refit keeps: the scores' top-k, or its own greedy choice
MEMORY_LIMIT = 8 * 2**30  # bytes of per-block-row inverse Gram matrices one weight may hold (float64)


def check_memory(shape: tuple[int, int] | torch.Size, tiles: tuple[int, int] | torch.Size, block: BlockSize) -> None:
    """Raise before any work if one weight's selection would hold more than MEMORY_LIMIT of inverse Gram matrices
    (one per block row, over its padded inputs, float64; the removals hold a second copy while they shrink them)."""
    need = 2 * tiles[0] * (tiles[1] * block[1]) ** 2 * 8
    if need > MEMORY_LIMIT:
        raise ValueError(
            f"sparsity.select=output_error would hold {need / 2**30:.1f} GiB of inverse Gram matrices for a "
            f"{tuple(shape)} weight ({tiles[0]} block rows of {shape[1]} inputs); use sparsity.select=scores (or "
            "taller tiles: fewer block rows)"
        )


class RowRemovals:
    """Every block row's greedy removal sequence, computed for all rows at once: each `step()` drops, in every row,
    the kept tile whose removal costs that row least and refits the row's kept weights (OBS), downdating its inverse
    Gram matrix; once a quarter of the columns held are removed, the matrices shrink to the kept inputs.
    `costs[r]` / `tiles[r]` list row r's removals so far, in order."""

    def __init__(self, w: torch.Tensor, hinv: torch.Tensor, block: BlockSize) -> None:
        self.bh, self.bw = block
        n_rows, n_cols = w.shape[0] // self.bh, w.shape[1] // self.bw
        self.w = w.view(n_rows, self.bh, -1).clone()  # (rows, bh, inputs held)
        self.hinv = hinv.expand(n_rows, -1, -1).clone()  # (rows, inputs held, inputs held)
        self.ids = torch.arange(n_cols, device=w.device).expand(n_rows, -1)  # the held tiles' columns, in order
        self.alive = torch.ones(n_rows, n_cols, dtype=torch.bool, device=w.device)
        self.eye = torch.eye(self.bw, dtype=w.dtype, device=w.device)
        self.costs: list[list[float]] = [[] for _ in range(n_rows)]
        self.tiles: list[list[int]] = [[] for _ in range(n_rows)]

    def step(self) -> None:
        rows, held = self.ids.shape
        bw = self.bw
        diag = self.hinv.view(rows, held, bw, held, bw).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
        dinv = torch.linalg.inv(torch.where(self.alive[:, :, None, None], diag, self.eye))  # removed: zero blocks
        w = self.w.view(rows, self.bh, held, bw)
        cost = torch.einsum("rhab,rabc,rhac->ra", w, dinv, w).masked_fill(~self.alive, float("inf"))
        t = cost.argmin(1)
        at = torch.arange(rows, device=t.device)
        for r, (c, tile) in enumerate(zip(cost[at, t].tolist(), self.ids[at, t].tolist(), strict=True)):
            self.costs[r].append(c)
            self.tiles[r].append(tile)
        cols = (t[:, None] * bw + torch.arange(bw, device=t.device))[:, None, :]  # (rows, 1, bw)
        hc = self.hinv.gather(2, cols.expand(rows, self.hinv.shape[1], bw))  # each row's H^-1[:, C]
        s = dinv[at, t]
        wc = self.w.gather(2, cols.expand(rows, self.bh, bw))
        self.w.baddbmm_(wc @ s, hc.transpose(1, 2), alpha=-1).scatter_(2, cols.expand(rows, self.bh, bw), 0.0)
        self.hinv.baddbmm_(hc @ s, hc.transpose(1, 2), alpha=-1)
        self.alive[at, t] = False
        kept = int(self.alive[0].sum())
        if 0 < kept <= 3 * held // 4:
            self._shrink(kept)

    def _shrink(self, kept: int) -> None:
        """Drop the removed tiles' columns (every row has removed as many)."""
        rows, bw = self.alive.shape[0], self.bw
        pos = self.alive.nonzero()[:, 1].view(rows, kept)
        self.ids, self.alive = self.ids.gather(1, pos), self.alive.gather(1, pos)
        idx = (pos[:, :, None] * bw + torch.arange(bw, device=pos.device)).reshape(rows, 1, -1)
        self.w = self.w.gather(2, idx.expand(rows, self.bh, -1))
        self.hinv = self.hinv.gather(1, idx.transpose(1, 2).expand(-1, -1, self.hinv.shape[2]))
        self.hinv = self.hinv.gather(2, idx.expand(rows, idx.shape[2], -1))


def _merge(removals: RowRemovals, count: int) -> list[tuple[int, int]]:
    """The first `count` removals of the greedy over the whole weight, as (block row, tile): the cheapest next
    removal of any row each time. A row's costs depend on its own removals only, so this is a merge of the rows'
    sequences; a row whose next cost is not computed yet stops the merge until `removals.step()` has run."""
    n_rows = len(removals.costs)
    taken = [0] * n_rows
    order: list[tuple[int, int]] = []
    while len(order) < count:
        if any(taken[r] == len(removals.costs[r]) for r in range(n_rows)):
            removals.step()
            continue
        r = min(range(n_rows), key=lambda i: (removals.costs[i][taken[i]], i))
        order.append((r, removals.tiles[r][taken[r]]))
        taken[r] += 1
    return order


def select_tiles(
    weight: torch.Tensor, tiles: torch.Tensor, block: BlockSize, gram: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy removal for `weight` (out, in) under a tile grid `tiles` (out // bh, in // bw) whose kept count it
    keeps, on inputs of Gram matrix `gram` (in, in) damped by `damping` of its mean diagonal. Returns the kept tiles
    (0/1, `tiles`' dtype) and each tile's removal step (0 = kept)."""
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
    order = _merge(RowRemovals(w, torch.linalg.inv(h), block), n_rows * n_cols - int(tiles.sum().item()))
    alive = torch.ones(n_rows, n_cols, dtype=torch.bool, device=w.device)
    step = torch.zeros(n_rows, n_cols, dtype=torch.long, device=w.device)
    for s, (r, c) in enumerate(order, start=1):
        alive[r, c] = False
        step[r, c] = s
    return alive.to(tiles.dtype), step


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
