"""Validation: top-1 / top-5 / loss (and perplexity for language models: per token, and per byte of text where
the dataset says how many bytes its labels spell), summed over every rank under DDP.

A sequence model's every token position counts as one prediction: top-1 is then next-token accuracy."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from superblock.data.metrics import perplexity, perplexity_per_byte
from superblock.engine.distributed import all_reduce_sum
from superblock.engine.ema import ModelEma
from superblock.engine.objective import flat_predictions
from superblock.models import model_logits


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hits = top == targets[:, None]
    return [hits[:, : min(k, kmax)].any(dim=-1).sum() for k in ks]


@torch.no_grad()
def loader_metrics(
    model: nn.Module, loader: DataLoader, device: torch.device, autocast_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Accuracy of `model` on `loader`; the counts are reduced across ranks, so every rank gets the same result."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    criterion = nn.CrossEntropyLoss(reduction="sum")
    sequences = False
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model_logits(model(inputs))
        sequences = logits.dim() == 3
        logits, targets = flat_predictions(logits.float(), targets)
        top1, top5 = topk_correct(logits, targets)
        totals += torch.stack(
            [
                criterion(logits, targets).double(),
                top1.double(),
                top5.double(),
                torch.tensor(len(targets), dtype=torch.float64, device=device),
            ]
        )
    all_reduce_sum(totals)
    model.train(was_training)
    loss, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    metrics = {"val_loss": loss / count, "val_top1": 100.0 * top1 / count, "val_top5": 100.0 * top5 / count}
    if sequences:
        metrics["val_perplexity"] = perplexity(loss / count)
        per_byte = getattr(loader.dataset, "bytes_per_label", None)
        if per_byte:
            metrics["val_perplexity_per_byte"] = perplexity_per_byte(loss / count, per_byte)
    return metrics


def validate(
    model: nn.Module, ema: ModelEma | None, loader: DataLoader, device: torch.device, autocast_dtype: torch.dtype | None
) -> dict[str, float]:
    """The model's validation metrics, and its EMA copy's as `ema_<name>` when there is one."""
    metrics = loader_metrics(model, loader, device, autocast_dtype)
    if ema is not None:
        metrics.update({f"ema_{k}": v for k, v in loader_metrics(ema.module, loader, device, autocast_dtype).items()})
    return metrics
