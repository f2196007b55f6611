"""When a training run permutes its weights to fit the tiles (`sparsity.permute`): the moment masks are first chosen.

- The schedule cuts tiles from step 0 (fine-tuning from pretrained weights, the reference recipe, every ramp that
  starts at once): the model is permuted after it is built and its weights loaded, before `sparsify` gives it
  scores (magnitude scores then come from the permuted weights). Nothing else exists yet.
- The ramp starts later (`sparsity.start_epoch > 0`, a dense warm-up): at the ramp's first step, before that step's
  masks are chosen. The weights, their optimizer moments and the EMA copy are permuted together, and the scores are
  drawn again by `sparsity.score_init` (magnitude: from the permuted weights; activation: measured again on the
  calibration batches through the permuted model), since a tile's score no longer describes the tile; their
  optimizer state is dropped.

Not at the end of the ramp (`freeze_after_ramp`): the masks frozen there are those the learned scores chose, and a
permutation then would replace them by magnitude masks. The record (mode, step, kept magnitude before / after) is
part of the controller's saved state, so a resumed run never permutes again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from superblock.engine.ema import ModelEma
from superblock.sparsity import get_controller, mask_parameters
from superblock.sparsity.permute import PermutationReport, permute_model, reset_scores

_TARGET_KEYS = ("block_overrides", "targets", "exclude", "skip_first_block", "skip_head")


def _permute_args(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "block_size": tuple(spec["block_size"]),
        "sparsity": spec["sparsity"],
        **{k: spec[k] for k in _TARGET_KEYS if k in spec},
    }


def first_cut(spec: dict[str, Any]) -> int:
    """The first step at which tiles can be cut: the ramp's start when it ramps up from 0 (a constant schedule, or a
    ramp from a non-zero initial sparsity, cuts from step 0)."""
    ramps_from_dense = spec.get("schedule", "constant") != "constant" and not spec.get("initial_sparsity", 0.0)
    return int(spec.get("start_step", 0)) if ramps_from_dense else 0


def permute_before_masks(model: nn.Module, mode: str, spec: dict[str, Any] | None) -> PermutationReport | None:
    """Permute a freshly built (not yet sparsified) model when its masks are chosen from step 0; else None."""
    if mode == "none" or not spec or first_cut(spec) > 0:
        return None
    return permute_model(model, mode, **_permute_args(spec))


def record(model: nn.Module, report: PermutationReport, step: int) -> None:
    """Note in the model's sparsity state that its weights are permuted (saved with every checkpoint)."""
    controller = get_controller(model)
    if controller is not None:
        controller.permutation = {**report.to_dict(), "step": step}


def schedule_permutation(
    model: nn.Module,
    mode: str,
    spec: dict[str, Any] | None,
    optimizer: torch.optim.Optimizer,
    ema: ModelEma | None,
    *,
    seed: int,
    announce: bool,
    rescore: Callable[[], None] | None = None,
) -> None:
    """Permute at the ramp's first step when the ramp starts later than step 0 (a hook on the controller).
    `rescore` (score_init=activation) measures the scores of the permuted model and its followers again; without
    it the scores are drawn by `score_init` alone."""
    controller = get_controller(model)
    if mode == "none" or not spec or controller is None or first_cut(spec) == 0:
        return
    start = first_cut(spec)

    def hook(step: int) -> None:
        if step != start or controller.permutation is not None:  # resumed past it: the weights hold it already
            return
        followers = [ema.module] if ema is not None else []
        report = permute_model(model, mode, optimizers=[optimizer], followers=followers, **_permute_args(spec))
        reset_scores(model, spec.get("score_init", "kaiming"), [optimizer], seed=seed + step)
        for follower in followers:
            for live, copy in zip(_scores(model), _scores(follower), strict=True):
                copy.copy_(live)
        record(model, report, step)
        if ema is not None:
            record(ema.module, report, step)
        if announce:
            tqdm.write(f"step {step}: {report}")
        if rescore is not None:
            rescore()

    controller.add_step_hook(hook)


def _scores(model: nn.Module) -> list[torch.Tensor]:
    return [p.data for p in mask_parameters(model)]


def describe(model: nn.Module) -> str | None:
    """The line a run prints about its permutation (None when its weights are not permuted)."""
    controller = get_controller(model)
    r = controller.permutation if controller is not None else None
    if not r:
        return None
    return (
        f"permutation ({r['mode']}) at step {r['step']}: kept magnitude {r['kept_before']:.4f} -> "
        f"{r['kept_after']:.4f} ({r['kept_after'] - r['kept_before']:+.4f}); {r['permuted']} of {r['couplings']} "
        "coupled groups permuted"
    )
