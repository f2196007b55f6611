"""The training run: build everything from a validated config, train, checkpoint, resume, summarize."""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from superblock.config import TrainConfig, check_strict_blocks
from superblock.data import build_datasets, build_loaders, skip_batches
from superblock.devices import dtype_name_or_auto, parse_dtype
from superblock.engine.checkpoint import load_checkpoint, resolve_checkpoint_path, save_checkpoint
from superblock.engine.distill import distillation_loss, load_teacher
from superblock.engine.distributed import DistInfo, all_gather_object, barrier
from superblock.engine.ema import ModelEma
from superblock.engine.evaluation import evaluate
from superblock.engine.optim import build_lr_scheduler, build_optimizer
from superblock.engine.pretrained import is_run_source, load_run_weights
from superblock.engine.timer import StepTimer
from superblock.io import write_json_atomically
from superblock.logging import MetricLogger, build_logger
from superblock.models import build_model, model_spec
from superblock.rundir import RunDir, RunSummary
from superblock.seeding import seed_everything, stable_seed
from superblock.sparsity import block_sparsity, get_controller, iter_block_masks, normalize_block_size, sparsify


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches already consumed in `epoch`
    step: int = 0  # optimizer steps
    best_top1: float = -1.0
    best_top5: float = -1.0
    train_images: int = 0  # throughput, steady state: first logging window of each process start left out
    train_seconds: float = 0.0
    warmup_images: int = 0  # that first window, used only when there is nothing else
    warmup_seconds: float = 0.0
    last_metrics: dict[str, float] = field(default_factory=dict)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s training randomness (dropout, drop-path, mixup/cutmix draws): rank 0 keeps the
    run's seed, so a single-process run is unchanged; other ranks get their own streams."""
    return seed if rank == 0 else stable_seed("rank", seed, rank)


