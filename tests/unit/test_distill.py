"""Distillation loss and teacher loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from superblock.engine.distill import distillation_loss


def test_soft_distillation_equals_the_hand_computed_mix() -> None:
    s = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    t = torch.tensor([[1.0, 1.5, -0.5], [2.0, -1.0, 0.0]])
    task = torch.tensor(0.7)
    T, alpha = 2.0, 0.25
    kl = 0.0
    for row_s, row_t in zip(s, t, strict=True):
        p = [math.exp(v / T) for v in row_t.tolist()]
        q = [math.exp(v / T) for v in row_s.tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected = (1 - alpha) * 0.7 + alpha * (kl / 2) * T * T
    assert distillation_loss(s, t, task, alpha, T).item() == pytest.approx(expected, rel=1e-5)


def test_hard_distillation_and_alpha_zero() -> None:
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    task = torch.tensor(1.25)
    assert distillation_loss(s, t, task, 0.0, 3.0) is task
    hard = F.cross_entropy(s, t.argmax(-1))
    assert distillation_loss(s, t, task, 1.0, 3.0, hard=True).item() == pytest.approx(hard.item())


def test_gradient_reaches_the_student_only() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        t_logits = t * 1.0
    distillation_loss(s, t_logits, s.sum() * 0, 0.5, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_objective_on_a_sequence_model_counts_every_token() -> None:
    """A language model's (B, T, V) logits: the task loss and the distillation term are per-token means, as if
    the B*T positions were one batch of classifications; the teacher sees the same inputs, without gradients."""
    from contextlib import nullcontext

    from superblock.engine.objective import Objective

    torch.manual_seed(0)
    vocab = 11
    student = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
    teacher = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)).requires_grad_(False)
    tokens, labels = torch.randint(0, vocab, (3, 5)), torch.randint(0, vocab, (3, 5))
    objective = Objective(torch.nn.CrossEntropyLoss(), teacher=teacher, alpha=0.3, temperature=2.0)
    loss = objective(student, tokens, labels, nullcontext())
    s, t = student(tokens).reshape(-1, vocab), teacher(tokens).reshape(-1, vocab)
    expected = distillation_loss(s, t, F.cross_entropy(s, labels.reshape(-1)), 0.3, 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert objective.teacher_timer.pop_ms() > 0
