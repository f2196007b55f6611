"""An illegal memory access seen in serving: served CUDA graphs must survive other models in the same process clearing
cuBLAS workspaces and releasing cached memory (torch.compile's "reduce-overhead" mode does both). The scenario runs
in a child process (tests/gpu/serve_in_one_process.py): a fault there fails this test instead of ending pytest.
Quick: one small compile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from superblock.export import export_checkpoint  # noqa: E402
from tests.helpers.runs import make_run  # noqa: E402


def test_served_graphs_survive_reduce_overhead_and_empty_cache_in_the_same_process(tmp_path):
    run = tmp_path / "run"
    make_run(run, "micro_vit", sparsity=0.75, block_size=16, targets=("all_linear",), seed=0)
    export_checkpoint(run, tmp_path / "export", device="cuda", layout="bsr", echo=lambda _: None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/gpu/serve_in_one_process.py"), str(tmp_path / "export")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0 and "served correctly" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-4000:])
