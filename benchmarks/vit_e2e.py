"""Whole-model inference latency: torchvision ViTs with block-sparse MLP (+ attention) weights vs dense.

    python benchmarks/vit_e2e.py                                  # vit_b_16, vit_h_14 x batch 1/32/256 x bf16/fp32
    python benchmarks/vit_e2e.py --models vit_b_16 --batches 256 --dtypes bf16 --block 32

Random init (no downloads). In every encoder layer, `sparsity` of the blocks of the MLP weights (and, with
--attn, of the attention in_proj / out_proj) are zeroed at random (exact count). The dense model runs those
weights with cuBLAS (torchvision's own modules); the sparse model replaces the MLP Linears by
BlockSparseLinear (fc1 with GELU fused) and the attention by BlockSparseMultiheadAttention, backend="auto"
(tuned on the first forward, before timing). Latency: CUDA-event median over --reps forwards; batches up to
--graph-max-batch are also timed as CUDA-graph replays (launch overhead out of the picture).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superblock.kernels import (  # noqa: E402
    BlockSparseLinear,
    BlockSparseMultiheadAttention,
    fuse_linear_gelu,
)
from superblock.kernels import tuning as tuning_mod  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_b_16,vit_h_14")
    p.add_argument("--batches", default="256,32,1")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--attn", action=argparse.BooleanOptionalAction, default=True, help="attention sparse too")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--graph-max-batch", type=int, default=32)
    p.add_argument("--profile", action="store_true", help="print the top GPU kernels of both models")
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="parallel compile")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--tag", default="vit_e2e")
    return p.parse_args(argv)


def zero_random_blocks(w: torch.Tensor, block: int, sparsity: float, gen: torch.Generator) -> None:
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    keep = round((1 - sparsity) * rows * cols)
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[torch.randperm(rows * cols, generator=gen)[:keep]] = True
    full = mask.view(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)
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


def precompile(model_name, dtype_name, batches, args):
    """Compile every kernel the sparse model's auto-tuning will try, in parallel side processes."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torchvision.models as tvm
    from bsr_linear import warm_kernels  # the per-layer benchmark's helper

    with torch.device("meta"):
        m = getattr(tvm, model_name)()
    E, H = m.hidden_dim, m.mlp_dim
    tokens = (m.image_size // m.patch_size) ** 2 + 1
    dtype = DTYPES[dtype_name]
    jobs = []
    for b in batches:
        M = b * tokens
        shapes = [(H, E, "gelu"), (E, H, None)] + ([(3 * E, E, None), (E, E, None)] if args.attn else [])
        for N, K, act in shapes:
            cfgs = tuning_mod.candidate_configs(M, args.block, args.block, dtype, "ieee")
            job = {"N": N, "K": K, "M": M, "block": (args.block, args.block), "dtype": str(dtype).split(".")[-1],
                   "prec": "ieee", "bias": True, "act": act, "configs": cfgs, "torch": True}  # fmt: skip
            jobs.append(job)
    warm_kernels(jobs, args.workers)


def time_eager(model, x, reps):
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        model(x)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def time_graph(model, x, reps):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    graph.replay()
    torch.cuda.synchronize()
    return time_eager(lambda _x: graph.replay(), x, reps)


def profile_table(model, x, rows: int = 14) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return averages.table(sort_by=key, row_limit=rows, max_name_column_width=60)
        except Exception:
            continue
    return "(profiler table unavailable)"


def backend_counts(model, tokens):
    counts: dict[str, int] = {}
    scope = tuning_mod.scope_for()
    for m in model.modules():
        if isinstance(m, BlockSparseLinear):
            key = tuning_mod.problem_key(
                tokens, *m.shape, *m.block_size, m.values.shape[0], m.values.dtype, "ieee", m.bias is not None,
                m.activation,
            )  # fmt: skip
            entry = tuning_mod.lookup(scope, key)
            name = entry["backend"] if entry else "untuned"
            counts[name] = counts.get(name, 0) + 1
    return counts


def run(model_name, dtype_name, batch, args):
    import torchvision.models as tvm

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        dense = getattr(tvm, model_name)().eval()
    with torch.no_grad():  # torchvision zero-inits the head: give the logits something to compare
        dense.heads.head.weight.normal_(0.0, 0.02)
    sparsify_weights(dense, args.block, args.sparsity, args.attn)
    dense = dense.to(dtype)
    sparse = to_block_sparse(copy.deepcopy(dense), args.block, args.attn)
    size = dense.image_size
    x = torch.randn(batch, 3, size, size, device="cuda").to(dtype)
    row = {"model": model_name, "dtype": dtype_name, "batch": batch, "block": args.block, "sparsity": args.sparsity}
    row["attn_sparse"] = args.attn
    with torch.inference_mode():
        t0 = time.time()
        ref = dense(x).double()
        y = sparse(x).double()  # first forward: auto measures each new layer kind once
        row["tune_s"] = round(time.time() - t0, 1)
        row["rel_err"] = ((y - ref).norm() / ref.norm()).item()
        tokens = batch * ((size // dense.patch_size) ** 2 + 1)
        row["backends"] = json.dumps(backend_counts(sparse, tokens))
        row["dense_ms"] = time_eager(dense, x, args.reps)
        row["sparse_ms"] = time_eager(sparse, x, args.reps)
        row["speedup"] = row["dense_ms"] / row["sparse_ms"]
        if args.profile:
            for name, model in (("dense", dense), ("sparse", sparse)):
                print(f"--- {model_name} {dtype_name} batch {batch} {name}: top GPU kernels (3 forwards)")
                print(profile_table(model, x))
        if batch <= args.graph_max_batch:
            try:
                row["dense_graph_ms"] = time_graph(dense, x, args.reps)
                row["sparse_graph_ms"] = time_graph(sparse, x, args.reps)
                row["graph_speedup"] = row["dense_graph_ms"] / row["sparse_graph_ms"]
            except Exception as err:  # capture is best effort
                row["graph_error"] = str(err).splitlines()[0][:80]
    del dense, sparse
    torch.cuda.empty_cache()
    return row


FIELDS = [
    "model", "dtype", "batch", "block", "sparsity", "attn_sparse", "dense_ms", "sparse_ms", "speedup",
    "dense_graph_ms", "sparse_graph_ms", "graph_speedup", "rel_err", "backends", "tune_s", "graph_error",
]  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("vit_e2e needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with (out_dir / f"{args.tag}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS, extrasaction="ignore")
        writer.writeheader()
        for model_name in args.models.split(","):
            for dtype_name in args.dtypes.split(","):
                batches = [int(b) for b in args.batches.split(",")]
                precompile(model_name, dtype_name, batches, args)
                for batch in batches:
                    row = run(model_name, dtype_name, batch, args)
                    rows.append(row)
                    writer.writerow(row)
                    fh.flush()
                    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, block {args.block}, sparsity {args.sparsity}, "
        f"attention sparse: {args.attn}",
        "",
        "| model | dtype | batch | dense ms | sparse ms | speedup | graph dense ms | graph sparse ms | graph speedup | rel err | backends |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = [f"{r[k]:.3f}" if k in r else "-" for k in ("dense_graph_ms", "sparse_graph_ms", "graph_speedup")]
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | "
            f"{r['speedup']:.2f} | {g[0]} | {g[1]} | {g[2]} | {r['rel_err']:.1e} | {r['backends']} |"
        )
    (out_dir / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
