"""Training-step overhead of learned block masks, eager and torch.compile: ViT-B/16, bf16 autocast, fused AdamW (GPU).

    PYTHONPATH=. python benchmarks/train_overhead.py [--batch 128] [--steps 20] [--block 32] [--sparsity 0.9]
        [--runtimes eager,compile] [--mode default] [--variants dense,masked]

Every (variant, runtime) pair is built once in this process (compiled ones are compiled during their warm-up),
then timed in interleaved rounds. A step is forward + backward under bf16 autocast, fused AdamW, zero_grad and
the sparsity controller's step (which recomputes the masks). Variants: dense; masked (MLP + attention);
masked-mlp; masked-unfused (masked, with the fused eager mask kernels switched off: plain PyTorch ops; eager
only); naive-mlp (top-k + repeat_interleave every forward, like the deleted reference implementation; eager
only). Prints a Markdown table (median ms/step of each round, best
round) and, for compiled runs, the Dynamo graphs compiled at the first step and after it (recompilations) and
the graph breaks, which must be 1, 0 and 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

from superblock import get_controller, mask_parameters, sparsify
from superblock.sparsity import fused

VARIANTS = ("dense", "masked", "masked-mlp", "masked-unfused", "naive-mlp")
EAGER_ONLY = ("masked-unfused", "naive-mlp")


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


def build(variant: str, args: argparse.Namespace) -> nn.Module:
    block, sparsity = args.block, args.sparsity
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=args.image_size).to(args.device)
    if variant in ("masked", "masked-unfused"):
        sparsify(model, sparsity=sparsity, block_size=block, targets=["mlp", "attn"])
    elif variant == "masked-mlp":
        sparsify(model, sparsity=sparsity, block_size=block, targets=["mlp"])
    elif variant == "naive-mlp":
        for layer in model.encoder.layers:
            for lin in (layer.mlp[0], layer.mlp[3]):
                parametrize.register_parametrization(lin, "weight", NaiveMask(lin.weight, block, sparsity))
    return model


def dynamo_counts() -> tuple[int, int, int]:
    """(graphs compiled, frames Dynamo converted, graph breaks incl. resumed frames) so far in this process."""
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values()) + sum(counters["resumes"].values())
    return counters["stats"]["unique_graphs"], counters["frames"]["total"], breaks


@dataclass
class Case:
    variant: str
    runtime: str
    model: nn.Module
    run: nn.Module
    opt: torch.optim.Optimizer
    rounds: list[float] = field(default_factory=list)
    first_step: tuple[int, int, int] = (0, 0, 0)  # dynamo counts added by the first step
    later: tuple[int, int, int] = (0, 0, 0)  # dynamo counts added by every later step


def make_case(variant: str, runtime: str, args: argparse.Namespace) -> Case:
    model = build(variant, args)
    scores = {id(p) for p in mask_parameters(model)}
    if variant == "naive-mlp":
        scores = {id(m.scores) for m in model.modules() if isinstance(m, NaiveMask)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in scores]}]
    if scores:
        groups.append({"params": [p for p in model.parameters() if id(p) in scores], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=args.device == "cuda")
    run = torch.compile(model, mode=None if args.mode == "default" else args.mode) if runtime == "compile" else model
    return Case(variant, runtime, model, run, opt)


def step(case: Case, x: torch.Tensor, y: torch.Tensor) -> None:
    with fused.disabled() if case.variant == "masked-unfused" else contextlib.nullcontext():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(case.run(x), y)
        loss.backward()
    case.opt.step()
    case.opt.zero_grad(set_to_none=True)
    ctrl = get_controller(case.model)
    if ctrl is not None:
        ctrl.step()


def _add(a: tuple[int, ...], b: tuple[int, ...], c: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + z - w for x, w, z in zip(a, b, c, strict=True))


class _HostTimer:
    """CPU stand-in for a CUDA event (smoke runs with --device cpu)."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _HostTimer) -> float:
        return 1e3 * (end.t - self.t)


