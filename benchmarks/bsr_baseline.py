"""Baseline for the kernels issue: ViT-B/16 inference through torch's BSR kernels vs dense vs ours, end to end.

    python benchmarks/bsr_baseline.py                  # vit_b_16, batch 256, sparsity 0.9, blocks 32/64, bf16/fp32
    python benchmarks/bsr_baseline.py --quick          # tiny sizes: checks the script runs (CPU is fine)
    python benchmarks/bsr_baseline.py --backends torch,triton,auto --json results.json

The model goes through the same path as `export.py` / `evaluate.py mode=bsr`: sparsify (random block masks:
random scores, exact kept-block count) on MLP + attention weights, fold_masks, then every masked weight as
BlockSparseLinear / block-sparse attention with one kernel backend ("torch": torch's BSR kernels, F.linear with a
sparse BSR weight; "triton": ours, CUDA only; "auto": measured choice). "dense" is the folded model (cuBLAS).
Latency: interleaved median over repeats (CUDA events on GPU, perf_counter on CPU), 4 rotated input batches.
Prints one line per measurement and a Markdown table last.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superblock.evaluate import to_sparse, weight_bytes  # noqa: E402
from superblock.export import compare_latency, fold_copy, masked_layers, parse_dtype, resolve_device  # noqa: E402
from superblock.kernels._triton_bsr import HAS_TRITON  # noqa: E402
from superblock.models import build_model  # noqa: E402
from superblock.sparsity import sparsify  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_b_16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--blocks", default="32,64")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--targets", default="mlp,attn")
    p.add_argument("--backends", default="torch,triton", help="block-sparse backends to time next to dense")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quick", action="store_true", help="image 32, batch 8, 6 repeats: a smoke run of the script")
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.batch_size, args.repeats, args.warmup = 32, 8, 6, 1
    return args


def backends_for(requested: list[str], device: torch.device) -> list[str]:
    """Drop the Triton backend where it cannot run (no CUDA or no triton), saying so."""
    usable = []
    for b in requested:
        if b == "triton" and not (HAS_TRITON and device.type == "cuda"):
            print(f"skipping backend=triton on {device} (needs CUDA and triton)", flush=True)
            continue
        usable.append(b)
    return usable


def build_models(args, block: int, dtype: torch.dtype, device: torch.device, backends: list[str]) -> dict:
    """{"dense": folded model, backend: block-sparse model} with one random mask shared by all of them."""
    model = build_model(args.model, num_classes=1000, image_size=args.image_size)
    sparsify(model, sparsity=args.sparsity, block_size=block, targets=args.targets.split(","), seed=0)
    layers = masked_layers(model)
    models = {"dense": fold_copy(model)}
    for backend in backends:
        models[backend] = to_sparse(fold_copy(model), layers, backend)
    return {name: m.to(device, dtype).eval() for name, m in models.items()}


def run_config(args, block: int, dtype_name: str, device: torch.device, backends: list[str]) -> dict:
    dtype = parse_dtype(dtype_name)
    models = build_models(args, block, dtype, device, backends)
    inputs = [
        torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device, dtype=dtype) for _ in range(4)
    ]
    with torch.no_grad():
        reference = models["dense"](inputs[0]).float()
        errors = {b: (models[b](inputs[0]).float() - reference).abs().max().item() for b in backends}
    stats = compare_latency(models, inputs, device, warmup=args.warmup, repeats=args.repeats, rounds=3)
    dense_ms = stats["dense"]["median_ms"]
    row = {
        "model": args.model,
        "dtype": dtype_name,
        "block": block,
        "sparsity": args.sparsity,
        "batch": args.batch_size,
        "dense_ms": dense_ms,
        "dense_img_s": args.batch_size * 1e3 / dense_ms,
        "weights_mb": {n: weight_bytes(m) / 2**20 for n, m in models.items()},
    }
    for b in backends:
        ms = stats[b]["median_ms"]
        row[b] = {"ms": ms, "speedup": dense_ms / ms, "img_s": args.batch_size * 1e3 / ms, "max_abs_err": errors[b]}
    return row


def markdown(rows: list[dict], backends: list[str], device: str) -> str:
    head = "| dtype | block | dense ms | " + " | ".join(f"{b} ms | {b} speedup" for b in backends) + " |"
    lines = [
        f"{rows[0]['model']}, batch {rows[0]['batch']}, sparsity {rows[0]['sparsity']}, MLP + attention, {device}",
        "",
        head,
        "|" + "---|" * (3 + 2 * len(backends)),
    ]
    for r in rows:
        cells = " | ".join(f"{r[b]['ms']:.2f} | {r[b]['speedup']:.2f}x" for b in backends)
        lines.append(f"| {r['dtype']} | {r['block']} | {r['dense_ms']:.2f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    backends = backends_for(args.backends.split(","), device)
    rows = []
    for dtype_name in args.dtypes.split(","):
        for block in (int(b) for b in args.blocks.split(",")):
            row = run_config(args, block, dtype_name, device, backends)
            rows.append(row)
            detail = ", ".join(f"{b} {row[b]['ms']:.2f} ms ({row[b]['speedup']:.2f}x)" for b in backends)
            print(f"{dtype_name} block {block}: dense {row['dense_ms']:.2f} ms, {detail}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print()
    print(markdown(rows, backends, f"{device_name}, torch {torch.__version__}"))
    return rows


if __name__ == "__main__":
    main()
