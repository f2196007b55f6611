"""The training objective: the task loss on one batch (mixup/cutmix, label smoothing), plus distillation.

Tasks: image classification (logits (B, C), targets (B,) or mixed soft targets) and causal language modelling
(logits (B, T, V), targets (B, T) = the next tokens), where every token position counts as one prediction.
Models may return a tensor or a `transformers` output object (its `.logits`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from superblock.engine.block_distill import BlockTap, block_loss
from superblock.engine.distill import distillation_loss
from superblock.models import model_logits
from superblock.timing import StepTimer


def flat_predictions(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits and (N,) or (N, C) targets: a sequence model's (B, T, V) logits count every position."""
    if logits.dim() == 3:
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return logits, targets


class Objective:
    """loss = the task loss, mixed with a frozen teacher's soft (or hard) targets when one is given.

    `mixup`: a timm Mixup (the criterion then takes soft targets). The teacher runs under the same autocast, without
    gradients, on the same (mixed) batch; its time is summed in `teacher_timer`. `block_weight` > 0 (with the
    `student`, the unwrapped model) adds the layer-wise term: its blocks' outputs against the teacher's."""

    def __init__(
        self,
        criterion: nn.Module,
        mixup: nn.Module | None = None,
        teacher: nn.Module | None = None,
        alpha: float = 0.0,
        temperature: float = 1.0,
        hard: bool = False,
        device: torch.device | None = None,
        block_weight: float = 0.0,
        student: nn.Module | None = None,
    ) -> None:
        self.criterion, self.mixup, self.teacher = criterion, mixup, teacher
        self.alpha, self.temperature, self.hard = alpha, temperature, hard
        self.teacher_timer = StepTimer(device or torch.device("cpu")) if teacher is not None else None
        self.block_weight, self.taps = block_weight, None
        if block_weight > 0:
            if teacher is None or student is None:
                raise ValueError("the layer-wise distillation term needs the student and a teacher")
            self.taps = (BlockTap(student, "student"), BlockTap(teacher, "teacher"))

    def __call__(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, autocast: AbstractContextManager
    ) -> torch.Tensor:
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets)
        with autocast, self._recording(0) as student_blocks:
            logits = model_logits(model(inputs))
        logits, targets = flat_predictions(logits, targets)
        loss = self.criterion(logits.float(), targets)
        if self.teacher is None:
            return loss
        # The teacher sees the same (mixed) batch.
        with autocast, torch.no_grad(), self.teacher_timer, self._recording(1) as teacher_blocks:
            teacher_logits, _ = flat_predictions(model_logits(self.teacher(inputs)), targets)
        loss = distillation_loss(logits, teacher_logits, loss, self.alpha, self.temperature, self.hard)
        if self.taps is None:
            return loss
        return loss + self.block_weight * block_loss(student_blocks, teacher_blocks)

    def _recording(self, side: int) -> AbstractContextManager:
        return nullcontext([]) if self.taps is None else self.taps[side].recording()
