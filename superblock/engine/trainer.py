"""The training run: build every part from a validated config, train, checkpoint, resume, summarize.

The parts come from small builders (engine/builders.py), the state a checkpoint holds is a `TrainState` whose
parts save and load themselves (engine/state.py), an epoch is `train_one_epoch` (engine/loop.py) and validation
is `validate` (engine/validation.py). The Trainer only wires them and owns the run directory's files.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from superblock.artifacts.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from superblock.artifacts.resolve import resolve_checkpoint
from superblock.artifacts.spec import build_from_spec
from superblock.config import TrainConfig
from superblock.data import calibration_loader
from superblock.engine.builders import (
    autocast_dtype,
    build_data,
    build_model_spec,
    build_objective,
    build_optimization,
    build_student,
    sparsity_spec,
    wrap_for_training,
)
from superblock.engine.distill import distillation_line
from superblock.engine.distributed import DistInfo, all_gather_object, all_reduce_sum, barrier
from superblock.engine.ema import ModelEma
from superblock.engine.loop import EpochPlan, StepParts, TrainingDiverged, Window, check_finite, train_one_epoch
from superblock.engine.permutation import describe, schedule_permutation
from superblock.engine.run_length import (
    accuracy_noise,
    raised_length_notice,
    ramp_share,
    recovery_notice,
    step_floor,
    still_improving,
)
from superblock.engine.sharding import full_model_state, is_sharded
from superblock.engine.state import Progress, RankStreams, TrainState, rank_seed, rng_state, set_rng_state
from superblock.engine.validation import validate
from superblock.io import write_json_atomically
from superblock.logging import MetricLogger, build_logger
from superblock.models import starts_pretrained
from superblock.rundir import RunDir, RunSummary
from superblock.seeding import seed_everything
from superblock.sparsity import block_sparsity, fused, get_controller, iter_block_masks
from superblock.sparsity.calibrate import calibrate_scores
from superblock.sparsity.reconstruct import reconstruct_weights

__all__ = [
    "Progress",
    "Trainer",
    "TrainingDiverged",
    "find_resume",
    "rank_seed",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "write_summary",
]


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


class Trainer:
    """One training run in `run_dir` (layout: superblock.rundir.RunDir). `fit()` returns its RunSummary (train.py
    writes it to summary.json)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, dist: DistInfo, resolved_config: dict) -> None:
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.run_dir, self.run, self.resolved_config = run_dir, RunDir(run_dir), resolved_config
        t = cfg.trainer
        self.amp_dtype = autocast_dtype(t.precision, self.device)
        fused.set_enabled(t.fused_mask)  # process-wide: the masked weights' fused eager CUDA kernels
        seed_everything(cfg.seed)  # same model init and scores on every rank
        self.data = build_data(
            cfg.data,
            seed=cfg.seed,
            distributed=dist.distributed,
            accumulate=t.accumulate_grad_batches,
            max_epochs=t.max_epochs,
            max_steps=t.max_steps,
            min_steps=t.min_steps,
            auto_floor=step_floor(
                cfg.sparsity.min_recovery_steps, ramp_share(cfg.sparsity.schedule, cfg.sparsity.ramp_fraction)
            ),
        )
        self.bundle, self.total_steps = self.data.bundle, self.data.total_steps
        self.model_spec = build_model_spec(cfg.model, self.bundle)
        self.sparsity_spec = sparsity_spec(cfg.sparsity, self.data.steps_per_epoch, self.total_steps)
        model, self.report = build_student(
            self.model_spec,
            self.sparsity_spec,
            strict_blocks=cfg.sparsity.strict_blocks,
            seed=cfg.seed,
            permute=cfg.sparsity.permute,
        )
        self.model = model.to(self.device)
        self.parts = p = self._step_parts()
        schedule_permutation(
            self.model,
            cfg.sparsity.permute,
            self.sparsity_spec,
            p.optimizer,
            p.ema,
            seed=cfg.seed,
            announce=dist.is_main,
            rescore=self._calibrate_scores,
        )
        # From here on every rank draws its own dropout / drop-path / mixup numbers (data: see SeededSamples).
        seed_everything(rank_seed(cfg.seed, dist.rank))
        streams = RankStreams(cfg.seed, dist.rank, dist.world_size)
        self.state = TrainState(self.model, p.optimizer, p.lr_scheduler, p.scaler, p.ema, Progress(), streams)
        self.logger: MetricLogger | None = None
        self._warm = False

    def _step_parts(self) -> StepParts:
        """The objective, the EMA copy, the wrapped model (DDP / FSDP / compiled) and the optimization of a step."""
        cfg, t, dist = self.cfg, self.cfg.trainer, self.dist
        self.objective = build_objective(
            t,
            cfg.distill,
            num_classes=self.bundle.num_classes,
            student_spec=self.model_spec,
            device=self.device,
            student=self.model,
        )
        if self.objective.teacher is not None and dist.is_main:
            tqdm.write(distillation_line(cfg.distill))
        ema = ModelEma(self.model, t.ema_decay) if t.ema_decay else None
        # Before the optimizer: FSDP replaces the parameters with sharded ones.
        train_model = wrap_for_training(
            self.model, self.device, distributed=dist.distributed, compile=t.compile, strategy=t.strategy
        )
        optimizer, lr_scheduler, scaler = build_optimization(
            self.model,
            cfg.optim,
            scores_lr=cfg.sparsity.scores_lr,
            total_steps=self.total_steps,
            steps_per_epoch=self.data.steps_per_epoch,
            amp_dtype=self.amp_dtype,
        )
        return StepParts(
            model=self.model,
            train_model=train_model,
            objective=self.objective,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            scaler=scaler,
            ema=ema,
            device=self.device,
            amp_dtype=self.amp_dtype,
            accumulate=t.accumulate_grad_batches,
            grad_clip=t.grad_clip,
            distributed=dist.distributed,
            nonfinite_grads=torch.zeros((), device=self.device),
        )

    @property
    def progress(self) -> Progress:
        return self.state.progress

    @property
    def train_model(self) -> nn.Module:
        return self.parts.train_model

    # ---------------------------------------------------------------------------------------- checkpoints
    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint dict: the run's identity plus every part of the train state."""
        identity = {"model_spec": self.model_spec, "sparsity_spec": self.sparsity_spec, "config": self.resolved_config}
        return {**identity, **self.state.state_dict()}

    def save(self, path: Path | None = None) -> None:
        """Checkpoint to `path` (default: the run's last.pt) on rank 0 (every rank takes part: the random streams,
        and under FSDP the tensors, are gathered)."""
        self.state.rng.gather()  # each rank resumes its own random streams
        # Under FSDP building the checkpoint gathers the shards (every rank takes part); otherwise rank 0 alone.
        checkpoint = self.checkpoint() if self.dist.is_main or is_sharded(self.model) else None
        if self.dist.is_main:
            save_checkpoint(path or self.run.last, checkpoint)
        barrier()

    def resume_from(self, path: Path) -> None:
        # read onto the CPU: the random states must be CPU tensors, and load_state_dict moves the rest where it lives
        state = load_checkpoint(path, map_location="cpu")
        if state.get("model_spec") != self.model_spec or state.get("sparsity_spec") != self.sparsity_spec:
            raise ValueError(
                f"cannot resume from {path}: it was trained with a different model or sparsity config "
                f"(model {state.get('model_spec')}, sparsity {state.get('sparsity_spec')})"
            )
        self.state.load_state_dict(state)

    # -------------------------------------------------------------------------------------------- training
    def _check(self, window: Window) -> None:
        check_finite(window, self.parts, self.progress.step, str(self.run.last))

    def _save_checked(self, window: Window) -> None:
        self._check(window)
        self.save()

    def _train_epoch(self, epoch: int) -> bool:
        t = self.cfg.trainer
        self.data.sampler.set_epoch(epoch)  # order and augmentations: functions of (seed, epoch[, index])
        plan = EpochPlan(
            epoch=epoch,
            max_epochs=self.data.epochs,
            usable_batches=self.data.steps_per_epoch * t.accumulate_grad_batches,
            total_steps=self.total_steps,
            log_every_steps=t.log_every_steps,
            checkpoint_every_steps=t.checkpoint_every_steps,
            fault_at_step=t.fault_at_step,
            show_progress=self.dist.is_main,
            progress_every_s=t.progress_every_s,
        )
        return train_one_epoch(
            parts=self.parts,
            loader=self.data.train_loader,
            progress=self.progress,
            plan=plan,
            on_log=self._log_train,
            on_checkpoint=self._save_checked,
            on_end=self._check,
            world_size=self.dist.world_size,
        )

    def _log_train(self, window: Window, step: int) -> dict[str, str]:
        self._check(window)
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        p = self.progress
        if self._warm:
            p.train_images, p.train_seconds = p.train_images + window.images, p.train_seconds + elapsed
            p.train_tokens += window.tokens
        else:  # the first window pays for cuDNN/cuBLAS autotuning, allocator growth, compilation
            p.warmup_images, p.warmup_seconds = p.warmup_images + window.images, p.warmup_seconds + elapsed
            p.warmup_tokens += window.tokens
            self._warm = True
        ctrl = get_controller(self.model)
        metrics = {
            "train_loss": window.mean_loss,
            "lr": self.parts.optimizer.param_groups[0]["lr"],
            "sparsity": ctrl.overall_sparsity if ctrl else 0.0,  # of all masked weights (level overrides included)
            "images_per_s": window.images / elapsed,
            "step_ms": 1000.0 * elapsed / max(window.steps, 1),
            "epoch": p.epoch,
        }
        if window.tokens:
            metrics["tokens_per_s"] = window.tokens / elapsed
        timer = self.objective.teacher_timer
        if timer is not None:  # the distillation teacher's share of the step time
            metrics["teacher_ms"] = timer.pop_ms() / max(window.steps, 1)
        if self.logger:
            self.logger.log(metrics, step)
        return {
            "loss": f"{metrics['train_loss']:.3f}",
            "lr": f"{metrics['lr']:.2e}",
            "sparsity": f"{metrics['sparsity']:.2f}",
            **(
                {"tok_s": f"{metrics['tokens_per_s']:.0f}"}
                if "tokens_per_s" in metrics
                else {"img_s": f"{metrics['images_per_s']:.0f}"}
            ),
        }

    def fit(self, resume: Path | None = None) -> RunSummary:
        t = self.cfg.trainer
        if resume is not None:
            self.resume_from(resume)
        lc = self.cfg.logger
        self.logger = build_logger(
            lc.name, self.run_dir, self.dist.is_main, self.resolved_config, lc.project, lc.entity, lc.mode, lc.tags
        )
        status = "failed"
        try:
            if resume is not None and self.dist.is_main:
                self.logger.sinks[0].truncate_after(self.progress.step)
            if resume is None:
                self._calibrate_scores()
                self._reconstruct()
            if self.dist.is_main and resume is None:
                if self.report is not None:
                    print(self.report)
                notices = [self._raised_notice(), self._run_length_notice(), self._from_scratch_notice()]
                for line in filter(None, [describe(self.model), *notices]):
                    print(line)
            while self.progress.step < self.total_steps and self.progress.epoch < self.data.epochs:
                epoch = self.progress.epoch
                finished = self._train_epoch(epoch)
                if finished:
                    self.progress.epoch, self.progress.batch_in_epoch = epoch + 1, 0
                done = self.progress.step >= self.total_steps or self.progress.epoch >= self.data.epochs
                if (finished and (epoch + 1) % t.val_every_epochs == 0) or done:
                    self._end_epoch_validation(epoch)
                self.save()
            if not self.progress.last_metrics:
                self._end_epoch_validation(self.progress.epoch)
            status = "completed"
            return self.summary(status)
        finally:
            self.logger.finish(status)

    def _calibrate_scores(self) -> None:
        """sparsity.score_init=activation: scores from activation-aware tile magnitudes, measured on
        `calibration_batches` training batches (data.calibration_loader: a fixed draw that moves nothing of the run;
        every rank's sums all-reduced: one set of scores), before the first step of a fresh run and again after a
        permutation at the ramp's start."""
        s = self.cfg.sparsity
        if s.score_init != "activation" or not self.sparsity_spec:
            return
        batches, forward, followers = self._calibration()
        n = calibrate_scores(self.model, batches, forward, all_reduce_sum, followers)
        if self.dist.is_main:
            tqdm.write(
                f"scores of {n} masked weights from activation-aware magnitudes ({s.calibration_batches} batches)"
            )

    def _calibration(self) -> tuple[object, object, list[nn.Module]]:
        """The calibration batches of this rank (data.calibration_loader: a fixed draw that moves nothing of the
        run), the forward pass that runs one of them under the run's autocast, and the copies whose masked weights
        follow the model's (the EMA)."""
        device, amp, d = self.device, self.amp_dtype, self.dist

        def forward(model: nn.Module, batch) -> None:
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                model(batch[0].to(device, non_blocking=True))

        n, ema = self.cfg.sparsity.calibration_batches, self.parts.ema
        batches = calibration_loader(self.data.train_loader, n, self.cfg.seed, d.rank, d.world_size)
        return batches, forward, [ema.module] if ema is not None else []

    def _reconstruct(self) -> None:
        """sparsity.reconstruct: the kept weights refit to the dense outputs on the calibration batches, under the
        masks of step 0 (sparsity.reconstruct; every rank's Gram matrices all-reduced: one set of weights)."""
        if not self.cfg.sparsity.reconstruct or not self.sparsity_spec:
            return
        batches, forward, followers = self._calibration()
        done = reconstruct_weights(
            self.model, batches, forward, all_reduce_sum, followers,
            select=self.cfg.sparsity.select, progress=self.dist.is_main,
        )  # fmt: skip
        if self.dist.is_main:
            tqdm.write(str(done))

    def _raised_notice(self) -> str | None:
        d, t = self.data, self.cfg.trainer
        if d.epochs <= t.max_epochs:
            return None
        return raised_length_notice(t.max_epochs, d.epochs, d.steps_per_epoch, t.min_steps, d.min_steps, d.n_train)

    def _from_scratch_notice(self) -> str | None:
        """Calibrated scores and the refit follow what the starting model does: on random weights, noise."""
        s, m = self.cfg.sparsity, self.cfg.model
        what = [k for k, on in (("sparsity.reconstruct", s.reconstruct), ("sparsity.score_init=activation",
                s.score_init == "activation")) if on]  # fmt: skip
        if not what or not self.sparsity_spec or starts_pretrained(m.name, m.pretrained):
            return None
        return (
            f"note: {' and '.join(what)} calibrate on the model as it starts, and this one starts from random "
            "weights (no model.pretrained): they are for pretrained models (model.pretrained=<weights>, or "
            "model.name=hf:<dir> with weights)"
        )

    def _run_length_notice(self) -> str | None:
        c = self.cfg
        return recovery_notice(
            self.sparsity_spec,
            total_steps=self.total_steps,
            steps_per_epoch=self.data.steps_per_epoch,
            max_epochs=self.data.epochs,
            batch_size=c.data.batch_size,
            ramp_fraction=c.sparsity.ramp_fraction,
            floor=c.sparsity.min_recovery_steps,
        )

    def _end_epoch_validation(self, epoch: int) -> None:
        metrics = validate(self.model, self.state.ema, self.data.val_loader, self.device, self.amp_dtype)
        self.progress.last_metrics = metrics
        self.progress.val_history.append(metrics.get("val_perplexity", metrics["val_top1"]))
        if self.logger:
            self.logger.log({**metrics, "epoch": epoch + 1}, self.progress.step)
        if self.dist.is_main:
            tqdm.write(_validation_line(epoch, metrics))
        if self._best_so_far(metrics):
            p = self.progress
            p.best_top1, p.best_top5 = metrics["val_top1"], metrics["val_top5"]
            p.best_perplexity = metrics.get("val_perplexity")
            p.best_perplexity_per_byte = metrics.get("val_perplexity_per_byte")
            self.save(self.run.best)

    def _best_so_far(self, metrics: dict[str, float]) -> bool:
        """Whether this validation is the run's best: the lowest perplexity for a language model, else the highest
        top-1 (best.pt and summary.json's best_* are that validation's)."""
        if metrics.get("val_perplexity") is not None:
            best = self.progress.best_perplexity
            return best is None or metrics["val_perplexity"] < best
        return metrics["val_top1"] > self.progress.best_top1

    # --------------------------------------------------------------------------------------------- summary
    def _whole_model(self) -> nn.Module | None:
        """The model with whole tensors: itself, or under FSDP an unsharded CPU copy on rank 0 (a collective; None
        on the other ranks, whose summary is not written)."""
        if not is_sharded(self.model):
            return self.model
        state = full_model_state(self.model)
        if not self.dist.is_main:
            return None
        copy = build_from_spec(self.model_spec, self.sparsity_spec)
        copy.load_state_dict(state)
        return copy

    def summary(self, status: str) -> RunSummary:
        """What summary.json says about this run now (wall_time_s is left to the caller, who timed the whole job)."""
        digests = all_gather_object(mask_digest(self.model))
        spec, model = self.sparsity_spec, self._whole_model()
        masked = {n for n, _, _, _ in iter_block_masks(model)} if model is not None else set()
        measured = {}
        if spec and model is not None:
            tiles = block_sparsity(model, spec["block_size"], spec.get("block_overrides"))
            measured = {n: v for n, v in tiles.items() if n in masked}
        total, kept = model_size(model) if model is not None else (None, None)
        p, m = self.progress, self.progress.last_metrics
        return RunSummary(
            status=status,
            error=None,
            model=self.cfg.model.name,
            sparsity=spec["sparsity"] if spec else 0.0,
            block_size=spec["block_size"] if spec else None,
            targets=spec["targets"] if spec else [],
            val_top1=m.get("val_top1"),
            val_top5=m.get("val_top5"),
            ema_val_top1=m.get("ema_val_top1"),
            val_perplexity=m.get("val_perplexity"),
            val_perplexity_per_byte=m.get("val_perplexity_per_byte"),
            best_val_top1=p.best_top1,
            best_val_top5=p.best_top5,
            best_val_perplexity=p.best_perplexity,
            best_val_perplexity_per_byte=p.best_perplexity_per_byte,
            block_sparsity=measured,
            mean_block_sparsity=sum(measured.values()) / len(measured) if measured else 0.0,
            params_total=total,
            params_kept=kept,
            wall_time_s=None,
            images_per_s=_rate(p.train_images, p.train_seconds) or _rate(p.warmup_images, p.warmup_seconds),
            tokens_per_s=_rate(p.train_tokens, p.train_seconds) or _rate(p.warmup_tokens, p.warmup_seconds),
            epochs=p.epoch,
            steps=p.step,
            world_size=self.dist.world_size,
            masks_equal_across_ranks=len(set(digests)) == 1,
            mask_digest=digests[0],
            run_dir=str(self.run_dir),
            **self._improving(),
        )

    def _improving(self) -> dict[str, Any]:
        """still_improving / improving_slope for summary.json: perplexity for language models, else top-1 (noise:
        its binomial standard error on this validation set)."""
        m, history = self.progress.last_metrics, self.progress.val_history
        if len(history) < 3 or not m:
            return {}
        lm = "val_perplexity" in m
        noise = 0.0 if lm else accuracy_noise(m["val_top1"], len(self.data.val_loader.dataset))
        improving, slope = still_improving(history, noise, higher_is_better=not lm)
        return {"still_improving": improving, "improving_slope": round(slope, 4)}


