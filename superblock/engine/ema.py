"""Exponential moving average of a model's weights (masked models included)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from superblock.sparsity import get_controller


class ModelEma:
    """EMA copy of a model. Its masks follow its own averaged scores at the live model's schedule position."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        # Warm-up as in common EMA recipes: early averages are not dominated by the random init.
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.module.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
        live, ema = get_controller(model), get_controller(self.module)
        if live is not None and ema is not None:
            ema.step_count = live.step_count

    def load(self, module_state: dict, updates: int) -> None:
        self.module.load_state_dict(module_state)
        self.updates = int(updates)