def _event(device: str) -> torch.cuda.Event | _HostTimer:
    return torch.cuda.Event(enable_timing=True) if device == "cuda" else _HostTimer()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_steps(case: Case, inputs: list[torch.Tensor], labels: torch.Tensor, n: int) -> list[float]:
    device = inputs[0].device.type
    events = []
    before = dynamo_counts()
    for i in range(n):
        start, end = _event(device), _event(device)
        start.record()
        step(case, inputs[i % 2], labels)
        end.record()
        events.append((start, end))
    _sync(device)
    case.later = _add(case.later, before, dynamo_counts())
    return [s.elapsed_time(e) for s, e in events]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps after the first (compiling) one")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds over all cases")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--runtimes", default="eager,compile", help="comma list of eager, compile")
    ap.add_argument("--mode", default="default", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--variants", default="dense,masked", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script, not a measurement")
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (or --device cpu for a smoke run)")
    variants, runtimes = args.variants.split(","), args.runtimes.split(",")
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    size = args.image_size
    inputs = [torch.randn(args.batch, 3, size, size, device=args.device) for _ in range(2)]
    labels = torch.randint(0, 1000, (args.batch,), device=args.device)

    cases = []
    for runtime in runtimes:
        for v in variants:
            if runtime != "eager" and v in EAGER_ONLY:
                continue
            t0 = time.perf_counter()
            case = make_case(v, runtime, args)
            before = dynamo_counts()
            step(case, inputs[0], labels)  # compiles, for compiled cases
            _sync(args.device)
            case.first_step = _add((0, 0, 0), before, dynamo_counts())
            timed_steps(case, inputs, labels, args.warmup)
            print(f"built {v} / {runtime}: first step + warm-up {time.perf_counter() - t0:.1f} s", flush=True)
            cases.append(case)
    for r in range(args.rounds):
        for case in cases:
            case.rounds.append(statistics.median(timed_steps(case, inputs, labels, args.steps)))
        print(f"round {r + 1}: " + ", ".join(f"{c.variant}/{c.runtime} {c.rounds[-1]:.2f}" for c in cases), flush=True)

    best = {(c.variant, c.runtime): min(c.rounds) for c in cases}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke run)"
    print(
        f"\n{device_name} | torch {torch.__version__} | ViT-B/16 {size}px batch {args.batch} bf16 autocast "
        f"AdamW(fused) | sparsity {args.sparsity} block {args.block} | compile mode {args.mode} | "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print("\n| variant | runtime | ms/step (best round) | rounds | vs dense | graphs step 1 / after | breaks |")
    print("|---|---|---|---|---|---|---|")
    for c in cases:
        dense = best.get(("dense", c.runtime))
        rel = f"{100 * (best[(c.variant, c.runtime)] / dense - 1):+.1f}%" if dense else "—"
        graphs = f"{c.first_step[0]} / {c.later[0]}" if c.runtime == "compile" else "—"
        breaks = str(c.first_step[2] + c.later[2]) if c.runtime == "compile" else "—"
        rounds = ", ".join(f"{t:.2f}" for t in c.rounds)
        print(f"| {c.variant} | {c.runtime} | {min(c.rounds):.2f} | {rounds} | {rel} | {graphs} | {breaks} |")
    recompiled = [f"{c.variant}/{c.runtime}" for c in cases if c.later[1]]
    print(f"\nrecompilations after the first step: {'none' if not recompiled else ', '.join(recompiled)}")
    if args.json:
        out = {
            "args": vars(args),
            "device": device_name,
            "torch": torch.__version__,
            "cases": [
                {
                    "variant": c.variant,
                    "runtime": c.runtime,
                    "rounds_ms": c.rounds,
                    "dynamo_first_step": c.first_step,
                    "dynamo_after": c.later,
                }
                for c in cases
            ],
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
