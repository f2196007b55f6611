"""The sparsity controller: owns the schedule position and chooses every layer's hard mask.

Hard masks are recomputed at explicit points only, never inside forward (which stays plain tensor math that
`torch.compile` captures in one graph): in `step()` (after every optimizer step), after `load_state_dict` of the
sparsified model, when `step_count` is assigned (an EMA copy following the live model), and in `refresh()` /
`superblock.sparsity.refresh_masks(model)` for anything else that changes scores (a hand-written update,
`scores.data.copy_(...)`). A refresh is batched over layers of equal size, writes every mask buffer in place (the
same tensor objects, so a compiled graph keeps reading them) and chooses k from host-side numbers only: no GPU sync.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable

import torch

from superblock.sparsity.blocks import kept_blocks
from superblock.sparsity.mask import BlockMask
from superblock.sparsity.schedule import SparsitySchedule

ALLOCATIONS = ("layerwise", "global")


def _topk_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the k largest entries of every row; ties go to the lower index (stable sort)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return torch.zeros_like(scores).scatter_(-1, order[..., :k], 1.0)


def _copy_into(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i].copy_(src[i]) in place (casting to the mask dtype), in one fused launch where the backend has it."""
    if all(d.device == s.device for d, s in zip(dst, src, strict=True)) and hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
        return
    for d, s in zip(dst, src, strict=True):
        d.copy_(s)


def _full(scores: torch.Tensor) -> torch.Tensor:
    """A layer's whole score matrix, detached: under FSDP2 (`fully_shard`) scores are DTensor shards, gathered here
    (a collective: every rank refreshes at the same step) so every rank chooses the same mask."""
    scores = scores.detach()
    return scores.full_tensor() if hasattr(scores, "full_tensor") else scores


