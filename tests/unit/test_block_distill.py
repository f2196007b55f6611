"""Layer-wise distillation: each transformer block's output against the teacher's (distill.blocks)."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from superblock.config import ConfigError, to_config
from superblock.engine.block_distill import BlockTap, block_loss
from superblock.engine.distill import distillation_loss
from superblock.engine.objective import Objective
from tests.helpers.llama import tiny_llama


def test_block_loss_is_the_mean_of_per_block_mse_over_teacher_variance() -> None:
    t1, t2 = torch.tensor([[0.0, 2.0], [4.0, 6.0]]), torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    s1, s2 = t1 + 1.0, t2 * 0.0
    # block 1: mse 1, variance of (0, 2, 4, 6) with Bessel's correction 20/3; block 2: mse 1, variance 4/3
    expected = (1.0 / (20 / 3) + 1.0 / (4 / 3)) / 2
    assert block_loss([s1, s2], [t1, t2]).item() == pytest.approx(expected)
    assert block_loss([t1.clone(), t2.clone()], [t1, t2]).item() == 0.0
    # scale-free: a block 100x larger with the same relative error weighs the same
    assert block_loss([s1 * 100], [t1 * 100]).item() == pytest.approx(block_loss([s1], [t1]).item())
    with pytest.raises(ValueError, match="the student ran 1 transformer blocks, the teacher 2"):
        block_loss([s1], [t1, t2])


def test_taps_record_every_llama_layer_only_while_recording() -> None:
    model, _ = tiny_llama()
    tap = BlockTap(model, "student")
    assert len(tap.blocks) == 2 and all(type(b).__name__ == "LlamaDecoderLayer" for b in tap.blocks)
    tokens = torch.randint(0, 10, (2, 5))
    with torch.no_grad(), tap.recording() as outputs:
        model(tokens)
    assert len(outputs) == 2 and all(o.shape == (2, 5, 32) for o in outputs)
    full = model(tokens, output_hidden_states=True).hidden_states  # embeddings, then after each layer (last normed)
    assert torch.allclose(outputs[0], full[1])
    with torch.no_grad():
        model(tokens)
    assert len(tap.outputs) == 2  # nothing recorded outside `recording()`


def test_a_frozen_teacher_has_blocks_and_a_model_without_blocks_is_refused() -> None:
    from superblock.models import build_model

    vit = build_model("micro_vit", num_classes=10, image_size=32).requires_grad_(False)
    assert len(BlockTap(vit, "teacher").blocks) >= 2
    with pytest.raises(ValueError, match="the student .Linear. has none: set distill.blocks=0"):
        BlockTap(torch.nn.Linear(3, 3), "student")


def test_objective_adds_the_weighted_block_term_and_only_the_student_gets_gradients() -> None:
    torch.manual_seed(0)
    student, _ = tiny_llama()
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens, labels = torch.randint(0, 10, (2, 6)), torch.randint(0, 10, (2, 6))
    objective = Objective(
        torch.nn.CrossEntropyLoss(), teacher=teacher, alpha=0.5, temperature=2.0, block_weight=3.0, student=student
    )
    loss = objective(student, tokens, labels, nullcontext())
    s_out = student(tokens, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(tokens, output_hidden_states=True)
    s, t = s_out.logits.reshape(-1, s_out.logits.shape[-1]), t_out.logits.reshape(-1, s_out.logits.shape[-1])
    logit_part = distillation_loss(s, t, F.cross_entropy(s, labels.reshape(-1)), 0.5, 2.0)
    blocks = block_loss(list(objective.taps[0].outputs), list(objective.taps[1].outputs))
    assert blocks.item() > 0
    assert torch.allclose(objective.taps[0].outputs[0], s_out.hidden_states[1])
    assert loss.item() == pytest.approx((logit_part + 3.0 * blocks).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_block_weight_without_a_teacher_is_refused() -> None:
    with pytest.raises(ConfigError, match="distill.blocks > 0 pulls each block toward a teacher's"):
        to_config({"distill": {"blocks": 1.0}})
    with pytest.raises(ValueError, match="needs the student and a teacher"):
        Objective(torch.nn.CrossEntropyLoss(), block_weight=1.0)
