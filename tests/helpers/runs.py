"""Helpers shared by the export/evaluate tests: training-run directories holding a randomly initialised masked model.

Laid out like train.py's run directories (checkpoints/last.pt + config.yaml), so export and evaluate see exactly
what they see after training. Imported by the export, evaluate, serving and runtime tests (unit, integration, GPU).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from superblock.artifacts.checkpoint import save_checkpoint
from superblock.models import build_model, model_spec
from superblock.sparsity import sparsify

DATA = {"name": "synthetic", "image_size": 32, "train_size": 64, "val_size": 48, "batch_size": 16, "num_workers": 0}


def make_run(
    run_dir: Path,
    name: str = "micro_vit",
    *,
    num_classes: int = 10,
    image_size: int = 32,
    sparsity: float | None = 0.8,
    block_size: int | tuple[int, int] = 8,
    targets: tuple[str, ...] = ("mlp", "attn"),
    seed: int = 0,
    model_kwargs: dict | None = None,
    **sparsify_kwargs,
) -> nn.Module:
    """Write a run directory with a masked model (dense with sparsity=None); returns it (eval mode)."""
    torch.manual_seed(seed)
    spec = model_spec(name, num_classes=num_classes, image_size=image_size, **(model_kwargs or {}))
    model = build_model(**spec)
    randomize_zero_init(model)
    sparsity_spec = None
    if sparsity is not None:
        sparsity_spec = {"sparsity": sparsity, "block_size": block_size, "targets": list(targets), **sparsify_kwargs}
        sparsify(model, **sparsity_spec, seed=seed)
    config = {"model": {"name": name}, "data": {**DATA, "image_size": image_size}, "seed": seed}
    save_checkpoint(
        Path(run_dir) / "checkpoints" / "last.pt",
        {
            "model_spec": spec,
            "sparsity_spec": sparsity_spec,
            "model": model.state_dict(),
            "ema": None,
            "config": config,
            "metrics": {"val_top1": 12.5},
            "epoch": 1,
            "step": 10,
        },
    )
    (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump(config))  # plain YAML: no omegaconf on GPU machines
    return model.eval()


@torch.no_grad()
def randomize_zero_init(model: nn.Module) -> None:
    """Give zero-initialised tensors (torchvision's classifier head, biases) random values: a zero head makes every
    logit 0, and any comparison of logits would pass whatever the rest of the model computes."""
    for p in model.parameters():
        if not p.any():
            p.normal_(0.0, 0.1)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return model(x.to(dtype)).float()


def probe(image_size: int = 32, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
