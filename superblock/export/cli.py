"""Glue between Hydra and export_checkpoint / evaluate: plain arguments in, a clear error line and exit code out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from superblock.cli import fail


def plain_args(cfg: DictConfig, required: tuple[str, ...] = ("checkpoint",)) -> dict[str, Any]:
    """The config (without the hydra node) as a dict; a clear error for a required value left unset."""
    for key in required:
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
            fail(f"{key}=<path> is required, e.g. {key}=outputs/<run dir>", 2)
    keys = [k for k in cfg if k != "hydra"]
    try:
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", "") or "a value"
        fail(f"missing value for {key}: set it on the command line, e.g. {key}=...", 2)


def run_cli(fn: Callable[..., Any], args: dict[str, Any]) -> Any:
    """Call fn(**args); user mistakes and bad inputs (ValueError, missing files) exit 1 with one line."""
    try:
        return fn(**args)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err), 1)
