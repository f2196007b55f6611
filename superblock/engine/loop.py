"""One epoch of training: micro-batches -> (accumulated) optimizer steps, with logging and checkpoint hooks.

`train_one_epoch` owns no state of its own: it advances the `Progress` it is given, steps the optimizer, the lr
schedule, the sparsity controller (masks recomputed once per optimizer step) and the EMA, and calls back for
logging and checkpoints at the steps `EpochPlan` names.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from superblock.data import skip_batches
from superblock.engine.ema import ModelEma
from superblock.engine.objective import Objective
from superblock.engine.state import Progress
from superblock.progress import epoch_progress
from superblock.sparsity import get_controller


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN or infinite."""


@dataclass
class StepParts:
    """What one optimizer step touches. `model` is the bare model; `train_model` what the loop calls (DDP /
    compiled wrapper or the model itself)."""

    model: nn.Module
    train_model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    device: torch.device
    amp_dtype: torch.dtype | None
    accumulate: int = 1
    grad_clip: float | None = None
    distributed: bool = False
    # Steps whose gradient norm was not finite, counted on the device (no host sync per step).
    nonfinite_grads: torch.Tensor = field(default_factory=lambda: torch.zeros(()))

    def autocast(self) -> torch.autocast:
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None)


@dataclass(kw_only=True)
class EpochPlan:
    """What one epoch does besides training: its place in the run, when it logs and checkpoints (by keyword)."""

    epoch: int
    max_epochs: int
    usable_batches: int  # whole accumulation groups only
    total_steps: int
    log_every_steps: int
    checkpoint_every_steps: int = 0
    fault_at_step: int | None = None  # tests only: SIGKILL right after this step
    show_progress: bool = True
    progress_every_s: float = 30.0  # off a terminal: a plain progress line per epoch and at most one per this often


@dataclass
class Window:
    """The training loss and throughput since the last log line (it restarts every epoch and every resume)."""

    loss: torch.Tensor
    images: int = 0  # samples: images, or token sequences of a language model
    tokens: int = 0  # a language model's input tokens (integer inputs); 0 for images
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    @property
    def mean_loss(self) -> float:
        return float(self.loss) / max(self.steps, 1)  # divide by the steps it really holds


def _paused(window: Window, save: Callable[[Window], None]) -> None:
    """save(window) outside the window's throughput: its clock moves on by the time the save took (queued device
    work is finished first, so the save's wait for it is not taken out of the training time)."""
    if window.loss.is_cuda:
        torch.cuda.synchronize(window.loss.device)
    start = time.perf_counter()
    save(window)
    window.start += time.perf_counter() - start


def check_finite(window: Window, parts: StepParts, step: int, last_good: str) -> None:
    """Stop before a non-finite loss or gradient can reach a log line or a checkpoint."""
    what = None
    if not math.isfinite(float(window.loss)):
        what = f"loss became {float(window.loss)}"
    elif float(parts.nonfinite_grads) > 0:
        what = "a gradient became non-finite (nan/inf), so the weights are no longer finite,"
    if what is not None:
        raise TrainingDiverged(
            f"{what} by step {step}: training stopped. The last good checkpoint is {last_good}; lower optim.lr or "
            "enable trainer.grad_clip and resume"
        )


def optimizer_step(parts: StepParts, progress: Progress) -> None:
    """Unscale, clip, step; then the lr schedule, the masks (controller) and the EMA follow the new weights."""
    parts.scaler.unscale_(parts.optimizer)
    # The norm is computed anyway (max_norm=inf only measures): a non-finite one is counted on the device, no
    # sync, and checked before anything is logged or checkpointed. fp16's scaler skips such steps itself.
    norm = nn.utils.clip_grad_norm_(parts.model.parameters(), parts.grad_clip or float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
    if not parts.scaler.is_enabled():
        parts.nonfinite_grads += (~torch.isfinite(norm)).to(parts.nonfinite_grads.dtype)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.lr_scheduler.step()
    ctrl = get_controller(parts.model)
    if ctrl is not None:
        ctrl.step()
    if parts.ema is not None:
        parts.ema.update(parts.model)
    progress.step += 1


def _backward(parts: StepParts, inputs: torch.Tensor, targets: torch.Tensor, boundary: bool) -> torch.Tensor:
    # Between accumulation boundaries DDP must not all-reduce: the gradients are still being summed locally.
    sync = parts.train_model.no_sync() if (parts.distributed and not boundary) else nullcontext()
    with sync:
        loss = parts.objective(parts.train_model, inputs, targets, parts.autocast())
        parts.scaler.scale(loss / parts.accumulate).backward()
    return loss.detach() / parts.accumulate


def train_one_epoch(
    *,
    parts: StepParts,
    loader: DataLoader,
    progress: Progress,
    plan: EpochPlan,
    on_log: Callable[[Window, int], dict[str, float]],
    on_checkpoint: Callable[[Window], None],
    on_end: Callable[[Window], None],
    world_size: int = 1,
) -> bool:
    """One epoch, or its remainder after a resume (the loader's order is a function of (seed, epoch), so the
    batches the checkpoint had consumed are skipped, not re-read). Returns whether the epoch was completed.

    Hooks: `on_log(window, step)` at logging steps returns the progress bar's postfix; `on_checkpoint(window)` at
    checkpoint steps; `on_end(window)` with the unlogged rest when the loader is exhausted."""
    skip = progress.batch_in_epoch
    bar = epoch_progress(
        plan.usable_batches,
        skip,
        f"epoch {plan.epoch + 1}/{plan.max_epochs}",
        enabled=plan.show_progress,
        every_s=plan.progress_every_s,
        step=lambda: progress.step,
    )
    window = Window(torch.zeros((), device=parts.device))
    parts.train_model.train()
    try:
        for i, (inputs, targets) in enumerate(skip_batches(loader, skip), start=skip):
            if i >= plan.usable_batches:
                break
            inputs = inputs.to(parts.device, non_blocking=True)
            targets = targets.to(parts.device, non_blocking=True)
            boundary = (i + 1) % parts.accumulate == 0
            window.loss += _backward(parts, inputs, targets, boundary)
            window.images += len(inputs) * world_size
            if not inputs.is_floating_point():  # token ids: throughput in tokens is what language models report
                window.tokens += inputs.numel() * world_size
            progress.batch_in_epoch = i + 1
            bar.update(1)
            if not boundary:
                continue
            optimizer_step(parts, progress)
            step, window.steps = progress.step, window.steps + 1
            if step % plan.log_every_steps == 0 or step == plan.total_steps:
                bar.set_postfix(on_log(window, step))
                window = Window(torch.zeros((), device=parts.device))
            if plan.checkpoint_every_steps and step % plan.checkpoint_every_steps == 0:
                _paused(window, on_checkpoint)
            if step == plan.fault_at_step:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume tests
            if step >= plan.total_steps:
                return progress.batch_in_epoch >= plan.usable_batches
        on_end(window)
        return True
    finally:
        bar.close()
