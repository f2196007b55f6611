"""The folded dense model of an export directory, read and verified: the part of reading an export that needs nothing
above the model builders, so training can take an export as its teacher (engine/distill.py) and the loader builds
on it (loader.load_folded)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from superblock.export.format import ExportError, read_manifest, verify_file


def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{file} cannot be read as safetensors ({err}): export the checkpoint again") from None


def _has_unsaved_buffers(model: nn.Module) -> bool:
    return any(m._non_persistent_buffers_set for m in model.modules())


def build_from_spec(model_spec: dict) -> nn.Module:
    """The plain model described by a manifest's model_spec, with uninitialised weights (all of them are loaded
    next). Built on the meta device to skip the random init; a model with buffers that no state dict carries is
    built normally instead, since those would stay uninitialised."""
    from superblock.models import build_model

    spec = {**model_spec, "pretrained": None}  # weights come from the export, never from a file or the hub
    try:
        with torch.device("meta"):
            model = build_model(**spec)
    except (RuntimeError, NotImplementedError, ValueError):
        return build_model(**spec)
    if _has_unsaved_buffers(model):
        return build_model(**spec)
    model = model.to_empty(device="cpu")
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # to_empty gives each end of a tied pair its own tensor: tie them again (transformers)
    return model


def load_dense_into(
    model: nn.Module, state: dict[str, torch.Tensor], expected_missing: set[str], tied: dict[str, str] | None = None
) -> None:
    """Load `state` into `model`; every model key must be in it except `expected_missing`, and nothing extra.
    `tied`: the manifest's {key: key it is tied to}, copies the export left out."""
    result = model.load_state_dict(retie(state, tied or {}), strict=False)
    missing = set(result.missing_keys) - expected_missing
    if missing or result.unexpected_keys:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(result.unexpected_keys)[:3]}"
        raise ExportError(f"the stored weights do not fit the model in the manifest ({detail})")


def retie(state: dict[str, torch.Tensor], tied: dict[str, str]) -> dict[str, torch.Tensor]:
    """The state dict with the tied copies that `pack_tensors` left out put back (loading fills both ends)."""
    return {**state, **{key: state[source] for key, source in tied.items() if source in state}}


def read_folded(path: str | Path, manifest: dict | None = None) -> nn.Module:
    """The plain model of an export (CPU, the export's dtype) with its folded dense weights, the weights file checked
    against the manifest's sha256 first. `manifest`: read_manifest(path), when the caller has it already."""
    path = Path(path)
    manifest = read_manifest(path) if manifest is None else manifest
    state = load_safetensors(verify_file(path, manifest, "dense"))
    model = build_from_spec(manifest["model_spec"])
    load_dense_into(model, state, expected_missing=set(), tied=manifest.get("tied"))
    return model
