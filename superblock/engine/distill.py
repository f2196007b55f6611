"""Knowledge distillation: a frozen dense teacher's logits as (soft or hard) targets for the sparse student.

The teacher comes from a superblock run directory or training checkpoint (masks folded), an export directory
(its folded dense weights) or a plain weights file (then it has the student's architecture). It runs in eval
mode, without gradients, under the student's autocast, once per batch (on the mixed batch when mixup/cutmix is
on), and is never stored in the student's checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from superblock.artifacts.folded import read_folded
from superblock.artifacts.format import ExportError
from superblock.artifacts.resolve import ArtifactError, resolve
from superblock.config import DistillConfig
from superblock.engine.pretrained import classifier_classes, run_model
from superblock.models import build_model


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    task_loss: torch.Tensor,
    alpha: float,
    temperature: float,
    hard: bool = False,
) -> torch.Tensor:
    """(1 - alpha) * task_loss + alpha * D, D = T^2 * KL(softmax(teacher / T) || softmax(student / T)) (batch mean),
    or with `hard`, the cross-entropy of the student against the teacher's argmax."""
    if alpha == 0.0:
        return task_loss
    student, teacher = student.float(), teacher.float()
    if hard:
        d = F.cross_entropy(student, teacher.argmax(dim=-1))
    else:
        t = temperature
        d = F.kl_div(
            F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean", log_target=True
        ) * (t * t)
    return (1.0 - alpha) * task_loss + alpha * d


def _export_teacher(path: Path) -> nn.Module:
    try:
        return read_folded(path)
    except ExportError as err:
        raise ValueError(f"distill.teacher={path}: {err}") from None


def load_teacher(path: str | Path, student_spec: dict, device: torch.device) -> nn.Module:
    """The frozen teacher at `path`, on `device`, in eval mode, with no trainable parameters.

    A run directory or checkpoint: its model (EMA weights when it has them), masks folded. An export directory:
    its folded dense weights. A weights file (.safetensors / .pt / .pth): the student's architecture with those
    weights. ValueError when the teacher's classes differ from the student's."""
    try:
        artifact = resolve(path)
    except ArtifactError as err:
        hint = "pass a run directory, an export directory or a weights file"
        raise ValueError(f"distill.teacher={path}: {err}: {hint}") from None
    if artifact.kind == "export":
        model = _export_teacher(artifact.path)
    elif artifact.kind in ("run", "checkpoint"):
        model = run_model(artifact.path)
    else:  # a weights file or a transformers directory: the student's architecture with those weights
        model = build_model(**{**student_spec, "pretrained": str(artifact.path)})
    classes = classifier_classes(model)
    if classes is not None and classes != student_spec["num_classes"]:
        raise ValueError(
            f"distill.teacher={path} predicts {classes} classes, the student {student_spec['num_classes']}: "
            "use a teacher trained on the same data"
        )
    model.requires_grad_(False)
    return model.to(device).eval()


def distillation_line(distill: DistillConfig) -> str:
    """What a run distils from, said once at its start: the teacher's path and the loss's settings."""
    loss = "the teacher's argmax" if distill.hard else f"soft targets at temperature {distill.temperature:g}"
    blocks = f", every block's output at weight {distill.blocks:g}" if distill.blocks else ""
    return f"distilling from {distill.teacher}: {loss}, weight {distill.alpha:g}{blocks}"
