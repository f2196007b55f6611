"""Layer-wise distillation: every transformer block's output in the student pulled toward the same block's output in
the dense teacher, next to the logit distillation (engine/distill.py).

The term is the "SquareHead" loss of sparse LLM fine-tuning: per block, the mean squared error divided by the
teacher's variance, so every block weighs the same whatever its scale; the mean over blocks. It was made for deep
pretrained models; on the 4-block lm_tiny it did not help (docs/frontier.md, "Layer-wise distillation").
The blocks are found the way FSDP shards them (engine/sharding.py's `transformer_blocks`); forward hooks record
their outputs only while a batch is taken.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from superblock.engine.sharding import transformer_blocks


def _hidden(output: object) -> torch.Tensor:
    """A block's hidden states: the output itself, or the first element of a tuple (transformers' decoder layers)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"a transformer block returned {type(output).__name__}, not a tensor: no layer-wise targets")
    return output


class BlockTap:
    """Forward hooks on a model's transformer blocks that keep their outputs while `recording()` is open."""

    def __init__(self, model: nn.Module, role: str) -> None:
        self.blocks = transformer_blocks(model, trainable_only=False)
        if not self.blocks:
            raise ValueError(
                f"distill.blocks needs repeated transformer blocks; the {role} ({type(model).__name__}) has none: "
                "set distill.blocks=0"
            )
        self.outputs: list[torch.Tensor] = []
        self._on = False
        for block in self.blocks:
            block.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: object, output: object) -> None:
        if self._on:
            self.outputs.append(_hidden(output))

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        self.outputs, self._on = [], True
        try:
            yield self.outputs
        finally:
            self._on = False


def block_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """The mean over blocks of MSE(student block, teacher block) / Var(teacher block), in fp32."""
    if len(student) != len(teacher) or not student:
        raise ValueError(
            f"distill.blocks: the student ran {len(student)} transformer blocks, the teacher {len(teacher)}; "
            "layer-wise distillation needs a teacher of the student's depth"
        )
    terms = []
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"distill.blocks: a student block gave {tuple(s.shape)}, the teacher's {tuple(t.shape)}")
        s, t = s.float(), t.float()
        terms.append((s - t).pow(2).mean() / t.var().clamp_min(1e-12))
    return torch.stack(terms).mean()