def _scale_of(scores: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of a layer's scores: its reference scale for global ranking."""
    flat = _full(scores).reshape(-1).float()
    std = float(flat.std(unbiased=False)) if flat.numel() > 1 else 1.0
    return float(flat.mean()), std if std > 0 else 1.0


class SparsityController:
    """Chooses the hard masks of one model. Reached with `get_controller(model)`.

    A plain object, not a submodule, so the model's structure is unchanged (an extra child would run as a layer
    of an nn.Sequential). Its state (schedule position) is saved through every mask's extra state.
    Masks are recomputed by `step()`, by assigning `step_count`, by `refresh()` and after the model's
    `load_state_dict`; never in forward.
    """

    def __init__(
        self,
        masks: list[tuple[str, BlockMask]],
        schedule: SparsitySchedule,
        allocation: str = "layerwise",
        min_density: float = 0.0,
        freeze_step: int | None = None,
        levels: dict[str, float] | None = None,
    ) -> None:
        if allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {allocation!r}: use one of {ALLOCATIONS}")
        if not 0.0 <= min_density <= 1.0:
            raise ValueError(f"min_density must be in [0, 1], got {min_density}")
        if freeze_step is not None and freeze_step < 0:
            raise ValueError(f"freeze_step must be >= 0 (an optimizer step), got {freeze_step}")
        self.schedule = schedule
        self.allocation = allocation
        self.min_density = min_density
        self.freeze_step = freeze_step
        self._step_count = 0
        self._masks = list(masks)
        # {mask name: its own final sparsity} for weights that ramp to another level than the schedule's
        self.levels = dict(levels or {})
        self._check_levels()
        # Set when the stored weights were permuted to fit the tiles (superblock.sparsity.permute): saved with the
        # state, so a resumed run knows the permutation is in its weights already and never applies it twice.
        self.permutation: dict | None = None
        self._step_hooks: list[Callable[[int], None]] = []
        for _, mask in self._masks:
            mask.attach(self)
        # Global ranking compares scores of different layers, whose initial scales differ (fan-in, weight norms).
        # Each layer is put on a common scale by the mean / std its scores had at the start, fixed from then on:
        # standardizing by the live statistics instead would cancel exactly the signal global allocation is for (a
        # layer whose scores all rise would keep the same share of tiles).
        self._reference = [_scale_of(m.scores) for _, m in self._masks] if allocation == "global" else []
        self._check_floor_fits(max(schedule.initial, schedule.final))

    @property
    def masks(self) -> list[tuple[str, BlockMask]]:
        return list(self._masks)

    @property
    def sparsity(self) -> float:
        """Target sparsity at the current step."""
        return self.schedule.value(self._step_count)

    @property
    def frozen(self) -> bool:
        """Past `freeze_step`: the masks stay as they were at that step (scores no longer move them)."""
        return self.freeze_step is not None and self._step_count > self.freeze_step

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (the schedule position)."""
        return self._step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        # The masks are a function of (scores, step): moving the step recomputes them. An EMA copy follows the
        # live model's schedule this way, with masks from its own averaged scores.
        self._step_count = int(value)
        self.refresh()

    def step(self) -> None:
        """Advance the schedule by one optimizer step and recompute the masks (call after `optimizer.step()`).
        Step hooks run first, with the new step number, before the masks of that step are chosen."""
        for hook in self._step_hooks:
            hook(self._step_count + 1)
        self.step_count = self._step_count + 1

    def add_step_hook(self, hook: Callable[[int], None]) -> None:
        """Call `hook(step)` in every `step()`, before that step's masks are chosen (not saved, not copied)."""
        self._step_hooks.append(hook)

    def __deepcopy__(self, memo: dict) -> SparsityController:
        # A copy (an EMA model, a model folded for export) follows its own schedule position; hooks that act on the
        # live training state (its optimizer) stay with the original.
        cls = type(self)
        copy_ = cls.__new__(cls)
        memo[id(self)] = copy_
        for key, value in self.__dict__.items():
            setattr(copy_, key, [] if key == "_step_hooks" else copy.deepcopy(value, memo))
        return copy_

    def _check_floor_fits(self, sparsity: float) -> None:
        if self.allocation != "global":
            return
        total = sum(m.n_blocks for _, m in self._masks)
        floor = sum(self._floor(m) for _, m in self._masks)
        if floor > kept_blocks(total, sparsity):
            raise ValueError(
                f"min_density={self.min_density} keeps {floor} tiles but sparsity {sparsity} keeps only "
                f"{kept_blocks(total, sparsity)} of {total}: lower min_density or the sparsity"
            )

    def _check_levels(self) -> None:
        if not self.levels:
            return
        if self.allocation == "global":
            raise ValueError("per-weight levels (level_overrides) need allocation='layerwise': a global allocation "
                             "ranks every tile of the model against one budget")  # fmt: skip
        if self.schedule.final <= 0.0:
            raise ValueError("per-weight levels (level_overrides) scale the schedule's ramp: give the model a "
                             "sparsity > 0")  # fmt: skip
        unknown = sorted(set(self.levels) - {n for n, _ in self._masks})
        if unknown:
            raise ValueError(f"levels for weights without a mask: {unknown}")

    @property
    def overall_sparsity(self) -> float:
        """Target share of all masked weights zeroed at the current step: `sparsity` when no weight has a level of
        its own, else the weights' own targets weighted by their sizes (what `sparsity.level_total` sets)."""
        if not self.levels:
            return self.sparsity
        sizes = [(name, math.prod(mask.weight_shape)) for name, mask in self._masks]
        return sum(self.sparsity_of(name) * n for name, n in sizes) / max(sum(n for _, n in sizes), 1)

    def sparsity_of(self, name: str) -> float:
        """Target sparsity of one masked weight at the current step (its own level's share of the ramp)."""
        level = self.levels.get(name)
        s = self.sparsity
        return s if level is None else min(1.0, s * level / self.schedule.final)

    def _floor(self, mask: BlockMask) -> int:
        return kept_blocks(mask.n_blocks, 1.0 - self.min_density) if self.min_density > 0 else 1

    @torch.no_grad()
    def refresh(self, force: bool = False) -> None:
        """Recompute hard masks from the current scores and schedule position, in place.

        Fixed masks, and every mask once the controller is `frozen`, are only (re)computed when `force` is set.
        """
        if self.frozen and not force:
            return
        live = [(n, m) for n, m in self._masks if force or not m.fixed_mask]
        if not live:
            return
        # inference_mode(False): a refresh called inside an inference-mode block must not turn anything into an
        # inference tensor that a later training step cannot use.
        with torch.inference_mode(False):
            if self.allocation == "global":
                self._refresh_global([m for _, m in live])
            else:
                self._refresh_layerwise(live)

    def _refresh_layerwise(self, masks: list[tuple[str, BlockMask]]) -> None:
        groups: dict[tuple, list[BlockMask]] = defaultdict(list)
        for name, m in masks:  # masks keeping as many tiles are ranked together, one top-k for the group
            groups[(kept_blocks(m.n_blocks, self.sparsity_of(name)), m.n_blocks, m.scores.device)].append(m)
        for (kept, _, _), group in groups.items():
            stacked = torch.stack([_full(m.scores).reshape(-1).float() for m in group])
            hard = _topk_rows(stacked, kept)
            _copy_into([m.mask for m in group], [row.view(m.mask.shape) for m, row in zip(group, hard, strict=True)])

    def _refresh_global(self, masks: list[BlockMask]) -> None:
        total = sum(m.n_blocks for m in masks)
        budget = kept_blocks(total, self.sparsity)
        reference = {id(m): ref for (_, m), ref in zip(self._masks, self._reference, strict=True)}
        ranked = []
        for m in masks:
            mean, std = reference[id(m)]
            z = (_full(m.scores).reshape(-1).float() - mean) / std
            # Each layer's best `floor` tiles jump the global queue, so the per-layer minimum always holds.
            floor_idx = torch.argsort(z, descending=True, stable=True)[: self._floor(m)]
            ranked.append(z.index_fill(0, floor_idx, float("inf")))
        device = masks[0].scores.device
        keep = _topk_rows(torch.cat([r.to(device) for r in ranked]), budget)
        parts = torch.split(keep, [m.n_blocks for m in masks])
        for m, part in zip(masks, parts, strict=True):
            m.mask.copy_(part.view(m.mask.shape))

    def get_state(self) -> dict:
        return {
            "step": self.step_count,
            "schedule": self.schedule.to_dict(),
            "allocation": self.allocation,
            "min_density": self.min_density,
            "reference": [list(r) for r in self._reference],
            **({"freeze_step": self.freeze_step} if self.freeze_step is not None else {}),
            **({"permutation": dict(self.permutation)} if self.permutation is not None else {}),
            **({"levels": dict(self.levels)} if self.levels else {}),
        }

    def set_state(self, state: dict) -> None:
        if (
            state.get("schedule") != self.schedule.to_dict()
            or state.get("allocation") != self.allocation
            or state.get("freeze_step") != self.freeze_step
            or state.get("levels", {}) != self.levels
        ):
            raise ValueError(
                "checkpoint was trained with a different sparsity recipe "
                f"(schedule {state.get('schedule')}, allocation {state.get('allocation')}, freeze_step "
                f"{state.get('freeze_step')}, levels {state.get('levels', {})}) than this model (schedule "
                f"{self.schedule.to_dict()}, allocation {self.allocation}, freeze_step {self.freeze_step}, levels "
                f"{self.levels}): sparsify with the same settings"
            )
        self._step_count = int(state["step"])  # load_state_dict refreshes once, after every tensor is loaded
        self.permutation = dict(state["permutation"]) if state.get("permutation") else None
        if state.get("reference") and len(state["reference"]) == len(self._masks):
            self._reference = [(float(a), float(b)) for a, b in state["reference"]]

    def __repr__(self) -> str:
        return (
            "SparsityController("
            f"layers={len(self._masks)}, allocation={self.allocation}, step={self.step_count}, "
            f"sparsity={self.sparsity:.4f}, schedule={self.schedule})"
        )
