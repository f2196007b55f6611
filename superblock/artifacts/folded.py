"""The folded dense model of an export directory, read and verified: the part of reading an export that needs nothing
above the model builders, so training can take an export as its teacher (engine/distill.py) and the loader builds
on it (loader.load_folded)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from superblock.artifacts.format import DENSE_WEIGHTS, WEIGHTS, ExportError, read_manifest, verify_file
from superblock.artifacts.spec import build_from_spec


def load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, copied into memory. safetensors maps the file: a mapped tensor would change
    when the file is edited in place after loading, and crash the process (SIGBUS) when it is truncated."""
    try:
        return {name: t.clone() for name, t in load_file(str(file)).items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{file} cannot be read as safetensors ({err}): export the checkpoint again") from None


def _stamp(file: Path) -> tuple[int, int, int] | None:
    try:
        s = file.stat()
    except OSError:
        return None
    return s.st_ino, s.st_size, s.st_mtime_ns


def read_weights(path: str | Path, manifest: dict, key: str, verify: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of an export's weights file (`manifest['files'][key]`), checked against the manifest's sha256
    first when `verify`. ExportError if the file is replaced or written while it is read: what was checked is what
    is loaded, or nothing is."""
    default = {"weights": WEIGHTS, "dense": DENSE_WEIGHTS}[key]
    file = Path(path) / (manifest["files"][key]["name"] if verify else default)
    before = _stamp(file)
    if verify:
        verify_file(path, manifest, key)
    tensors = load_safetensors(file)
    if _stamp(file) != before:
        raise ExportError(f"{file} changed while it was being loaded (an export written over it?): load it again")
    return tensors


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
    state = read_weights(path, manifest, "dense")
    model = build_from_spec(manifest["model_spec"])
    load_dense_into(model, state, expected_missing=set(), tied=manifest.get("tied"))
    return model
