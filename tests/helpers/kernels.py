"""Weights and references shared by the kernel tests (CPU, interpreter and GPU): random block-sparse weights with
an empty block row, a float64 reference product, and the relative error that refuses non-finite outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]


def random_block_sparse(out_f, in_f, block, density, dtype=torch.float32, seed=0):
    """A dense (out, in) weight with random whole blocks zeroed (and every kept entry nonzero)."""
    g = torch.Generator().manual_seed(seed)
    bh, bw = block
    rows, cols = -(-out_f // bh), -(-in_f // bw)
    keep = torch.rand(rows, cols, generator=g) < density
    keep[0, 0] = True
    keep[-1] = False  # an empty block row: output must be the bias alone
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:out_f, :in_f]
    w = (torch.rand(out_f, in_f, generator=g) + 0.5) * torch.sign(torch.randn(out_f, in_f, generator=g))
    return (w * mask).to(dtype)


def reference(x, w, bias=None, activation=None):
    y = x.double() @ w.double().t()
    if bias is not None:
        y = y + bias.double()
    return F.gelu(y) if activation == "gelu" else y


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite output"
    return ((y.double() - ref).norm() / ref.norm()).item()


def block_sparse(out_f: int, in_f: int, block=(16, 16), density=0.5, seed=0, empty_rows=()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bh, bw = block
    rows, cols = -(-out_f // bh), -(-in_f // bw)
    keep = torch.rand(rows, cols, generator=g) < density
    for r in empty_rows:
        keep[r] = False
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:out_f, :in_f]
    return torch.randn(out_f, in_f, generator=g) * 0.3 * mask


def glu_reference(x, wg, wu, bias=None):
    g, u = x.double() @ wg.double().t(), x.double() @ wu.double().t()
    if bias is not None:
        n = wg.shape[0]
        g, u = g + bias[:n].double(), u + bias[n:].double()
    return F.silu(g) * u


def rel(y, ref) -> float:
    return ((y.double() - ref).norm() / max(ref.norm().item(), 1e-12)).item()


def run_in_interpreter(script: str, *args: str, expect: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `script` (python -c) with TRITON_INTERPRET=1, so Triton kernels run on CPU tensors, and check that it exits
    0 and prints `expect`. The interpreter is chosen at import: hence a subprocess."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0 and expect in proc.stdout, proc.stdout + proc.stderr
    return proc