def rng_state() -> dict[str, Any]:
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((state["python_version"], tuple(int(v) for v in py[:-1]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sparsity_spec(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> dict[str, Any] | None:
    """Flat keyword arguments of `sparsify` (JSON-able; stored in checkpoints)."""
    s = cfg.sparsity
    if not s.enabled:
        return None
    block = normalize_block_size(s.block_size)
    ramp = s.ramp_fraction * total_steps if s.ramp_fraction is not None else s.ramp_epochs * steps_per_epoch
    return {
        "sparsity": s.level, "block_size": list(block), "targets": list(s.targets), "exclude": list(s.exclude),
        "skip_first_block": s.skip_first_block, "skip_head": s.skip_head, "allocation": s.allocation,
        "min_density": s.min_density, "schedule": s.schedule, "initial_sparsity": s.initial,
        "ramp_steps": int(round(ramp)),
        "start_step": int(round(s.start_epoch * steps_per_epoch)),
        "score_init": s.score_init, "fixed_weight": s.fixed_weight, "fixed_mask": s.fixed_mask,
    }


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """trainer.precision on `device` as the autocast dtype; None for fp32 (no autocast)."""
    precision = dtype_name_or_auto(precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision=fp16 needs a CUDA GPU: use fp32 or bf16 on CPU")
    return None if precision == "fp32" else parse_dtype(precision)


def mask_digest(model: nn.Module) -> str:
    """A hash of every hard mask: equal on every rank when DDP keeps the scores in sync."""
    h = hashlib.sha256()
    for name, _, _, m in iter_block_masks(model):
        h.update(name.encode())
        h.update(m.mask.detach().to("cpu", torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_size(model: nn.Module) -> tuple[int, int]:
    """(parameters of the deployable model, of which kept): scores don't count; masked tiles aren't kept."""
    scores = {id(m.scores) for _, _, _, m in iter_block_masks(model)}
    originals = {}
    for _, module, pname, _ in iter_block_masks(model):
        originals[id(module.parametrizations[pname].original)] = getattr(module, pname)
    total = kept = 0
    for p in model.parameters():
        if id(p) in scores:
            continue
        total += p.numel()
        kept += int((originals[id(p)] != 0).sum()) if id(p) in originals else p.numel()
    return total, kept


FAULT_AT_STEP_ENV = "SUPERBLOCK_FAULT_AT_STEP"


def fault_at_step() -> int | None:
    """Tests only: $SUPERBLOCK_FAULT_AT_STEP=N makes the run SIGKILL itself right after optimizer step N."""
    value = os.environ.get(FAULT_AT_STEP_ENV, "").strip()
    return int(value) if value else None


class Trainer:
    """One training run in `run_dir` (layout: superblock.rundir.RunDir). `fit()` returns its RunSummary (train.py
    writes it to summary.json)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, dist: DistInfo, resolved_config: dict) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.run = RunDir(run_dir)
        self.dist = dist
        self.device = dist.device
        self.resolved_config = resolved_config
        self.amp_dtype = autocast_dtype(cfg.trainer.precision, self.device)
        seed_everything(cfg.seed)  # same model init and scores on every rank
        self._build_data()
        self._build_model()
        self._build_optim()
        # From here on every rank draws its own dropout / drop-path / mixup numbers (data: see SeededSamples).
        seed_everything(rank_seed(cfg.seed, dist.rank))
        self._nonfinite_grads = torch.zeros((), device=self.device)
        self._rng_states = [rng_state()]
        self.progress = Progress()
        self.logger: MetricLogger | None = None
        self.bar = None
        self._warm = False
        self._fault_at_step = fault_at_step()

    # ----------------------------------------------------------------------------------------------- setup
    def _build_data(self) -> None:
        c = self.cfg.data
        self.bundle = build_datasets(
            c.name, root=c.root, image_size=c.image_size, download=c.download, train_size=c.train_size,
            val_size=c.val_size, seed=self.cfg.seed, randaugment=c.randaugment, augment=asdict(c.augment),
        )
        self.train_loader, self.val_loader, self.sampler = build_loaders(
            self.bundle, batch_size=c.batch_size, num_workers=c.num_workers, seed=self.cfg.seed,
            distributed=self.dist.distributed, eval_batch_size=c.eval_batch_size,
        )
        accum = self.cfg.trainer.accumulate_grad_batches
        self.batches_per_epoch = len(self.train_loader)
        self.steps_per_epoch = self.batches_per_epoch // accum
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has {self.batches_per_epoch} batches, fewer than trainer.accumulate_grad_batches="
                f"{accum}: lower data.batch_size or accumulate_grad_batches, or use more data"
            )
        self.total_steps = self.steps_per_epoch * self.cfg.trainer.max_epochs
        if self.cfg.trainer.max_steps:
            self.total_steps = min(self.total_steps, self.cfg.trainer.max_steps)

    def _build_model(self) -> None:
        m = self.cfg.model
        name = m.name
        if m.source == "timm" and not name.startswith("timm:"):
            name = f"timm:{name}"
        self.model_spec = model_spec(
            name, num_classes=self.bundle.num_classes, image_size=m.image_size or self.bundle.image_size,
            pretrained=m.pretrained, **m.kwargs,
        )
        from_run = is_run_source(m.pretrained)  # a dense (or masked) superblock run to start from
        model = build_model(**{**self.model_spec, "pretrained": None} if from_run else self.model_spec)
        if from_run:
            load_run_weights(model, m.pretrained)
        self.teacher = self._teacher_timer = None
        if self.cfg.distill.teacher:
            self.teacher = load_teacher(self.cfg.distill.teacher, {**self.model_spec, "pretrained": None}, self.device)
            self._teacher_timer = StepTimer(self.device)
        self.sparsity_spec = sparsity_spec(self.cfg, self.steps_per_epoch, self.total_steps)
        self.report = None
        if self.sparsity_spec:
            if self.cfg.sparsity.strict_blocks:
                dry = sparsify(model, **self.sparsity_spec, dry_run=True)
                check_strict_blocks({r.name: r.shape for r in dry.rows}, normalize_block_size(dry.rows[0].block))
            self.report = sparsify(model, **self.sparsity_spec, seed=self.cfg.seed)
        self.model = model.to(self.device)
        self.ema = ModelEma(self.model, self.cfg.trainer.ema_decay) if self.cfg.trainer.ema_decay else None
        self.train_model: nn.Module = self.model
        if self.dist.distributed:
            # Masks are buffers that every rank derives from identical scores: no need to broadcast them each step.
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        if self.cfg.trainer.compile:
            self.train_model = torch.compile(self.train_model)
            if self.teacher is not None:
                self.teacher = torch.compile(self.teacher)

    def _build_optim(self) -> None:
        o, t = self.cfg.optim, self.cfg.trainer
        self.optimizer = build_optimizer(
            self.model, o.name, lr=o.lr, weight_decay=o.weight_decay, scores_lr=self.cfg.sparsity.scores_lr,
            betas=tuple(o.betas), momentum=o.momentum, nesterov=o.nesterov,
        )
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, self.total_steps, int(round(o.warmup_epochs * self.steps_per_epoch)), o.lr, o.min_lr,
            o.warmup_start_factor, o.lr_schedule,
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.mixup = None
        if t.mixup > 0 or t.cutmix > 0:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            self.mixup = Mixup(
                mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing,
                num_classes=self.bundle.num_classes,
            )
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)

    # ---------------------------------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "model_spec": self.model_spec,
            "sparsity_spec": self.sparsity_spec,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self._rng_states[0],
            "rng_per_rank": self._rng_states,
            "progress": asdict(self.progress),
            "epoch": self.progress.epoch,
            "step": self.progress.step,
            "config": self.resolved_config,
            "metrics": dict(self.progress.last_metrics),
        }

    def save(self, path: Path | None = None) -> None:
        """Checkpoint to `path` (default: the run's last.pt) on rank 0."""
        self._rng_states = all_gather_object(rng_state())  # each rank resumes its own random streams
        if self.dist.is_main:
            save_checkpoint(path or self.run.last, self.state())
        barrier()

    def resume_from(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if state.get("model_spec") != self.model_spec or state.get("sparsity_spec") != self.sparsity_spec:
            raise ValueError(
                f"cannot resume from {path}: it was trained with a different model or sparsity config "
                f"(model {state.get('model_spec')}, sparsity {state.get('sparsity_spec')})"
            )
        self.model.load_state_dict(state["model"])
        if self.ema and state.get("ema") is not None:
            self.ema.load(state["ema"], state.get("ema_updates", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if len(per_rank) == self.dist.world_size:
            set_rng_state(per_rank[self.dist.rank])
        else:  # resumed on another number of ranks: fresh per-rank streams, derived from the step
            seed_everything(rank_seed(self.cfg.seed + self.progress.step, self.dist.rank))

    # -------------------------------------------------------------------------------------------- training
    def _forward_loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=bool(self.amp_dtype))
        with autocast:
            logits = self.train_model(images)
        loss = self.criterion(logits.float(), targets)
        if self.teacher is None:
            return loss
        d = self.cfg.distill
        with autocast, torch.no_grad(), self._teacher_timer:  # the teacher sees the same (mixed) batch
            teacher_logits = self.teacher(images)
        return distillation_loss(logits, teacher_logits, loss, d.alpha, d.temperature, d.hard)

    def _optimizer_step(self) -> None:
        t = self.cfg.trainer
        self.scaler.unscale_(self.optimizer)
        # The norm is computed anyway (max_norm=inf only measures): a non-finite one is counted on the device, no
        # sync, and checked before anything is logged or checkpointed. fp16's scaler skips such steps itself.
        norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or float("inf"))
        if not self.scaler.is_enabled():
            self._nonfinite_grads += (~torch.isfinite(norm)).to(self._nonfinite_grads.dtype)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        ctrl = get_controller(self.model)
        if ctrl is not None:
            ctrl.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.progress.step += 1

    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        """Stop before a non-finite loss or gradient can reach a log line or a checkpoint."""
        what = None
        if not math.isfinite(float(loss_sum)):
            what = f"loss became {float(loss_sum)}"
        elif float(self._nonfinite_grads) > 0:
            what = "a gradient became non-finite (nan/inf), so the weights are no longer finite,"
        if what is not None:
            raise TrainingDiverged(
                f"{what} by step {self.progress.step}: training stopped. The last good checkpoint is "
                f"{self.run.last}; lower optim.lr or enable trainer.grad_clip and resume"
            )

    def _train_epoch(self, epoch: int) -> bool:
        """One epoch (or its remainder after a resume). Returns whether the epoch was completed."""
        t, accum = self.cfg.trainer, self.cfg.trainer.accumulate_grad_batches
        self.sampler.set_epoch(epoch)  # order and augmentations: functions of (seed, epoch[, index])
        skip = self.progress.batch_in_epoch
        usable = self.steps_per_epoch * accum
        self.bar = tqdm(
            total=usable, initial=skip, desc=f"epoch {epoch + 1}/{t.max_epochs}", unit="batch",
            disable=not self.dist.is_main, dynamic_ncols=True, leave=True,
        )
        window_loss = torch.zeros((), device=self.device)
        window_images, window_steps, window_start = 0, 0, time.perf_counter()
        self.train_model.train()
        # Resume mid-epoch: the sampler order is a function of (seed, epoch), so start right after the batches the
        # checkpoint had consumed without reading them again.
        for i, (images, targets) in enumerate(skip_batches(self.train_loader, skip), start=skip):
            if i >= usable:
                break
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            boundary = (i + 1) % accum == 0
            sync = self.train_model.no_sync() if (self.dist.distributed and not boundary) else nullcontext()
            with sync:
                loss = self._forward_loss(images, targets)
                self.scaler.scale(loss / accum).backward()
            window_loss += loss.detach() / accum
            window_images += len(images) * self.dist.world_size
            self.progress.batch_in_epoch = i + 1
            self.bar.update(1)
            if not boundary:
                continue
            self._optimizer_step()
            step = self.progress.step
            window_steps += 1
            if step % t.log_every_steps == 0 or step == self.total_steps:
                window_loss = self._log_train(window_loss, window_steps, window_images, window_start, step)
                window_images, window_steps, window_start = 0, 0, time.perf_counter()
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                self._check_finite(window_loss)
                self.save()
            if step == self._fault_at_step:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume tests
            if step >= self.total_steps:
                self.bar.close()
                return self.progress.batch_in_epoch >= usable
        self.bar.close()
        self._check_finite(window_loss)
        return True

    def _log_train(
        self, window_loss: torch.Tensor, steps_in_window: int, images: int, start: float, step: int
    ) -> torch.Tensor:
        # The window restarts with every epoch and every resume: divide by the steps it really holds.
        loss = float(window_loss) / max(steps_in_window, 1)
        self._check_finite(window_loss)
        elapsed = max(time.perf_counter() - start, 1e-9)
        if self._warm:
            self.progress.train_images += images
            self.progress.train_seconds += elapsed
        else:  # the first window pays for cuDNN/cuBLAS autotuning, allocator growth, compilation
            self.progress.warmup_images += images
            self.progress.warmup_seconds += elapsed
            self._warm = True
        ctrl = get_controller(self.model)
        metrics = {
            "train_loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
            "sparsity": ctrl.sparsity if ctrl else 0.0, "images_per_s": images / elapsed,
            "step_ms": 1000.0 * elapsed / max(steps_in_window, 1), "epoch": self.progress.epoch,
        }
        if self._teacher_timer is not None:  # the distillation teacher's share of the step time
            metrics["teacher_ms"] = self._teacher_timer.pop_ms() / max(steps_in_window, 1)
        if self.logger:
            self.logger.log(metrics, step)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.3f}", lr=f"{metrics['lr']:.2e}", sparsity=f"{metrics['sparsity']:.2f}",
                img_s=f"{metrics['images_per_s']:.0f}",
            )
        return torch.zeros((), device=self.device)

    def _validate(self) -> dict[str, float]:
        metrics = evaluate(self.model, self.val_loader, self.device, self.amp_dtype)
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_loader, self.device, self.amp_dtype)
            metrics.update({f"ema_{k}": v for k, v in ema.items()})
        return metrics

    def fit(self, resume: Path | None = None) -> RunSummary:
        t = self.cfg.trainer
        if resume is not None:
            self.resume_from(resume)
        self.logger = build_logger(
            self.cfg.logger.name, self.run_dir, self.dist.is_main, self.resolved_config, self.cfg.logger.project,
            self.cfg.logger.entity, self.cfg.logger.mode, self.cfg.logger.tags,
        )
        status = "failed"
        try:
            if resume is not None and self.dist.is_main:
                self.logger.sinks[0].truncate_after(self.progress.step)
            if self.dist.is_main and self.report is not None and resume is None:
                print(self.report)
            while self.progress.step < self.total_steps and self.progress.epoch < t.max_epochs:
                epoch = self.progress.epoch
                finished = self._train_epoch(epoch)
                if finished:
                    self.progress.epoch, self.progress.batch_in_epoch = epoch + 1, 0
                done = self.progress.step >= self.total_steps or self.progress.epoch >= t.max_epochs
                if (finished and (epoch + 1) % t.val_every_epochs == 0) or done:
                    self._end_epoch_validation(epoch)
                self.save()
            if not self.progress.last_metrics:
                self._end_epoch_validation(self.progress.epoch)
            status = "completed"
            return self.summary(status)
        finally:
            self.logger.finish(status)

    def _end_epoch_validation(self, epoch: int) -> None:
        metrics = self._validate()
        self.progress.last_metrics = metrics
        if self.logger:
            self.logger.log({**metrics, "epoch": epoch + 1}, self.progress.step)
        if self.dist.is_main:
            tqdm.write(
                f"epoch {epoch + 1}: val top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%  "
                f"loss {metrics['val_loss']:.4f}"
                + (f"  (EMA top-1 {metrics['ema_val_top1']:.2f}%)" if "ema_val_top1" in metrics else "")
            )
        if metrics["val_top1"] > self.progress.best_top1:
            self.progress.best_top1, self.progress.best_top5 = metrics["val_top1"], metrics["val_top5"]
            self.save(self.run.best)

    # --------------------------------------------------------------------------------------------- summary
    def summary(self, status: str) -> RunSummary:
        """What summary.json says about this run now (wall_time_s is left to the caller, who timed the whole job)."""
        digests = all_gather_object(mask_digest(self.model))
        spec = self.sparsity_spec
        masked = {n for n, _, _, _ in iter_block_masks(self.model)}
        measured = {}
        if spec:
            measured = {n: v for n, v in block_sparsity(self.model, spec["block_size"]).items() if n in masked}
        total, kept = model_size(self.model)
        p, m = self.progress, self.progress.last_metrics
        return RunSummary(
            status=status, error=None, model=self.cfg.model.name,
            sparsity=spec["sparsity"] if spec else 0.0,
            block_size=spec["block_size"] if spec else None,
            targets=spec["targets"] if spec else [],
            val_top1=m.get("val_top1"), val_top5=m.get("val_top5"), ema_val_top1=m.get("ema_val_top1"),
            best_val_top1=p.best_top1, best_val_top5=p.best_top5,
            block_sparsity=measured,
            mean_block_sparsity=sum(measured.values()) / len(measured) if measured else 0.0,
            params_total=total, params_kept=kept,
            wall_time_s=None, images_per_s=_rate(p.train_images, p.train_seconds)
            or _rate(p.warmup_images, p.warmup_seconds),
            epochs=p.epoch, steps=p.step, world_size=self.dist.world_size,
            masks_equal_across_ranks=len(set(digests)) == 1, mask_digest=digests[0],
            run_dir=str(self.run_dir),
        )


def _rate(images: int, seconds: float) -> float | None:
    return images / seconds if seconds > 0 else None


def write_summary(run_dir: Path, summary: RunSummary) -> None:
    write_json_atomically(RunDir(run_dir).summary, summary.to_dict())


def find_resume(resume: Any, run_dir: Path) -> Path | None:
    """trainer.resume: false -> None; true -> this run dir's last.pt (None if absent); a path -> its checkpoint."""
    if resume in (False, None, "false", "False"):
        return None
    if resume in (True, "true", "True"):
        path = RunDir(run_dir).last
        return path if path.is_file() else None
    path = resolve_checkpoint_path(Path(str(resume)).expanduser())
    if not path.is_file():
        raise ValueError(f"trainer.resume={resume}: no checkpoint at {path}")
    return path
