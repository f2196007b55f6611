"""Builders of a training run's parts. Each takes the sub-config it needs and explicit values, never the whole
config, and returns what it built: the Trainer calls them in the order data -> model -> objective -> optimizer."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from superblock.config import (
    DataConfig,
    DistillConfig,
    ModelConfig,
    OptimConfig,
    SparsityConfig,
    TrainerConfig,
    check_strict_blocks,
)
from superblock.data import DataBundle, build_datasets, build_loaders
from superblock.devices import dtype_name_or_auto, parse_dtype
from superblock.engine.distill import load_teacher
from superblock.engine.objective import Objective
from superblock.engine.optim import build_lr_scheduler, build_optimizer
from superblock.engine.permutation import permute_before_masks, record
from superblock.engine.pretrained import load_run_weights, names_run
from superblock.engine.run_length import auto_min_steps
from superblock.engine.sharding import shard_model
from superblock.models import build_model, model_spec
from superblock.sparsity import SparsityReport, normalize_block_size, sparsify
from superblock.sparsity.tiling import Levels, Tiling


@dataclass
class DataParts:
    """The datasets, loaders and the step budget they imply."""

    bundle: DataBundle
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: Sampler
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int  # trainer.max_epochs, raised to reach trainer.min_steps
    min_steps: int | None = None  # the floor that applied (trainer.min_steps, or what "auto" means for this data)
    n_train: int = 0  # training examples


def build_data(
    data: DataConfig,
    *,
    seed: int,
    distributed: bool,
    accumulate: int,
    max_epochs: int,
    max_steps: int | None,
    min_steps: int | str | None = None,
    auto_floor: int = 0,
) -> DataParts:
    """Datasets and loaders of `data`, and how many optimizer steps an epoch and the whole run take (at least
    `min_steps`, by more epochs than max_epochs when an epoch is short; max_steps still caps the run).
    `min_steps="auto"`: `auto_floor` for a small real image set, else no floor (engine/run_length.py)."""
    bundle = build_datasets(data.name, seed=seed, **dataset_options(data))
    train_loader, val_loader, sampler = build_loaders(
        bundle,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        seed=seed,
        distributed=distributed,
        eval_batch_size=data.eval_batch_size,
    )
    batches = len(train_loader)
    steps_per_epoch = batches // accumulate
    if steps_per_epoch == 0:
        raise ValueError(
            f"an epoch has {batches} batches, fewer than trainer.accumulate_grad_batches={accumulate}: lower "
            "data.batch_size or accumulate_grad_batches, or use more data"
        )
    n_train = len(bundle.train) if bundle.train is not None else 0
    if min_steps == "auto":
        min_steps = auto_min_steps(data.name, bundle.task, n_train, auto_floor)
    epochs = max(max_epochs, -(-min_steps // steps_per_epoch)) if min_steps else max_epochs
    total = steps_per_epoch * epochs
    total = min(total, max_steps) if max_steps is not None else total
    return DataParts(
        bundle, train_loader, val_loader, sampler, batches, steps_per_epoch, total, epochs, min_steps, n_train
    )


# The DataConfig keys text data is built from: training reads them here, evaluation from a run's saved config.
TEXT_OPTIONS = ("root", "train_size", "val_size", "seq_len", "tokenizer", "max_bytes", "val_max_bytes")


def dataset_options(data: DataConfig) -> dict[str, Any]:
    """`build_datasets` keyword arguments of `data` (text data takes its own; image data its transforms)."""
    common = {"root": data.root, "train_size": data.train_size, "val_size": data.val_size}
    if data.name == "text":
        text = {k: getattr(data, k) for k in TEXT_OPTIONS}
        if text["val_max_bytes"] is None:  # only when set: older runs' options stay what they were
            del text["val_max_bytes"]
        return text
    return {
        **common,
        "image_size": data.image_size,
        "download": data.download,
        "randaugment": data.randaugment,
        "augment": asdict(data.augment),
    }


def build_model_spec(model: ModelConfig, bundle: DataBundle) -> dict[str, Any]:
    """The JSON-able spec `build_model(**spec)` rebuilds the model from (stored in checkpoints and exports)."""
    name = model.name
    if model.source in ("timm", "hf") and not name.startswith(f"{model.source}:"):
        name = f"{model.source}:{name}"
    kwargs = dict(model.kwargs)
    if name.startswith("hf:"):
        kwargs.setdefault("task", model.task if model.task != "auto" else bundle_task(bundle))
        kwargs.setdefault("config", {**token_ids(bundle), **model.config})
    return model_spec(
        name,
        num_classes=bundle.num_classes,
        image_size=model.image_size or bundle.image_size or None,
        pretrained=model.pretrained,
        **kwargs,
    )


def token_ids(bundle: DataBundle) -> dict[str, int]:
    """The data's special tokens for a transformers config (generate() stops at eos, pads with pad)."""
    eos, pad = getattr(bundle, "eos_id", None), getattr(bundle, "pad_id", None)
    ids = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad}
    return {k: v for k, v in ids.items() if v is not None}


def bundle_task(bundle: DataBundle) -> str:
    """The `transformers` task a dataset trains: next-token prediction for a text stream, else classification."""
    task = getattr(bundle, "task", "image_classification")
    return "causal_lm" if task == "causal_lm" else "sequence_classification"


