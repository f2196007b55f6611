"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for models that do not fit one device: every transformer block is
sharded on its own (weights, mask scores and their optimizer state), then the root.

Masks are buffers, so FSDP leaves them whole on every rank; the sparsity controller gathers each layer's score
shards when it recomputes them (superblock.sparsity.controller), so every rank chooses the same mask. Checkpoints
hold full (unsharded) tensors in the same format as a single-process run, so export, evaluate and a resume on any
number of ranks read them as usual.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def transformer_blocks(model: nn.Module, trainable_only: bool = True) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the classes a transformers model names in `_no_split_modules`, else
    the elements of every ModuleList / Sequential made of several modules of one class (timm `blocks`, torchvision
    `encoder.layers`) with trainable parameters (any parameters when not `trainable_only`: a frozen teacher's)."""
    named = set(getattr(model, "_no_split_modules", None) or ())
    candidates: list[nn.Module] = []
    if named:
        candidates = [m for m in model.modules() if type(m).__name__ in named]
    else:
        for container in model.modules():
            if _repeated_blocks(container, trainable_only):
                candidates.extend(container)
    # Outermost blocks only: a block inside a chosen block is sharded with it.
    inside: set[int] = set()
    blocks = []
    for block in candidates:
        if id(block) not in inside:
            blocks.append(block)
            inside.update(id(m) for m in block.modules())
    return blocks


def _repeated_blocks(container: nn.Module, trainable_only: bool = True) -> bool:
    """A ModuleList / Sequential of several (trainable) modules of one class."""
    if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) < 2:
        return False
    weights = [p.requires_grad or not trainable_only for p in container.parameters()]
    return len({type(m) for m in container}) == 1 and any(weights)


def shard_model(model: nn.Module) -> nn.Module:
    """fully_shard every transformer block, then the whole model (in place; returns the model)."""
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"trainer.strategy=fsdp found no repeated transformer blocks in {type(model).__name__} to shard: "
            "use trainer.strategy=ddp"
        )
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts with whole tensors on the CPU. A collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return full_model_state(model), get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def full_model_state(model: nn.Module) -> dict:
    """The model's state dict with whole tensors on the CPU. A collective: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Put whole-tensor state dicts (each rank read the same checkpoint) back into a sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_options())
    set_optimizer_state_dict(model, optimizer, optim_state, options=_options())
