"""Checkpoints: written atomically, loaded without ever executing code from the file."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from superblock.artifacts.spec import build_from_spec
from superblock.io import atomic_write

FORMAT = "superblock-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign, or unsafe to load."""


# The tag as it appears in the pickle (a protocol-2 string); the first bytes of the pickle are enough to find it.
_TAG = FORMAT.encode()
_PEEK_BYTES = 1 << 16


def has_format_tag(path: str | Path) -> bool:
    """Whether `path` looks like a superblock checkpoint, told without unpickling anything (which could run code)
    or reading weights. torch.save writes a zip archive whose `<name>/data.pkl` entry holds the pickled structure
    (tensors live in other entries), and save_checkpoint puts the format tag under the dict's first key, so the tag
    is within the first bytes of data.pkl. Only load_checkpoint says whether the file is complete and safe."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                return False
            with archive.open(pickles[0]) as f:
                head = f.read(_PEEK_BYTES)
    except (OSError, EOFError, ValueError, NotImplementedError, zipfile.BadZipFile):
        return False  # not a zip archive, or a damaged one
    return _TAG in head


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Save a training checkpoint dict (see docs/architecture.md) atomically."""
    state = {"format": FORMAT, "version": VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a superblock checkpoint with `weights_only=True`; CheckpointError with a clear message otherwise."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory: pass its checkpoint file (artifacts.resolve finds a run's)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers (only weights-only "
            f"checkpoints are loaded, so no code from a file ever runs). Details: {str(err).splitlines()[0]}"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch.load raises assorted types (KeyError, ...) on garbage files
        # ...and all of them mean "not a readable checkpoint".
        detail = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {detail}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a superblock checkpoint (no '{FORMAT}' format tag)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state['version']}; this superblock reads <= {VERSION}")
    return state


def model_from_checkpoint(state: dict, use_ema: bool = False) -> nn.Module:
    """Rebuild the (masked) model of a training checkpoint and load its weights."""
    model = build_from_spec(state["model_spec"], state.get("sparsity_spec"))
    weights = state.get("ema") if use_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    return model