def sparsity_spec(s: SparsityConfig, steps_per_epoch: int, total_steps: int) -> dict[str, Any] | None:
    """Flat keyword arguments of `sparsify` (JSON-able; stored in checkpoints). None for a dense run."""
    if not s.enabled:
        return None
    block = normalize_block_size(s.block_size)
    ramp = s.ramp_fraction * total_steps if s.ramp_fraction is not None else s.ramp_epochs * steps_per_epoch
    return {
        "sparsity": s.level,
        "block_size": list(block),
        "targets": list(s.targets),
        "exclude": list(s.exclude),
        "skip_first_block": s.skip_first_block,
        "skip_head": s.skip_head,
        "allocation": s.allocation,
        "min_density": s.min_density,
        "schedule": s.schedule,
        "initial_sparsity": s.initial,
        "ramp_steps": max(1, int(round(ramp))) if s.schedule != "constant" else int(round(ramp)),  # a 1-step run
        "start_step": int(round(s.start_epoch * steps_per_epoch)),
        "score_init": s.score_init,
        "fixed_weight": s.fixed_weight,
        "fixed_mask": s.fixed_mask,
        # only when set: the spec of runs from before the option stays equal, so they still resume
        **({"freeze_after_ramp": True} if s.freeze_after_ramp else {}),
        **({"block_overrides": Tiling.of(block, s.block_overrides).to_list()} if s.block_overrides else {}),
        **({"level_overrides": Levels.of(s.level_overrides).to_list()} if s.level_overrides else {}),
        **({"level_total": True} if s.level_total else {}),
    }


def build_student(
    spec: dict[str, Any],
    sparsify_args: dict[str, Any] | None,
    *,
    strict_blocks: bool,
    seed: int,
    permute: str = "none",
) -> tuple[nn.Module, SparsityReport | None]:
    """The model to train: built from `spec` (weights from a file or a superblock run), then masked; with `permute`
    and masks chosen from step 0, its hidden units are permuted to fit the tiles first (engine/permutation.py)."""
    pretrained = spec.get("pretrained")
    from_run = names_run(pretrained)  # a dense (or masked) superblock run to start from
    model = build_model(**({**spec, "pretrained": None} if from_run else spec))
    if from_run:
        load_run_weights(model, pretrained)
    if not sparsify_args:
        return model, None
    if strict_blocks:
        dry = sparsify(model, **sparsify_args, dry_run=True)
        check_strict_blocks({r.name: (r.shape, r.block) for r in dry.rows})
    permuted = permute_before_masks(model, permute, sparsify_args)
    report = sparsify(model, **sparsify_args, seed=seed)
    if permuted is not None:
        record(model, permuted, step=0)
    return model, report


def wrap_for_training(
    model: nn.Module, device: torch.device, *, distributed: bool, compile: bool, strategy: str = "ddp"
) -> nn.Module:
    """The module the loop calls: DDP around the model when distributed (or the model itself sharded in place with
    FSDP2 under strategy="fsdp"), compiled when asked."""
    wrapped = model
    if strategy == "fsdp":
        if not distributed:
            raise ValueError("trainer.strategy=fsdp shards over processes: launch with torchrun --nproc_per_node>=2")
        shard_model(model)
    elif distributed:
        # Masks are buffers that every rank derives from identical scores: no need to broadcast them each step.
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    return torch.compile(wrapped) if compile else wrapped


def build_objective(
    trainer: TrainerConfig,
    distill: DistillConfig,
    *,
    num_classes: int,
    student_spec: dict[str, Any],
    device: torch.device,
    student: nn.Module | None = None,
) -> Objective:
    """The loss: cross-entropy (soft targets under mixup/cutmix), plus distillation when a teacher is named (of the
    logits, and of every block's output in `student` with distill.blocks > 0)."""
    mixup = None
    if trainer.mixup > 0 or trainer.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(
            mixup_alpha=trainer.mixup,
            cutmix_alpha=trainer.cutmix,
            label_smoothing=trainer.label_smoothing,
            num_classes=num_classes,
        )
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=trainer.label_smoothing)
    teacher = None
    if distill.teacher:
        teacher = load_teacher(distill.teacher, {**student_spec, "pretrained": None}, device)
    objective = Objective(
        criterion, mixup, teacher, distill.alpha, distill.temperature, distill.hard, device, distill.blocks, student
    )
    if teacher is not None and trainer.compile:  # after the block hooks are on
        objective.teacher = torch.compile(teacher)
    return objective


def build_optimization(
    model: nn.Module,
    optim: OptimConfig,
    *,
    scores_lr: float | None,
    total_steps: int,
    steps_per_epoch: int,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """Optimizer (scores in their own group), per-step lr schedule, and the fp16 loss scaler (off otherwise)."""
    optimizer = build_optimizer(
        model,
        optim.name,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        scores_lr=scores_lr,
        betas=tuple(optim.betas),
        momentum=optim.momentum,
        nesterov=optim.nesterov,
    )
    scheduler = build_lr_scheduler(
        optimizer,
        total_steps,
        int(round(optim.warmup_epochs * steps_per_epoch)),
        optim.lr,
        optim.min_lr,
        optim.warmup_start_factor,
        optim.lr_schedule,
    )
    return optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """trainer.precision on `device` as the autocast dtype; None for fp32 (no autocast)."""
    precision = dtype_name_or_auto(precision, device)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision=fp16 needs a CUDA GPU: use fp32 or bf16 on CPU")
    return None if precision == "fp32" else parse_dtype(precision)
