"""Checkpoints: written atomically, loaded without ever executing code from the file."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from superblock.artifacts.spec import build_from_spec
from superblock.io import atomic_write
from superblock.rundir import RunDir

FORMAT = "superblock-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, foreign, or unsafe to load."""


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Save a training checkpoint dict (see docs/architecture.md) atomically."""
    state = {"format": FORMAT, "version": VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a superblock checkpoint with `weights_only=True`; CheckpointError with a clear message otherwise."""
    path = Path(path)
    if path.is_dir():
        path = resolve_checkpoint_path(path)
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


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run directory means its checkpoints/last.pt (or a last.pt right in it); a file is used as is."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        for candidate in (run.last, path / run.last.name):
            if candidate.is_file():
                return candidate
        raise CheckpointError(
            f"no checkpoint in run directory {path} (expected {run.last.relative_to(path).as_posix()})"
        )
    return path


def model_from_checkpoint(state: dict, use_ema: bool = False) -> nn.Module:
    """Rebuild the (masked) model of a training checkpoint and load its weights."""
    model = build_from_spec(state["model_spec"], state.get("sparsity_spec"))
    weights = state.get("ema") if use_ema and state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    return model
