"""Is the run long enough? Checked before it starts (steps left to recover at the final sparsity) and when it ends
(was validation still improving).

Sparse runs need optimizer steps at full sparsity to recover. `MIN_RECOVERY_STEPS` is the floor that our real-data
grids support (docs/frontier.md, "Accuracy against run length": the knee differs by set, so the floor is the
conservative one); a run below it is told so, with the overrides that fix it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MIN_RECOVERY_STEPS = 600
# Image training sets smaller than this (real data, not the procedural smoke set) get a floor on the run's length
# under trainer.min_steps=auto: at the default batch a few thousand images are a dozen steps an epoch, and the
# default number of epochs leaves the masks no time to recover.
SMALL_DATASET = 20_000


def step_floor(min_recovery_steps: int, ramp_fraction: float | None, fixed: int = 0) -> int:
    """Total optimizer steps that leave `min_recovery_steps` at full sparsity after `fixed` steps (a dense start, a
    ramp of fixed length) and a ramp over `ramp_fraction` of the run (0 when the check is off or the ramp takes the
    whole run)."""
    share = 1.0 - ramp_fraction if ramp_fraction is not None else 1.0
    if min_recovery_steps <= 0 or share <= 0:
        return 0
    return math.ceil((min_recovery_steps + fixed) / share)


def auto_min_steps(data_name: str, task: str, n_train: int, floor: int) -> int | None:
    """What trainer.min_steps=auto means for a dataset: `floor` for a small real image set, else no floor. Dense
    runs get the same floor as sparse ones, so the two compare at a matched length."""
    small = data_name != "synthetic" and task == "image_classification" and 0 < n_train < SMALL_DATASET
    return floor if small and floor > 0 else None


def raised_length_notice(
    max_epochs: int, epochs: int, steps_per_epoch: int, min_steps: Any, floor: int, n_train: int
) -> str:
    """The start-up line of a run that trains more epochs than trainer.max_epochs to reach its step floor
    (`min_steps`: the setting, `floor`: the steps it asked for)."""
    why = (
        f"trainer.min_steps=auto: a small image set ({n_train:,} training images) trains at least {floor:,} "
        "optimizer steps so the masks recover at full sparsity and dense compares at the same length"
        if min_steps == "auto"
        else f"trainer.min_steps={min_steps}"
    )
    return (
        f"run length: {epochs} epochs instead of trainer.max_epochs={max_epochs} ({steps_per_epoch} steps/epoch; "
        f"{why}). trainer.min_steps=null trains exactly max_epochs; trainer.max_steps caps the run."
    )


def ramp_share(schedule: str, ramp_fraction: float | None) -> float | None:
    """The fraction of the run a ramp takes (sparsity.ramp_fraction): none for a constant schedule, which is at the
    final sparsity from its start (sparsity=oneshot keeps an experiment's ramp_fraction but never ramps)."""
    return None if schedule == "constant" else ramp_fraction


def _ramp_steps(spec: dict[str, Any]) -> int:
    return 0 if spec.get("schedule") == "constant" else int(spec.get("ramp_steps", 0))


def recovery_steps(spec: dict[str, Any] | None, total_steps: int) -> int | None:
    """Optimizer steps the run takes at its final sparsity, after the ramp (None for a dense run)."""
    if not spec:
        return None
    return max(0, total_steps - int(spec.get("start_step", 0)) - _ramp_steps(spec))


def recovery_notice(
    spec: dict[str, Any] | None,
    *,
    total_steps: int,
    steps_per_epoch: int,
    max_epochs: int,
    batch_size: int,
    ramp_fraction: float | None,
    floor: int = MIN_RECOVERY_STEPS,
) -> str | None:
    """A start-up message when the steps at full sparsity are below `floor` (0 turns it off): what will happen and
    the overrides that reach the floor. None when the run is long enough, dense, or the check is off."""
    have = recovery_steps(spec, total_steps)
    if have is None or floor <= 0 or have >= floor:
        return None
    level = spec["sparsity"]
    ramp_fraction = ramp_share(spec.get("schedule", "cubic"), ramp_fraction)
    fixed = int(spec.get("start_step", 0)) + (0 if ramp_fraction is not None else _ramp_steps(spec))
    steps_needed = step_floor(floor, ramp_fraction, fixed)  # total steps that leave `floor` after the ramp
    if not steps_needed:  # the ramp takes the whole run: no length is enough
        fixes = ["sparsity.ramp_fraction below 1 (a ramp that ends before the run does)"]
    elif total_steps < steps_per_epoch * max_epochs:  # trainer.max_steps is what ends the run
        fixes = [f"trainer.max_steps={steps_needed}"]
    else:
        fixes = [f"trainer.min_steps={steps_needed}",
                 f"trainer.max_epochs={math.ceil(steps_needed / max(steps_per_epoch, 1))}"]  # fmt: skip
        batch = batch_size
        while batch > 8 and steps_per_epoch * batch_size // batch * max_epochs < steps_needed:
            batch //= 2
        if batch < batch_size and steps_per_epoch * batch_size // batch * max_epochs >= steps_needed:
            fixes.append(f"data.batch_size={batch}")
    return (
        f"run length: {have} optimizer steps at the final sparsity {level:g} after the ramp ({steps_per_epoch} "
        f"steps/epoch, {total_steps} in all). Sparse runs need about {floor} there to recover (docs/frontier.md, "
        f"'Accuracy against run length'). Compare with dense at a matched, "
        f"sufficient length, or lengthen the run: {' | '.join(fixes)}. "
        f"(sparsity.min_recovery_steps=0 silences this.)"
    )


def still_improving(history: Sequence[float], noise: float, higher_is_better: bool = True) -> tuple[bool, float]:
    """(improving, slope per validation) over the last third of the validations (at least 3): the least-squares
    slope, and whether the gain it predicts across that window is more than twice `noise` (the standard error of
    one measurement) and more than twice the window's own scatter about the line."""
    if len(history) < 3:
        return False, 0.0
    ys = [float(v) if higher_is_better else -float(v) for v in history[-max(3, math.ceil(len(history) / 3)) :]]
    k = len(ys)
    xm, ym = (k - 1) / 2, sum(ys) / k
    sxx = sum((i - xm) ** 2 for i in range(k))
    slope = sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sxx
    scatter = math.sqrt(sum((y - (ym + slope * (i - xm))) ** 2 for i, y in enumerate(ys)) / max(k - 2, 1))
    gain = slope * (k - 1)
    improving = gain > 2.0 * max(noise, scatter, 1e-12)
    return improving, slope if higher_is_better else -slope


def accuracy_noise(top1_percent: float, n: int) -> float:
    """Standard error in points of an accuracy measured on n examples (binomial)."""
    p = min(max(top1_percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / max(n, 1))
