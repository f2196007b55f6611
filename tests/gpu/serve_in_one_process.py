"""Several served models in one process, in the order that once crashed a side-by-side serving script: a throwaway
CUDA graph (as the tuner captures), a block-sparse model served under CUDA graphs, the same weights dense under
torch.compile(mode="reduce-overhead") (which clears cuBLAS workspaces when it records), a release of cached memory,
then the served model again, checked against dense. Run as a script by test_serve_in_one_process_gpu.py so that a
CUDA fault ends this process, not pytest's.

    python tests/gpu/serve_in_one_process.py <export dir> [--no-own-workspace]

--no-own-workspace captures without superblock.timing.own_cublas_workspace (the code before the fix), to show
what the test guards against. Prints "served correctly" and exits 0, or exits non-zero."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from superblock import timing  # noqa: E402

if "--no-own-workspace" in sys.argv:
    timing.own_cublas_workspace = contextlib.nullcontext  # serving captures through timing.capture_graph

from superblock.export import load_folded, load_sparse  # noqa: E402
from tests.helpers.runs import probe  # noqa: E402


@torch.no_grad()
def main(export_dir: str) -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    x_lin = torch.randn(8, 4096, device=dev, dtype=dt)
    w_lin = torch.randn(256, 4096, device=dev, dtype=dt)
    b_lin = torch.randn(256, device=dev, dtype=dt)
    lin_out = torch.empty(8, 256, device=dev, dtype=dt)
    throwaway = timing.capture_graph(lambda: F.linear(x_lin, w_lin, b_lin))  # as the tuner's timing graphs
    del throwaway  # its memory pool is released (the cuBLAS workspace it allocated lives on without the fix)
    graph = timing.capture_graph(lambda: lin_out.copy_(F.linear(x_lin, w_lin, b_lin)))  # a GEMM of its own
    served = load_sparse(export_dir, device=dev, dtype="bf16", runtime="cudagraph", batch_sizes=[1, 4])
    dense = load_folded(export_dir, device=dev, dtype="bf16").eval()
    overhead = torch.compile(load_folded(export_dir, device=dev, dtype="bf16").eval(), mode="reduce-overhead")
    x = probe(n=4, seed=3).to(dev, dt)
    for _ in range(3):
        overhead(x)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    for _ in range(3):
        got = served(x).float()
        graph.replay()
    torch.cuda.synchronize()
    ref = dense(x).float()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    lin_err = ((lin_out.float() - F.linear(x_lin, w_lin, b_lin).float()).abs().max()).item()
    print(f"served rel err {err:.2e}, graph GEMM abs err {lin_err:.2e}")
    if not (err <= 3e-2 and lin_err <= 1e-1):
        sys.exit(1)
    print("served correctly")


if __name__ == "__main__":
    main(sys.argv[1])
