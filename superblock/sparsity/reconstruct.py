"""One-shot weight reconstruction (`sparsity.reconstruct=true`): once the masks are chosen, refit the kept tiles of
every masked weight so that its layer's output on the calibration batches matches what the dense weight gives.

Zeroing tiles of a pretrained weight removes their share of every output of those rows; the kept weights of the same
rows can take much of it back. The outputs of one block row (its `rows` outputs share one set of kept input columns
K) are fitted to the dense outputs in least squares: W'[:, K] = W H[:, K] (H[K, K] + damping I)^-1, where H = X^T X is
the Gram matrix of the inputs over the calibration tokens (the objective of SparseGPT, Frantar & Alistarh 2023; with
tiles a whole block row shares K, so it is solved exactly, not column by column). The damping is 1% of H's mean
diagonal. The weights of the masked tiles are left as they are (the mask zeroes them).

The weights are refit group by group in the order a forward pass reaches them, a group being the masked weights of
one numbered block (`model.layers.3`, `blocks.3`, `encoder_layer_3`): each group's inputs are measured with the
group itself dense and the groups before it already refit and masked, so a layer also corrects what the layers
before it lost. (Measured with its own masks on, a block's later weights are fitted to the inputs its masked, not
yet refit, earlier weights give, and the refit does not carry through: docs/frontier.md, "One shot with a refit".)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch
from torch import nn

from superblock.progress import progress_iter
from superblock.sparsity.api import iter_block_masks
from superblock.sparsity.blocks import BlockSize, expand_blocks
from superblock.sparsity.calibrate import input_dim, watch_inputs
from superblock.sparsity.select import SELECTIONS, check_memory, reorder_scores, select_tiles

DAMPING = 0.01  # of the Gram matrix's mean diagonal
_NUMBERED = re.compile(r"\d")


@dataclass
class Reconstruction:
    """What a reconstruction did: weights refit, groups (forward passes over the calibration batches), and the
    relative squared error of the masked weights' outputs on the calibration inputs against the dense weights',
    averaged over weights, before (masked only) and after the refit."""

    weights: int
    groups: int
    error_before: float
    error_after: float
    select: str = "scores"

    def __str__(self) -> str:
        how = "" if self.select == "scores" else ", tiles chosen by the output error their removal leaves"
        return (
            f"refit {self.weights} masked weights in {self.groups} groups to their dense outputs{how}: relative "
            f"output error on the calibration batches {self.error_before:.3g} -> {self.error_after:.3g}"
        )


def group_key(name: str) -> str:
    """The numbered block a weight belongs to: its name up to the first part that holds a digit
    ("model.layers.3.mlp.up_proj.weight" -> "model.layers.3"); a name without one is a group of its own."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if _NUMBERED.search(part):
            return ".".join(parts[: i + 1])
    return name


def refit_rows(
    weight: torch.Tensor, mask: torch.Tensor, block: BlockSize, gram: torch.Tensor, toward_dense: bool = False
) -> torch.Tensor:
    """`weight` (out, in) with the kept entries of every block row refit by least squares to `weight`'s own outputs
    on inputs whose Gram matrix is `gram` (in, in); masked entries unchanged. Float64 throughout. The damping pulls
    the kept weights toward zero (ridge), or with `toward_dense` toward `weight`'s own values: the minimum of
    (w' - w) (H + damping I) (w' - w)^T, what a tile selection's removals reach (superblock.sparsity.select)."""
    w = weight.double()
    h = gram.double()
    damp = DAMPING * h.diagonal().mean().clamp_min(1e-12)
    keep = expand_blocks(mask.bool(), weight.shape, block)
    new = w.clone()
    rows = block[0]
    for start in range(0, w.shape[0], rows):
        cols = keep[start].nonzero().squeeze(1)  # a block row shares one set of kept columns
        if cols.numel() == 0:
            continue
        wr = w[start : start + rows]
        hk = h[cols][:, cols]
        hk.diagonal().add_(damp)
        rhs = wr @ h[:, cols]  # (rows, k): the dense outputs' correlation with the kept inputs
        if toward_dense:
            rhs += damp * wr[:, cols]
        new[start : start + rows, cols] = torch.linalg.solve(hk, rhs.T).T
    return new


