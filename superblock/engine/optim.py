"""Optimizer with a parameter group for mask scores, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from superblock.config import OPTIMIZERS
from superblock.sparsity import mask_parameters


def param_groups(model: nn.Module, lr: float, weight_decay: float, scores_lr: float | None = None) -> list[dict]:
    """decay (2-D+ weights) / no_decay (biases, norms, embeddings' 1-D params) / scores (own lr, no decay)."""
    scores = {id(p) for p in mask_parameters(model)}
    decay, no_decay, score_params = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in scores:
            score_params.append(p)
        elif p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "pos_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr": lr},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": lr},
        {"name": "scores", "params": score_params, "weight_decay": 0.0, "lr": scores_lr or lr},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    scores_lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    groups = param_groups(model, lr, weight_decay, scores_lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    raise ValueError(f"unknown optimizer {name!r}: use one of {OPTIMIZERS}")


def warmup_cosine(
    total_steps: int, warmup_steps: int, min_ratio: float, start_factor: float = 0.01, cosine: bool = True
):
    """Multiplier of the base lr at a step: linear warmup from start_factor, then cosine down to min_ratio."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return start_factor + (1.0 - start_factor) * step / warmup_steps
        if not cosine:
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    min_lr: float,
    start_factor: float = 0.01,
    schedule: str = "cosine",
) -> torch.optim.lr_scheduler.LambdaLR:
    fn = warmup_cosine(total_steps, warmup_steps, min_lr / base_lr, start_factor, cosine=schedule == "cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
