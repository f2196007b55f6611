"""Training-step overhead of learned block masks: ViT-B/16, batch 128, bf16 autocast, AdamW (GPU).

    python benchmarks/train_overhead.py [--batch 128] [--steps 30] [--block 32] [--sparsity 0.9]

Variants, measured side by side in one process: dense; superblock masks on MLP only and on MLP + attention;
and a naive reference mask (top-k + repeat_interleave each forward, MLP only) like the deleted reference
implementation. Prints a Markdown table (median ms/step over --steps steps after warm-up, CUDA events).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

from superblock import get_controller, mask_parameters, sparsify


class NaiveMask(nn.Module):
    """Reference-style mask: recomputed every forward with topk and a materialized repeat_interleave."""

    def __init__(self, weight: torch.Tensor, block: int, sparsity: float) -> None:
        super().__init__()
        rows, cols = weight.shape[0] // block, weight.shape[1] // block
        self.scores = nn.Parameter(torch.randn(rows, cols, device=weight.device))
        self.block, self.k = block, max(1, round((1 - sparsity) * rows * cols))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        flat = self.scores.flatten()
        idx = flat.topk(self.k).indices
        hard = torch.zeros_like(flat).scatter(0, idx, 1.0).view_as(self.scores)
        m = hard + self.scores - self.scores.detach()
        return w * m.repeat_interleave(self.block, 0).repeat_interleave(self.block, 1)


def build(variant: str, block: int, sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().cuda()
    if variant == "masked mlp+attn":
        sparsify(model, sparsity=sparsity, block_size=block, targets=["mlp", "attn"])
    elif variant == "masked mlp":
        sparsify(model, sparsity=sparsity, block_size=block, targets=["mlp"])
    elif variant == "naive mlp":
        for layer in model.encoder.layers:
            for lin in (layer.mlp[0], layer.mlp[3]):
                parametrize.register_parametrization(lin, "weight", NaiveMask(lin.weight, block, sparsity))
    return model


def time_steps(model: nn.Module, batch: int, steps: int, warmup: int) -> list[float]:
    scores = {id(p) for p in mask_parameters(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in scores]}]
    if scores:
        groups.append({"params": mask_parameters(model), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=True)
    ctrl = get_controller(model)
    inputs = [torch.randn(batch, 3, 224, 224, device="cuda") for _ in range(2)]
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(inputs[i % 2]), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctrl is not None:
            ctrl.step()
        end.record()
        if i >= warmup:
            times.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in times]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=2, help="measure every variant this many times, interleaved")
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    variants = ["dense", "masked mlp", "masked mlp+attn", "naive mlp"]
    results: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            model = build(v, args.block, args.sparsity)
            results[v].append(statistics.median(time_steps(model, args.batch, args.steps, args.warmup)))
            del model
            torch.cuda.empty_cache()
    best = {v: min(ts) for v, ts in results.items()}
    dense = best["dense"]
    print(
        f"\n{torch.cuda.get_device_name()} | torch {torch.__version__} | ViT-B/16 batch {args.batch} bf16 autocast "
        f"AdamW(fused) | sparsity {args.sparsity} block {args.block} | {time.strftime('%Y-%m-%d')}"
    )
    print("\n| variant | ms/step (median, best of repeats) | all repeats | overhead vs dense |")
    print("|---|---|---|---|")
    for v in variants:
        reps = ", ".join(f"{t:.2f}" for t in results[v])
        print(f"| {v} | {best[v]:.2f} | {reps} | {100 * (best[v] / dense - 1):+.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results_ms": results, "device": torch.cuda.get_device_name()}, f, indent=2)


if __name__ == "__main__":
    main()