def output_error(dense: torch.Tensor, sparse: torch.Tensor, gram: torch.Tensor) -> float:
    """||(dense - sparse) X||^2 / ||dense X||^2 over the inputs whose Gram matrix is `gram` (weights (out, in))."""
    d, h = (dense - sparse).double(), gram.double()
    w = dense.double()
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


def forward_order(model: nn.Module, batch: object, forward: Callable[[nn.Module, object], object]) -> list[str]:
    """The masked weights' names in the order one forward pass of `batch` reaches them (each once)."""
    seen: dict[str, None] = {}
    with watch_inputs(model, lambda name, _x: seen.setdefault(name, None)):
        forward(model, batch)
    return list(seen)


class _GroupDone(Exception):
    """Raised from the hook of a group's last weight: the rest of that forward pass is not needed."""


class _Grams:
    """Gram matrices X^T X of the inputs of some masked weights; consecutive weights reading the same input tensor
    (q / k / v, gate / up) share the product."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.final = set(names), names[-1]
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}  # rows of X behind each sum
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add x^T x to `name`'s sum; after the group's last weight in forward order, stop the pass."""
        if name not in self.names:
            return
        if self._last is not None and self._last[0] is x:
            g = self._last[1]
        else:
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            g = flat.T @ flat
            self._last = (x, g)
        self.sums[name] = g.clone() if name not in self.sums else self.sums[name].add_(g)
        self.tokens[name] = self.tokens.get(name, 0) + x.numel() // x.shape[-1]
        if name == self.final and len(self.sums) == len(self.names):
            raise _GroupDone

    def measure(self, model: nn.Module, batches: Iterable, forward: Callable[[nn.Module, object], object]) -> None:
        """Run `batches` through `model` up to this group's last weight."""
        with watch_inputs(model, self.add):
            for batch in batches:
                with suppress(_GroupDone):
                    forward(model, batch)


@torch.no_grad()
def reconstruct_weights(
    model: nn.Module,
    batches: Iterable,
    forward: Callable[[nn.Module, object], object],
    reduce: Callable[[torch.Tensor], object] | None = None,
    followers: Iterable[nn.Module] = (),
    select: str = "scores",
    progress: bool = False,
) -> Reconstruction:
    """Refit every masked weight of `model` to its dense outputs on `batches` (re-iterable: one pass per group)
    under the masks it has now, group by group in forward order; copy the weights into `followers` (an EMA copy).
    `reduce` (e.g. an all-reduce sum) is applied to every Gram matrix, so all ranks refit the same weights; weights
    that keep every tile are left as they are and not counted.
    `select="output_error"` also re-chooses each weight's tiles (as many as its mask keeps) by the output error
    their removal leaves after the refit (`superblock.sparsity.select`), its scores reordered to match. `progress`
    shows a bar over the groups (a minute or more on a pretrained model)."""
    if select not in SELECTIONS:
        raise ValueError(f"unknown tile selection {select!r}: use one of {SELECTIONS}")
    masks = _masks_to_refit(model)
    if select == "output_error":
        for module, pname, mask in masks.values():  # before any pass: a weight too large for it fails now
            dense, tiles, _, block = _out_in(module, pname, mask)
            check_memory(dense.shape, tiles.shape, block)
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("sparsity.reconstruct needs at least one calibration batch")
    was_training = model.training
    model.eval()
    groups: dict[str, list[str]] = {}
    try:
        for name in forward_order(model, first, forward):
            if name in masks:
                groups.setdefault(group_key(name), []).append(name)
        before, after, short = [], [], (0, 0)
        for names in progress_iter(groups.values(), len(groups), "refit", "block", enabled=progress):
            grams = _Grams(names)
            with _unmasked([masks[name][2] for name in names]):
                grams.measure(model, batches, forward)
            short = max(short, _too_few_tokens(grams, names, reduce))
            for name in names:
                gram = grams.sums[name]
                if reduce is not None:
                    reduce(gram)
                module, pname, mask = masks[name]
                e_before, e_after = _refit(module, pname, mask, gram, select)
                before.append(e_before)
                after.append(e_after)
    finally:
        model.train(was_training)
    _copy_weights(model, followers)
    if short[0]:
        warnings.warn(
            f"the refit saw {short[1]} calibration tokens for a weight with {short[0]} inputs: it can match them "
            "exactly and then generalises poorly (a perplexity of thousands after it); calibrate on more tokens than "
            "the widest weight has inputs (sparsity.calibration_batches x data.batch_size x data.seq_len)",
            RuntimeWarning,
            stacklevel=2,
        )
    n = len(before)
    return Reconstruction(n, len(groups), sum(before) / max(n, 1), sum(after) / max(n, 1), select)


