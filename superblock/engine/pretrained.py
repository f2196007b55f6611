"""Weights from earlier superblock runs: a run directory or training checkpoint as `model.pretrained` (sparse
fine-tuning from a dense run) or as a distillation teacher. Masked runs are folded to plain weights first."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from superblock.artifacts.checkpoint import load_checkpoint, model_from_checkpoint
from superblock.artifacts.resolve import resolve, resolve_checkpoint
from superblock.models import load_state
from superblock.sparsity import fold_masks, get_controller


def names_run(pretrained: object) -> bool:
    """Whether a `model.pretrained` value names a superblock run directory or training checkpoint (artifacts.resolve);
    False for what build_model reads itself: None, a weights file, a transformers directory, a hub-like name.
    ValueError for an export directory, which holds no training state to start from."""
    if not isinstance(pretrained, (str, Path)) or not Path(str(pretrained)).expanduser().exists():
        return False
    artifact = resolve(pretrained)
    if artifact.kind == "export":
        raise ValueError(
            f"model.pretrained={pretrained} is an export directory: start from the run it was exported from, or "
            "from a weights file"
        )
    return artifact.kind in ("run", "checkpoint")


def run_model(path: str | Path, use_ema: bool = True) -> nn.Module:
    """The plain model of a run directory / checkpoint (its EMA weights when it has them), masks folded."""
    state = load_checkpoint(resolve_checkpoint(path).checkpoint, map_location="cpu")
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