def _validation_line(epoch: int, metrics: dict[str, float]) -> str:
    line = (
        f"epoch {epoch + 1}: val top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%  "
        f"loss {metrics['val_loss']:.4f}"
    )
    if "val_perplexity" in metrics:
        line += f"  perplexity {metrics['val_perplexity']:.2f}"
    if "val_perplexity_per_byte" in metrics:
        line += f" ({metrics['val_perplexity_per_byte']:.3f} per byte)"
    if "ema_val_top1" in metrics:
        line += f"  (EMA top-1 {metrics['ema_val_top1']:.2f}%)"
    return line


def _rate(count: int, seconds: float) -> float | None:
    """Items per second; None when nothing was counted (an image model's tokens) or no time passed."""
    return count / seconds if seconds > 0 and count else None


def write_summary(run_dir: Path, summary: RunSummary) -> None:
    write_json_atomically(RunDir(run_dir).summary, summary.to_dict())


def find_resume(resume: Any, run_dir: Path) -> Path | None:
    """trainer.resume: false -> None; true -> this run dir's last.pt (None if absent); a path -> its checkpoint."""
    if resume in (False, None, "false", "False"):
        return None
    if resume in (True, "true", "True"):
        path = RunDir(run_dir).last
        return path if path.is_file() else None
    try:
        return resolve_checkpoint(resume).checkpoint
    except CheckpointError as err:
        raise ValueError(f"trainer.resume={resume}: {err}") from None
