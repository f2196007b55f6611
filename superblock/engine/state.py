"""The train state: the parts a checkpoint holds, each saving and loading its own state.

A checkpoint (format in docs/architecture.md) is `TrainState.state_dict()` plus the run's identity (model and
sparsity specs, resolved config); `TrainState.load_state_dict` puts every part back, so a resumed run continues
exactly where the checkpoint left it: weights, scores and masks, optimizer moments, lr schedule, loss scaler,
EMA, progress counters and every rank's random streams.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from superblock.engine.distributed import all_gather_object
from superblock.engine.ema import ModelEma
from superblock.engine.sharding import full_state, is_sharded, load_full_state
from superblock.seeding import seed_everything, stable_seed


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches already consumed in `epoch`
    step: int = 0  # optimizer steps
    best_top1: float = -1.0
    best_top5: float = -1.0
    best_perplexity: float | None = None  # a language model's lowest validation perplexity (its best.pt)
    best_perplexity_per_byte: float | None = None  # the same validation's, per byte
    train_images: int = 0  # throughput, steady state: first logging window of each process start left out
    train_seconds: float = 0.0
    train_tokens: int = 0  # a language model's input tokens over the same windows (0 for images)
    warmup_images: int = 0  # that first window, used only when there is nothing else
    warmup_seconds: float = 0.0
    warmup_tokens: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    val_history: list[float] = field(default_factory=list)  # the headline metric of each validation, in order

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in Progress(**state).__dict__.items():
            setattr(self, name, value)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s training randomness (dropout, drop-path, mixup/cutmix draws): rank 0 keeps the
    run's seed, so a single-process run is unchanged; other ranks get their own streams."""
    return seed if rank == 0 else stable_seed("rank", seed, rank)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) random states, as tensors and plain lists."""
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
    """Restore what rng_state() saved, from tensors on any device (a checkpoint read onto the GPU holds GPU tensors;
    every random state is set from a CPU one)."""
    py = state["python"]
    random.setstate((state["python_version"], tuple(int(v) for v in py[:-1]), None))
    np.random.set_state(("MT19937", state["numpy"].cpu().numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class RankStreams:
    """Every rank's random streams: gathered from all ranks at each save, so each rank resumes its own."""

    def __init__(self, seed: int, rank: int, world_size: int) -> None:
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.per_rank = [rng_state()]

    def gather(self) -> None:
        """Collective: call on every rank before a save."""
        self.per_rank = all_gather_object(rng_state())

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.per_rank[0], "rng_per_rank": self.per_rank}

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if len(per_rank) == self.world_size:
            set_rng_state(per_rank[self.rank])
        else:  # resumed on another number of ranks: fresh per-rank streams, derived from the step
            seed_everything(rank_seed(self.seed + step, self.rank))


@dataclass
class TrainState:
    """What a checkpoint restores. `model` is the bare model (not the DDP / compiled wrapper)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    progress: Progress
    rng: RankStreams

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's training part. Under FSDP a collective (whole tensors gathered): call on every rank."""
        p = self.progress
        if is_sharded(self.model):
            model, optimizer = full_state(self.model, self.optimizer)
        else:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        return {
            "model": model,
            "ema": self.ema.module.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else 0,
            "optimizer": optimizer,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **self.rng.state_dict(),
            "progress": p.state_dict(),
            "epoch": p.epoch,  # readable without the Progress schema (export, report)
            "step": p.step,
            "metrics": dict(p.last_metrics),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if is_sharded(self.model):
            load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.ema and state.get("ema") is not None:
            self.ema.load(state["ema"], state.get("ema_updates", 0))
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress.load_state_dict(state["progress"])
        self.rng.load_state_dict(state, self.progress.step)
