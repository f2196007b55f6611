"""What export and evaluate start from: a training run directory or checkpoint file, loaded without pickled code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from superblock.artifacts.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from superblock.artifacts.resolve import resolve_checkpoint
from superblock.rundir import RunDir


@dataclass
class Source:
    """A loaded training checkpoint, the run directory it belongs to and the run's resolved config."""

    checkpoint: Path
    run_dir: Path | None
    state: dict
    config: dict

    @property
    def name(self) -> str:
        return self.run_dir.name if self.run_dir else self.checkpoint.stem

    def model(self, use_ema: bool = False) -> nn.Module:
        """The masked training model (eval mode); EMA weights when asked for (an error if there are none)."""
        if use_ema and self.state.get("ema") is None:
            raise CheckpointError(f"use_ema=true but {self.checkpoint} holds no EMA weights: use use_ema=false")
        try:
            model = model_from_checkpoint(self.state, use_ema=use_ema)
        except (RuntimeError, TypeError, KeyError) as err:
            raise CheckpointError(
                f"{self.checkpoint}: the weights do not fit the model it describes ({str(err).splitlines()[0]})"
            ) from None
        return model.eval()

    def summary(self) -> dict:
        """JSON-able provenance for a manifest or eval.json."""
        return {
            "checkpoint": str(self.checkpoint.resolve()),
            "run_dir": str(self.run_dir.resolve()) if self.run_dir else None,
            "epoch": self.state.get("epoch"),
            "step": self.state.get("step"),
            "metrics": self.state.get("metrics") or {},
            "sparsity_spec": self.state.get("sparsity_spec"),
            "config": self.config,
        }


def read_run_config(run_dir: Path | None) -> dict:
    """The resolved config a run saved (config.yaml), as plain JSON-able data; {} when there is none."""
    config_file = RunDir(run_dir).config if run_dir is not None else None
    if config_file is None or not config_file.is_file():
        return {}
    try:
        from omegaconf import OmegaConf
    except ImportError:  # a serving machine without the training stack: the saved config is already resolved
        OmegaConf = None  # noqa: N806
    try:
        if OmegaConf is None:
            import yaml

            conf = yaml.safe_load(config_file.read_text())
        else:
            conf = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    except Exception as err:  # omegaconf/yaml raise many types for a damaged file
        raise CheckpointError(f"{config_file} cannot be read: {str(err).splitlines()[0]}") from None
    return json.loads(json.dumps(conf, default=str))


def load_source(path: str | Path) -> Source:
    """Load a run directory (its checkpoints/last.pt) or a checkpoint file, weights only."""
    artifact = resolve_checkpoint(path)
    checkpoint = artifact.checkpoint
    state = load_checkpoint(checkpoint)
    for key in ("model_spec", "model"):
        if not state.get(key):
            raise CheckpointError(f"{checkpoint} has no '{key}': it is not a complete superblock checkpoint")
    run_dir = artifact.run_dir
    config = read_run_config(run_dir) or state.get("config") or {}
    return Source(checkpoint, run_dir, state, json.loads(json.dumps(config, default=str)))
