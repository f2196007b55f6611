"""Whole-model inference: torchvision ViTs with block-sparse MLP (+ attention) weights vs dense, in the runtimes
users serve with (eager, torch.compile, CUDA graphs), at small and large batches, from one process.

    python benchmarks/vit_e2e.py                                      # vit_b_16, bf16, blocks 64,32, all runtimes
    python benchmarks/vit_e2e.py --dtypes bf16,fp32 --blocks 64 --runtimes eager,cudagraph --batches 1,8,32,256
    python benchmarks/vit_e2e.py --blocks 64,64x32,64x16,32 --sparsity 0.9                 # tile shapes
    python benchmarks/vit_e2e.py --replot a.jsonl,b.jsonl --tag vit_e2e_all        # table + plot of saved rows

Random init (no downloads). In every encoder layer, `sparsity` of the blocks of the MLP weights (and, with
--attn, of the attention in_proj / out_proj) are zeroed at random at a tile every measured tile divides (rows
and columns: their least common multiples; exact count), so every tile shape (--blocks 64,32,64x16) runs the same
weights at the same density, each pattern block being whole tiles of it. The dense model
keeps those (zero-filled) weights on cuBLAS; the sparse one gets BlockSparseLinear (fc1 with GELU fused) and
BlockSparseMultiheadAttention, backend="auto". Both go through the same `superblock.export.make_runtime(model,
runtime, batch_sizes=...)` that `load_sparse(..., runtime=...)` uses: eager (tuned per batch size, whole-model
dense check), compile (torch.compile, one graph per batch size), cudagraph (compiled, one CUDA graph per batch
size). Latency: wall clock over --reps calls after a sync (host overhead included), median of --rounds
interleaved rounds. Dynamo recompilations after warm-up are counted and reported (must be 0).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superblock.export import make_runtime  # noqa: E402
from superblock.kernels import (  # noqa: E402
    BlockSparseLinear,
    BlockSparseMultiheadAttention,
    fuse_linear_gelu,
    hand_off_feature_major,
)
from superblock.timing import wall_ms  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_b_16")
    p.add_argument("--batches", default="1,8,32,256")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--blocks", default="64,32", help="tiles: N for N x N, ROWSxCOLS for ROWS outputs by COLS inputs")
    p.add_argument("--runtimes", default="eager,compile,cudagraph")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--attn", action=argparse.BooleanOptionalAction, default=True, help="attention sparse too")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--handoff", default="token", help="token and/or feature: fc1 writes its output feature-major "
                   "for fc2 (kernels.hand_off_feature_major; eager and CUDA-graph runtimes)")  # fmt: skip
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--tag", default="vit_e2e")
    p.add_argument(
        "--replot",
        default=None,
        help="comma-separated .jsonl files of earlier runs: redraw their table and plot, measure nothing",
    )
    return p.parse_args(argv)


def parse_blocks(text: str) -> list[tuple[int, int]]:
    """Tiles (rows, cols) of --blocks ("64,32,64x16"), largest area first."""
    out = []
    for part in text.split(","):
        dims = part.lower().split("x")
        if len(dims) not in (1, 2) or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise SystemExit(f"--blocks: a tile is N or ROWSxCOLS, got {part!r}")
        out.append((int(dims[0]), int(dims[-1])))
    return sorted(out, key=lambda b: (-b[0] * b[1], -b[0]))


def pattern_block(blocks: list[tuple[int, int]]) -> tuple[int, int]:
    """The tile the random pattern is drawn at: every measured tile divides it, so each pattern block is whole tiles
    of every shape and all shapes keep the same weights (the same density)."""
    return math.lcm(*(b[0] for b in blocks)), math.lcm(*(b[1] for b in blocks))


def block_name(block: tuple[int, int]) -> str:
    return str(block[0]) if block[0] == block[1] else f"{block[0]}x{block[1]}"


def zero_random_blocks(w: torch.Tensor, block: tuple[int, int], sparsity: float, gen: torch.Generator) -> None:
    bh, bw = block
    rows, cols = -(-w.shape[0] // bh), -(-w.shape[1] // bw)
    keep = round((1 - sparsity) * rows * cols)
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[torch.randperm(rows * cols, generator=gen)[:keep]] = True
    full = mask.view(rows, cols).repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    w.mul_(full[: w.shape[0], : w.shape[1]].to(w.device, w.dtype))


def sparsify_weights(model, block, sparsity, attn, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.encoder.layers:
            for lin in (layer.mlp[0], layer.mlp[3]):
                zero_random_blocks(lin.weight, block, sparsity, gen)
            if attn:
                zero_random_blocks(layer.self_attention.in_proj_weight, block, sparsity, gen)
                zero_random_blocks(layer.self_attention.out_proj.weight, block, sparsity, gen)


def to_block_sparse(model, block, attn, backend="auto"):
    for layer in model.encoder.layers:
        layer.mlp[0] = BlockSparseLinear.from_dense(layer.mlp[0], block_size=block, backend=backend)
        layer.mlp[3] = BlockSparseLinear.from_dense(layer.mlp[3], block_size=block, backend=backend)
        if attn:
            layer.self_attention = BlockSparseMultiheadAttention.from_mha(layer.self_attention, block, backend)
    fuse_linear_gelu(model)
    return model


def recompiles() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["recompiles"].values()) if "recompiles" in counters else 0


def build_dense(model_name: str, dtype: torch.dtype, block: tuple[int, int], sparsity: float, attn: bool):
    import torchvision.models as tvm

    torch.manual_seed(0)
    with torch.device("cuda"):
        dense = getattr(tvm, model_name)().eval()
    with torch.no_grad():  # torchvision zero-inits the head: give the logits something to compare
        dense.heads.head.weight.normal_(0.0, 0.02)
    sparsify_weights(dense, block, sparsity, attn)
    return dense.to(dtype)


def measure(dense, sparse, runtime: str, batches: list[int], args) -> list[dict]:
    shape = (3, dense.image_size, dense.image_size)
    t0 = time.time()
    d = make_runtime(dense, runtime, batch_sizes=batches, sample_shape=shape)
    s = make_runtime(sparse, runtime, batch_sizes=batches, sample_shape=shape)
    setup_s = time.time() - t0
    before = recompiles()
    rows = []
    with torch.inference_mode():
        for b in batches:
            p = next(dense.parameters())
            x = torch.randn(b, *shape, device=p.device).to(p.dtype)
            ref, y = d(x).double(), s(x).double()
            err = ((y - ref).norm() / ref.norm()).item()
            dm, sm = [], []
            for _ in range(args.rounds):  # interleaved: clocks and neighbours drift alike for both
                dm.append(wall_ms(d, x, args.reps))
                sm.append(wall_ms(s, x, args.reps))
            dms, sms = statistics.median(dm), statistics.median(sm)
            rows.append(
                {
                    "runtime": runtime,
                    "batch": b,
                    "dense_ms": dms,
                    "sparse_ms": sms,
                    "speedup": dms / sms,
                    "rel_err": err,
                    "setup_s": round(setup_s, 1),
                }
            )
    after = recompiles()
    for r in rows:
        r["recompiles_after_warmup"] = after - before
    del d, s
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], title: str) -> list[str]:
    """The markdown table of measured rows: one line per (dtype, block, runtime), one column per batch size."""
    batches = sorted({r["batch"] for r in rows})
    lines = [
        title,
        "",
        "| dtype | block | runtime | " + " | ".join(f"b{b}" for b in batches) + " | recompiles after warm-up |",
        "|---|---|---|" + "---|" * len(batches) + "---|",
    ]
    for key in dict.fromkeys((r["dtype"], r["block"], r["runtime"]) for r in rows):
        mine = {r["batch"]: r for r in rows if (r["dtype"], r["block"], r["runtime"]) == key}
        cells = [
            f"{mine[b]['speedup']:.2f}x ({mine[b]['dense_ms']:.2f}/{mine[b]['sparse_ms']:.2f})" if b in mine else "-"
            for b in batches
        ]
        rec = max(r["recompiles_after_warmup"] for r in mine.values())
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + f" | {rec} |")
    return lines


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speedup over dense (same runtime) against batch size, one line per (runtime, dtype, block)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axhline(1.0, color="black", lw=1, ls="--", label="dense, same runtime")
    for key in dict.fromkeys((r["runtime"], r["dtype"], r["block"]) for r in rows):
        pts = sorted((r["batch"], r["speedup"]) for r in rows if (r["runtime"], r["dtype"], r["block"]) == key)
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=f"{key[0]}, {key[1]}, block {key[2]}")
    batches = sorted({r["batch"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (images)")
    ax.set_ylabel("speedup over dense (x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(files: str, out_dir: Path, tag: str) -> None:
    rows = [json.loads(line) for f in files.split(",") for line in Path(f).read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"no rows in {files}")
    model = rows[0].get("model", "vit")
    lines = table(rows, f"{model}, sparsity {rows[0].get('sparsity')}; rows of {files}")
    (out_dir / f"{tag}.md").write_text("\n".join(lines) + "\n")
    plot(rows, out_dir / f"{tag}.png", f"{model}: block-sparse vs dense in each runtime")
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        return replot(args.replot, out_dir, args.tag)
    if not torch.cuda.is_available():
        raise SystemExit("vit_e2e needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    batches = [int(b) for b in args.batches.split(",")]
    blocks = parse_blocks(args.blocks)
    if not set(args.handoff.split(",")) <= {"token", "feature"}:
        raise SystemExit(f"--handoff takes token and/or feature, got {args.handoff}")
    rows: list[dict] = []
    log = (out_dir / f"{args.tag}.jsonl").open("a")
    for dtype_name in args.dtypes.split(","):
        dense = build_dense(args.model, DTYPES[dtype_name], pattern_block(blocks), args.sparsity, args.attn)
        for block, handoff in itertools.product(blocks, args.handoff.split(",")):
            template = to_block_sparse(copy.deepcopy(dense), block, args.attn)
            label = block_name(block)
            if handoff == "feature":
                hand_off_feature_major(template)
                label += " fm"  # fc1 -> fc2 feature-major
            for runtime in args.runtimes.split(","):
                sparse = copy.deepcopy(template)  # each runtime tunes and checks its own copy
                for r in measure(dense, sparse, runtime, batches, args):
                    r.update(model=args.model, dtype=dtype_name, block=label, sparsity=args.sparsity)
                    rows.append(r)
                    log.write(json.dumps(r) + "\n")
                    log.flush()
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    title = (
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model}, sparsity {args.sparsity}, "
        f"attention sparse: {args.attn}, {time.strftime('%Y-%m-%d')}; speedup = dense ms / sparse ms, "
        "same runtime"
    )
    lines = table(rows, title)
    (out_dir / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    plot(rows, out_dir / f"{args.tag}.png", f"{args.model}, {args.sparsity:.0%} block-sparse vs dense, same runtime")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
