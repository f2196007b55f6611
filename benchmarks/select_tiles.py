"""Time of the tile selection (`sparsity.select=output_error`) per weight shape, on the CPU or a GPU.

    python benchmarks/select_tiles.py                                  # SmolLM2-135M's projections, 64 x 16, 50%
    python benchmarks/select_tiles.py --device cuda --shapes 1536x576,576x1536 --blocks 64x16,32 --levels 0.5,0.7

Each shape gets a random weight (columns of uneven scale) and the Gram matrix of correlated random inputs, the
selection keeps (1 - level) of its tiles (choosing them only: the refit of the kept tiles after it is one
least-squares solve per block row, `refit_rows`), and the table gives the median seconds of `--reps` calls (after one
warm-up on a GPU) with the number of removals. What a one-shot prune of a model costs is the sum over its weights
(SmolLM2: per layer q, o 576x576; k, v 192x576; gate, up 1536x576; down 576x1536).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.oneshot_lm import tile  # noqa: E402  ("64x16" -> (64, 16), "32" -> (32, 32); shapes the same way)
from superblock.sparsity.reconstruct import DAMPING  # noqa: E402
from superblock.sparsity.select import select_tiles  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="576x576,192x576,1536x576,576x1536", help="out x in, comma-separated")
    p.add_argument("--blocks", default="64x16", help="tiles, rows x cols (or one number for a square)")
    p.add_argument("--levels", default="0.5")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens behind the Gram matrix")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    args.shapes = [tile(s) for s in args.shapes.split(",") if s]
    args.blocks = [tile(b) for b in args.blocks.split(",") if b]
    args.levels = [float(v) for v in args.levels.split(",") if v]
    return args


def measure(shape: tuple[int, int], block: tuple[int, int], level: float, args: argparse.Namespace) -> dict:
    out_f, in_f = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) / in_f**0.5
    w = torch.randn(out_f, in_f, generator=g) * torch.rand(1, in_f, generator=g)
    tiles = torch.zeros(-(-out_f // block[0]), -(-in_f // block[1]))
    tiles.view(-1)[: round(tiles.numel() * (1 - level))] = 1
    dev = torch.device(args.device)
    w, tiles, gram = w.to(dev), tiles.to(dev), (x.T @ x).to(dev)
    if dev.type == "cuda":
        select_tiles(w, tiles, block, gram, DAMPING)
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        select_tiles(w, tiles, block, gram, DAMPING)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
    return {"shape": shape, "block": block, "level": level, "removals": int((tiles == 0).sum()),
            "seconds": statistics.median(times)}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    threads = f"cpu ({torch.get_num_threads()} threads)"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else threads
    print(f"{device}, torch {torch.__version__}, {args.tokens} calibration tokens, median of {args.reps}\n")
    print("| weight (out x in) | tile | sparsity | removals | seconds |\n|---|---|---|---|---|")
    rows = []
    for shape in args.shapes:
        for block in args.blocks:
            for level in args.levels:
                r = measure(shape, block, level, args)
                rows.append(r)
                print(f"| {shape[0]} x {shape[1]} | {block[0]} x {block[1]} | {level:.0%} | {r['removals']} | "
                      f"{r['seconds']:.3f} |", flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