def _masks_to_refit(model: nn.Module) -> dict[str, tuple[nn.Module, str, object]]:
    """{name: (module, parameter name, mask)} of the masked weights a refit changes. A weight that keeps every tile
    (a level-0 override) gives its dense outputs already: nothing to refit (the ridge would only shrink it) and no
    pass to measure it."""
    return {
        name: (module, pname, mask)
        for name, module, pname, mask in iter_block_masks(model)
        if not bool(mask.mask.all())
    }


def _too_few_tokens(grams: _Grams, names: list[str], reduce) -> tuple[int, int]:
    """(inputs, tokens) of the group's widest weight when it saw fewer calibration tokens (on all ranks) than it
    has inputs (its Gram matrix is then singular), else (0, 0)."""
    device = grams.sums[names[0]].device
    tokens = torch.tensor([float(grams.tokens[name]) for name in names], dtype=torch.float64, device=device)
    if reduce is not None:
        reduce(tokens)  # one collective and one host read for the whole group
    short = [(grams.sums[name].shape[0], int(t)) for name, t in zip(names, tokens.tolist(), strict=True)]
    return max(((inputs, t) for inputs, t in short if t < inputs), default=(0, 0))


@contextmanager
def _unmasked(masks: list) -> Iterator[None]:
    """Within the block these masks keep every tile (a group is measured dense, its inputs through the groups
    before it as refit and masked, as SparseGPT measures a block); their own masks afterwards."""
    saved = [m.mask.clone() for m in masks]
    try:
        for m in masks:
            m.mask.fill_(1)
        yield
    finally:
        for m, kept in zip(masks, saved, strict=True):
            m.mask.copy_(kept)


def _out_in(module: nn.Module, pname: str, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BlockSize]:
    """The stored weight as (out, in), and its tiles, scores and tile the same way round: views of what is stored
    (GPT-2's Conv1D stores (in, out), and its mask tiles that stored weight)."""
    original = module.parametrizations[pname].original
    if input_dim(module) == 0:
        return original.T, mask.mask.T, mask.scores.data.T, (mask.block[1], mask.block[0])
    return original, mask.mask, mask.scores.data, mask.block


def _refit(module: nn.Module, pname: str, mask, gram: torch.Tensor, select: str) -> tuple[float, float]:
    """Refit one masked weight in place (re-choosing its tiles with `select="output_error"`); its output error
    before (masked by the scores' tiles) and after."""
    dense, tiles, scores, block = _out_in(module, pname, mask)
    keep = expand_blocks(tiles.bool(), dense.shape, block).double()
    before = output_error(dense, dense.double() * keep, gram)
    if select == "output_error":
        kept, step = select_tiles(dense, tiles, block, gram, DAMPING)
        scores.copy_(reorder_scores(scores, kept, step))
        tiles.copy_(kept)
        keep = expand_blocks(kept.bool(), dense.shape, block).double()
    new = refit_rows(dense, tiles, block, gram, toward_dense=select == "output_error")
    after = output_error(dense, new * keep, gram)
    dense.copy_(new.to(dense.dtype))  # views of what is stored: the writes land in the weight, mask and scores
    return before, after


def _copy_weights(model: nn.Module, followers: Iterable[nn.Module]) -> None:
    """The refit weights, and the tiles and scores (re-chosen by a selection), into each follower."""
    live = [(module.parametrizations[pname].original, m) for _, module, pname, m in iter_block_masks(model)]
    for follower in followers:
        copies = [(module.parametrizations[pname].original, m) for _, module, pname, m in iter_block_masks(follower)]
        for (src, src_mask), (dst, dst_mask) in zip(live, copies, strict=True):
            dst.copy_(src)
            dst_mask.mask.copy_(src_mask.mask)
            dst_mask.scores.data.copy_(src_mask.scores)
