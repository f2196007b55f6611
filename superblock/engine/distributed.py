"""Distributed helpers: torchrun environment -> process group, rank-0 decisions shared with every rank."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from superblock.devices import cuda_available, resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str) -> torch.device:
    """trainer.device (auto | cpu | cuda) as a device; what auto means is superblock.devices'."""
    if preference == "cuda" and not cuda_available():
        raise ValueError("trainer.device=cuda but no CUDA GPU is visible: use trainer.device=cpu or auto")
    return resolve_device(preference)


def init_distributed(preference: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPU, gloo on CPU); a single process otherwise."""
    device = pick_device(preference)
    _export_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _export_slurm_env() -> None:
    """Under a multi-task SLURM job (submitit launcher) without torchrun, derive RANK/WORLD_SIZE/... from SLURM."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError as err:
        raise ValueError("a multi-task SLURM job needs submitit (pip install hydra-submitit-launcher)") from err
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group together: a rank that tears down gloo while another still works on rank-0-only
    writes (summary, speed measurement) can abort ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
