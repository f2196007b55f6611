"""Weights from earlier superblock runs: a run directory or training checkpoint as `model.pretrained` (sparse
fine-tuning from a dense run) or as a distillation teacher. Masked runs are folded to plain weights first."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from superblock.artifacts.checkpoint import FORMAT, load_checkpoint, model_from_checkpoint, resolve_checkpoint_path
from superblock.models import load_state
from superblock.rundir import RunDir
from superblock.sparsity import fold_masks, get_controller


def is_run_source(path: str | Path | None) -> bool:
    """A run directory or a superblock training checkpoint (as opposed to a plain weights file, or a transformers
    weights directory: config.json and no checkpoints/)."""
    if path is None:
        return False
    p = Path(str(path)).expanduser()
    if p.is_dir():
        run = RunDir(p)
        return run.last.exists() or run.best.exists() or not (p / "config.json").is_file()
    if p.is_file() and p.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not ours to judge here: the weights-file loader gives the clear error
            return False
        return isinstance(obj, dict) and obj.get("format") == FORMAT
    return False


def run_model(path: str | Path, use_ema: bool = True) -> nn.Module:
    """The plain model of a run directory / checkpoint (its EMA weights when it has them), masks folded."""
    state = load_checkpoint(resolve_checkpoint_path(Path(str(path)).expanduser()), map_location="cpu")
    model = model_from_checkpoint(state, use_ema=use_ema and state.get("ema") is not None)
    if get_controller(model) is not None:
        fold_masks(model)
    return model


def classifier_classes(model: nn.Module) -> int | None:
    """Number of classes of a torchvision / timm classifier (None when it cannot tell)."""
    head = getattr(model, "heads", None) or getattr(model, "head", None)
    if isinstance(head, nn.Sequential):
        head = head[-1]
    return getattr(head, "out_features", None)


def load_run_weights(model: nn.Module, path: str | Path, use_ema: bool = True) -> None:
    """Load the (folded) weights of a run into `model`; ValueError on another class count or architecture."""
    source = run_model(path, use_ema)
    theirs, ours = classifier_classes(source), classifier_classes(model)
    if theirs is not None and ours is not None and theirs != ours:
        raise ValueError(
            f"model.pretrained={path} predicts {theirs} classes but this run's data has {ours}: start from a run "
            "trained on the same classes, or pass its weights file to re-initialise the head"
        )
    load_state(model, source.state_dict(), str(path))
