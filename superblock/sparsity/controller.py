"""The sparsity controller: owns the schedule position and chooses every layer's hard mask.

Hard masks are recomputed only when something they depend on changed: the scheduled sparsity or a score tensor
(its version counter moves on every in-place update, i.e. on each optimizer step or state-dict load). So during
training they are recomputed once per optimizer step, batched over layers of equal size, and never in eval or
between gradient-accumulation micro-batches. Choosing k uses host-side numbers only: no GPU sync.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from superblock.sparsity.blocks import kept_blocks
from superblock.sparsity.mask import BlockMask
from superblock.sparsity.schedule import SparsitySchedule

ALLOCATIONS = ("layerwise", "global")

# Controllers whose masks were computed; any optimizer step marks them stale. Tensor version counters alone do
# not see every update: fused optimizers (e.g. AdamW(fused=True) on CUDA) change the scores without bumping them.
_LIVE: weakref.WeakSet[SparsityController] = weakref.WeakSet()
_HOOK: list = []


def _invalidate_all(*_args: object) -> None:
    for ctrl in list(_LIVE):
        ctrl._stamp = None


def _ensure_optimizer_hook() -> None:
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_invalidate_all))


def _topk_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the k largest entries of every row; ties go to the lower index (stable sort)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return torch.zeros_like(scores).scatter_(-1, order[..., :k], 1.0)


def _standardize(scores: torch.Tensor) -> torch.Tensor:
    """Scores on a common scale across layers (global ranking): zero mean, unit std per layer."""
    std = scores.std(unbiased=False) if scores.numel() > 1 else scores.new_tensor(1.0)
    return (scores - scores.mean()) / (std + 1e-12)


class SparsityController:
    """Chooses the hard masks of one model. Reached with `get_controller(model)`.

    A plain object, not a submodule, so the model's structure is unchanged (an extra child would run as a layer
    of an nn.Sequential). Its state (schedule position) is saved through every mask's extra state.
    """

    def __init__(
        self,
        masks: list[tuple[str, BlockMask]],
        schedule: SparsitySchedule,
        allocation: str = "layerwise",
        min_density: float = 0.0,
    ) -> None:
        if allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {allocation!r}: use one of {ALLOCATIONS}")
        if not 0.0 <= min_density <= 1.0:
            raise ValueError(f"min_density must be in [0, 1], got {min_density}")
        self.schedule = schedule
        self.allocation = allocation
        self.min_density = min_density
        self.step_count = 0
        self._masks = list(masks)
        self._stamp: tuple | None = None
        for _, mask in self._masks:
            mask.attach(self)
        _ensure_optimizer_hook()
        self._check_floor_fits(max(schedule.initial, schedule.final))

    @property
    def masks(self) -> list[tuple[str, BlockMask]]:
        return list(self._masks)

    @property
    def sparsity(self) -> float:
        """Target sparsity at the current step."""
        return self.schedule.value(self.step_count)

    def step(self) -> None:
        """Advance the schedule by one optimizer step (call after `optimizer.step()`)."""
        self.step_count += 1
        self._stamp = None

    def _current_stamp(self) -> tuple:
        return (self.sparsity, *(m.scores._version for _, m in self._masks))

    def refresh_if_stale(self) -> None:
        stamp = self._current_stamp()
        if stamp != self._stamp:
            self.refresh()
            self._stamp = stamp
            _LIVE.add(self)

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

    def _floor(self, mask: BlockMask) -> int:
        return kept_blocks(mask.n_blocks, 1.0 - self.min_density) if self.min_density > 0 else 1

    @torch.no_grad()
    def refresh(self, force: bool = False) -> None:
        """Recompute hard masks from scores. Fixed masks are only (re)computed when `force` is set."""
        live = [(n, m) for n, m in self._masks if force or not m.fixed_mask]
        if not live:
            return
        # inference_mode(False): a refresh triggered inside an inference-mode eval must still produce a normal
        # tensor that a later training step can save for backward.
        with torch.inference_mode(False):
            if self.allocation == "global":
                self._refresh_global([m for _, m in live])
            else:
                self._refresh_layerwise([m for _, m in live])

    def _refresh_layerwise(self, masks: list[BlockMask]) -> None:
        sparsity = self.sparsity
        groups: dict[tuple, list[BlockMask]] = defaultdict(list)
        for m in masks:
            groups[(m.n_blocks, m.scores.device)].append(m)
        for (n, _), group in groups.items():
            stacked = torch.stack([m.scores.detach().reshape(-1).float() for m in group])
            hard = _topk_rows(stacked, kept_blocks(n, sparsity))
            for m, row in zip(group, hard, strict=True):
                m.mask = row.reshape(m.scores.shape).to(m.mask.dtype)

    def _refresh_global(self, masks: list[BlockMask]) -> None:
        total = sum(m.n_blocks for m in masks)
        budget = kept_blocks(total, self.sparsity)
        ranked = []
        for m in masks:
            z = _standardize(m.scores.detach().reshape(-1).float())
            # Each layer's best `floor` tiles jump the global queue, so the per-layer minimum always holds.
            floor_idx = torch.argsort(z, descending=True, stable=True)[: self._floor(m)]
            ranked.append(z.index_fill(0, floor_idx, float("inf")))
        device = masks[0].scores.device
        keep = _topk_rows(torch.cat([r.to(device) for r in ranked]), budget)
        for m, part in zip(masks, torch.split(keep, [m.n_blocks for m in masks]), strict=True):
            m.mask = part.reshape(m.scores.shape).to(device=m.mask.device, dtype=m.mask.dtype)

    def get_state(self) -> dict:
        return {
            "step": self.step_count,
            "schedule": self.schedule.to_dict(),
            "allocation": self.allocation,
            "min_density": self.min_density,
        }

    def set_state(self, state: dict) -> None:
        if state.get("schedule") != self.schedule.to_dict() or state.get("allocation") != self.allocation:
            raise ValueError(
                "checkpoint was trained with a different sparsity recipe "
                f"(schedule {state.get('schedule')}, allocation {state.get('allocation')}) than this model "
                f"(schedule {self.schedule.to_dict()}, allocation {self.allocation}): sparsify with the same settings"
            )
        self.step_count = int(state["step"])
        self._stamp = None

    def __repr__(self) -> str:
        return (
            "SparsityController("
            f"layers={len(self._masks)}, allocation={self.allocation}, step={self.step_count}, "
            f"sparsity={self.sparsity:.4f}, schedule={self.schedule})"
        )
