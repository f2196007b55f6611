"""Llama-3-8B layer shapes, block-sparse vs dense, at decode and prefill token counts.

    PYTHONPATH=. python benchmarks/lm_layers.py --out $OUT
    PYTHONPATH=. python benchmarks/lm_layers.py --layers gate_up,down --tokens 1,8 --out $OUT
    PYTHONPATH=. python benchmarks/lm_layers.py --fused --layers gate_up,qkv --tokens 1,8,32,2048 --out $OUT
    PYTHONPATH=. python benchmarks/lm_layers.py --tokens 1,8 --row-skew 0.5 --out $OUT   # uneven block rows

For each layer (gate/up 4096->14336, down 14336->4096, qkv 4096->6144, o 4096->4096) and token count M, with a
random block mask (exactly `sparsity` of the blocks zeroed) in bf16:

  dense      F.linear (cuBLAS) on the zero-filled weight
  torch BSR  F.linear with torch's sparse BSR weight
  ours       BlockSparseLinear, backend="auto", prepared (tuned) for the runtime measured: "eager" or "graph"

each in eager (wall clock per call, host overhead included) and under a CUDA graph (GPU time per call: replays of
one graph of many calls). Each operand set is cycled through enough copies of the weight (same mask, fresh values)
that the weights read between two uses of one copy exceed the L2 cache (`--l2-mib`): a decode step reads every
layer's weights from DRAM once, and so does this benchmark, sparse and dense alike.

--fused: gate_up is one product over [gate; up] (4096 -> 2 x 14336) with silu(gate) * up in the kernel (activation
"silu_mul", FusedGateUpLinear; dense: F.linear over the stacked weight, then silu * up), and qkv one product over
q, k, v's stacked rows (as FusedQKV runs it). Those rows add "ours unfused": the same kept blocks as separate
BlockSparseLinear layers (gate and up, then torch's silu * up; q, k and v), and fused / unfused speedups.

bound: the best a block-sparse kernel could do against this dense time, dense_ms / max(t_mem, t_mma): t_mem = the
bytes of the kept blocks, their indices, x and y at the bandwidth cuBLAS reaches on the dense weight at one token
(memory-bound, small M); t_mma = cuBLAS on a dense layer with the inner dimension cut to the kept fraction
(compute-bound, large M). Both in the CUDA-graph runtime.
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superblock.kernels import BlockSparseLinear, _runners, dense_to_bsr  # noqa: E402
from superblock.kernels.projection_fusion import FusedGateUpLinear  # noqa: E402
from superblock.timing import capture_graph, replay_ms  # noqa: E402

warnings.filterwarnings("ignore", message=".*Sparse BSR tensor support is in beta.*")
LAYERS = {"gate_up": (14336, 4096), "down": (4096, 14336), "qkv": (6144, 4096), "o": (4096, 4096)}
# --fused: (weight rows, activation, the separate layers' rows) of the fused products
FUSED = {"gate_up": (2 * 14336, "silu_mul", (14336, 14336)), "qkv": (6144, None, (4096, 1024, 1024))}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--tokens", default="1,8,32,2048,8192")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--block", type=block_arg, default=(64, 64), help="N for N x N, or ROWSxCOLS (e.g. 64x16)")
    p.add_argument("--l2-mib", type=float, default=200.0, help="weight bytes cycled between two uses of one copy")
    p.add_argument(
        "--row-skew",
        type=float,
        default=0.0,
        help="uneven block rows: a row keeps blocks in proportion to exp(skew * z), z ~ N(0, 1) per row (0: uniform)",
    )
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-torch-bsr", action="store_true")
    p.add_argument(
        "--fused",
        action="store_true",
        help="gate_up and qkv as the fused products load_sparse builds, next to the same blocks unfused",
    )
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--replot", default=None, help="an earlier run's lm_layers.json: redraw its plot, measure nothing")
    return p.parse_args(argv)


def block_arg(text: str) -> tuple[int, int]:
    """A tile: "64" (64 x 64) or "64x16" (64 output rows by 16 inputs)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"a block is N or ROWSxCOLS, got {text!r}")
    return int(parts[0]), int(parts[-1])


def block_name(block: tuple[int, int]) -> str:
    return str(block[0]) if block[0] == block[1] else f"{block[0]}x{block[1]}"


def random_block_mask(rows: int, cols: int, sparsity: float, gen: torch.Generator, row_skew: float = 0.0):
    """[rows, cols] bool, exactly `sparsity` of the blocks False, at random; with `row_skew` > 0 a block row's chance
    of keeping a block grows with exp(row_skew * z), z one standard normal draw per block row (learned masks keep
    more in some output rows than in others)."""
    keep = torch.zeros(rows * cols, dtype=torch.bool)
    n_keep = round((1 - sparsity) * rows * cols)
    if row_skew > 0:
        weight = torch.exp(row_skew * torch.randn(rows, 1, generator=gen)).expand(rows, cols).reshape(-1)
        keep[torch.multinomial(weight, n_keep, replacement=False, generator=gen)] = True
    else:
        keep[torch.randperm(rows * cols, generator=gen)[:n_keep]] = True
    return keep.view(rows, cols)


def random_block_weight(
    out_f: int, in_f: int, block: tuple[int, int], sparsity: float, gen: torch.Generator, row_skew: float = 0.0
) -> torch.Tensor:
    bh, bw = block
    keep = random_block_mask(out_f // bh, in_f // bw, sparsity, gen, row_skew)
    mask = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return (torch.randn(out_f, in_f, generator=gen) * 0.02 * mask).to("cuda", torch.bfloat16)


def copies_for(nbytes: int, l2_mib: float) -> int:
    return max(2, math.ceil(l2_mib * 2**20 / max(nbytes, 1)))


def eager_ms(fns, reps: int) -> float:
    """Wall clock per call over `reps` calls cycling through fns (host overhead included)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(reps):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    return 1000.0 * (time.perf_counter() - t0) / reps


def graph_ms(fns, min_calls: int = 40) -> float:
    """GPU time per call: one CUDA graph of whole cycles through fns, replayed (median of 5 replays)."""
    calls = len(fns) * max(1, math.ceil(min_calls / len(fns)))
    order = itertools.cycle(fns)
    graph = capture_graph(lambda: next(order)(), calls)  # (its warm-up call shifts the cycle: still whole cycles)
    try:
        return replay_ms(graph, calls, repeats=5)
    finally:
        del graph


def both(fns, args) -> tuple[float, float]:
    e = statistics.median(eager_ms(fns, args.reps) for _ in range(args.rounds))
    return e, graph_ms(fns)


def try_both(fns, args) -> tuple[float | None, float | None]:
    try:
        e = statistics.median(eager_ms(fns, args.reps) for _ in range(args.rounds))
    except Exception as err:  # torch's BSR path has no kernel for some shapes / dtypes
        print(f"  torch BSR eager failed: {type(err).__name__}: {str(err)[:120]}", flush=True)
        return None, None
    try:
        return e, graph_ms(fns)
    except Exception as err:
        print(f"  torch BSR graph failed: {type(err).__name__}: {str(err)[:120]}", flush=True)
        return e, None


def choice_label(mod: BlockSparseLinear, m: int) -> str:
    from superblock.kernels.tuning import token_bucket

    entry = mod.dispatch.get(token_bucket(m), {})
    cfg = entry.get("config") or {}
    if entry.get("backend") != "triton":
        return str(entry.get("backend"))
    if cfg.get("BAL"):
        return f"decode balanced <={cfg['BAL']} BM{cfg['BLOCK_M']}"
    if cfg.get("SPLIT"):
        return f"decode S{cfg['SPLIT']} BM{cfg['BLOCK_M']}"
    return f"tiled BM{cfg['BLOCK_M']}{' TMA' if cfg.get('TMA') else ''}"


def split_rows(values, crow, col, bh: int, sizes) -> list[tuple]:
    """The BSR triplets of consecutive row ranges (`sizes` rows each, block-row multiples) of one BSR weight."""
    out, r0 = [], 0
    for n in sizes:
        r1 = r0 + n // bh
        a, b = int(crow[r0]), int(crow[r1])
        out.append((values[a:b], crow[r0 : r1 + 1] - crow[r0], col[a:b]))
        r0 = r1
    return out


def unfused_fns(vals, crow, col, in_f: int, activation, parts, x, bh: int) -> dict[str, list]:
    """Per runtime, calls running the same kept blocks as separate layers (gate, up, silu * up; or q, k, v)."""
    fns = {}
    for rt in ("eager", "graph"):
        fns[rt] = []
        for v in vals:
            layers = [
                BlockSparseLinear.from_bsr(*t, (n, in_f))
                for t, n in zip(split_rows(v, crow, col, bh, parts), parts, strict=True)
            ]
            for mod in layers:
                mod.tuning_target = rt
                mod.prepare(x.shape[0])
            if activation == "silu_mul":
                fns[rt].append(lambda g=layers[0], u=layers[1], x=x: F.silu(g(x)) * u(x))
            else:
                fns[rt].append(lambda ls=layers, x=x: [mod(x) for mod in ls])
    return fns


def bench_layer(name: str, out_f: int, in_f: int, tokens: list[int], args, gen, activation=None, parts=None):
    w0 = random_block_weight(out_f, in_f, args.block, args.sparsity, gen, args.row_skew)
    values, crow, col = dense_to_bsr(w0, args.block)
    kept = values.numel() * 2 + (crow.numel() + col.numel()) * 4
    n_dense, n_sparse = copies_for(w0.numel() * 2, args.l2_mib), copies_for(kept, args.l2_mib)
    vals = [values] + [torch.randn_like(values) * 0.02 for _ in range(n_sparse - 1)]
    dense_w = [_runners.bsr_to_dense(v, crow, col, (out_f, in_f)) for v in vals[:n_dense]]
    cls = FusedGateUpLinear if activation == "silu_mul" else BlockSparseLinear
    mods = {rt: [cls.from_bsr(v, crow, col, (out_f, in_f)) for v in vals] for rt in ("eager", "graph")}
    for rt, ms in mods.items():
        for mod in ms:
            mod.tuning_target = rt
    bsr_w = [_runners.torch_bsr_weight(v, crow, col, (out_f, in_f), torch.bfloat16) for v in vals]
    n_y = _runners.out_width(out_f, activation)
    bw = args.block[1]
    k_cut = max(bw, round(in_f * (1 - args.sparsity) / bw) * bw)
    w_cut = [torch.randn(out_f, k_cut, device="cuda", dtype=torch.bfloat16) for _ in range(n_dense)]
    bw_gbs = None
    rows = []
    for m in sorted(set(tokens) | {1}):
        x = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
        x_cut = x[:, :k_cut].contiguous()
        with torch.no_grad():
            for ms in mods.values():
                for mod in ms:
                    mod.prepare(m)
            ref = _runners.run_dense(x.double(), dense_w[0].double(), None, activation)
            err = (mods["graph"][0](x).double() - ref).norm().item() / ref.norm().item()
            d_e, d_g = both([lambda w=w, x=x: _runners.run_dense(x, w, None, activation) for w in dense_w], args)
            if bw_gbs is None:  # the bandwidth cuBLAS reaches on this dense weight at one token
                bw_gbs = (w0.numel() * 2) / (d_g * 1e6)
            t_e = t_g = None
            if not args.no_torch_bsr:
                t_e, t_g = try_both(
                    [lambda w=w, x=x: _runners.activate(F.linear(x, w), activation) for w in bsr_w], args
                )
            o_e = statistics.median(
                eager_ms([lambda mod=mod, x=x: mod(x) for mod in mods["eager"]], args.reps) for _ in range(args.rounds)
            )
            o_g = graph_ms([lambda mod=mod, x=x: mod(x) for mod in mods["graph"]])
            cut_g = graph_ms([lambda w=w, x=x_cut: F.linear(x, w) for w in w_cut])
            u_e = u_g = None
            if parts and m in tokens:
                unf = unfused_fns(vals, crow, col, in_f, activation, parts, x, args.block[0])
                u_e = statistics.median(eager_ms(unf["eager"], args.reps) for _ in range(args.rounds))
                u_g = graph_ms(unf["graph"])
        if m not in tokens:
            continue
        io = (m * in_f + m * n_y) * 2
        t_mem = (kept + io) / (bw_gbs * 1e6)
        bound = d_g / max(t_mem, cut_g)
        row = {
            "layer": name,
            "out": out_f,
            "in": in_f,
            "M": m,
            "dense_eager_ms": d_e,
            "dense_graph_ms": d_g,
            "torch_bsr_eager_ms": t_e,
            "torch_bsr_graph_ms": t_g,
            "ours_eager_ms": o_e,
            "ours_graph_ms": o_g,
            "ours_eager_x": d_e / o_e,
            "ours_graph_x": d_g / o_g,
            "torch_bsr_eager_x": d_e / t_e if t_e else None,
            "torch_bsr_graph_x": d_g / t_g if t_g else None,
            "bound_x": bound,
            "bound_mem_x": d_g / t_mem,
            "bound_mma_x": d_g / cut_g,
            "choice_eager": choice_label(mods["eager"][0], m),
            "choice_graph": choice_label(mods["graph"][0], m),
            "rel_err": err,
            "copies_dense": n_dense,
            "copies_sparse": n_sparse,
            "dense_gbs": bw_gbs,
            "activation": activation,
            "unfused_eager_ms": u_e,
            "unfused_graph_ms": u_g,
            "fused_vs_unfused_eager_x": u_e / o_e if u_e else None,
            "fused_vs_unfused_graph_x": u_g / o_g if u_g else None,
        }
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table(rows: list[dict], args) -> str:
    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, sparsity {args.sparsity}, block "
        f"{block_name(args.block)}, row skew {args.row_skew}, {time.strftime('%Y-%m-%d')}; cells: dense ms / other ms "
        "in the same runtime",
        "",
        "| layer | M | dense eager / graph (ms) | torch BSR eager / graph | ours eager / graph | bound | ours picks "
        "(eager / graph) | fused vs unfused (eager / graph) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        act = " silu_mul" if r.get("activation") == "silu_mul" else ""
        lines.append(
            f"| {r['layer']} {r['in']}->{r['out']}{act} | {r['M']} | {r['dense_eager_ms']:.4f} / "
            f"{r['dense_graph_ms']:.4f} | {fmt_x(r['torch_bsr_eager_x'])} / {fmt_x(r['torch_bsr_graph_x'])} "
            f"| {fmt_x(r['ours_eager_x'])} / **{fmt_x(r['ours_graph_x'])}** | {fmt_x(r['bound_x'])} "
            f"| {r['choice_eager']} / {r['choice_graph']} "
            f"| {fmt_x(r.get('fused_vs_unfused_eager_x'))} / {fmt_x(r.get('fused_vs_unfused_graph_x'))} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Per layer: speedup over dense (same runtime) against tokens M, ours eager and under a CUDA graph, and the
    bound (the lesser of memory and MMA limits at this density)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        mine = sorted((r for r in rows if r["layer"] == name), key=lambda r: r["M"])
        ms = [r["M"] for r in mine]
        for key, label, style in (
            ("ours_graph_x", "ours, CUDA graph", "o-"),
            ("ours_eager_x", "ours, eager", "s-"),
            ("bound_x", "bound", "k:"),
        ):
            ax.plot(ms, [r[key] if r[key] is not None else float("nan") for r in mine], style, label=label)
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name} {mine[0]['in']}->{mine[0]['out']}", fontsize=9)
        ax.set_xlabel("tokens M")
    axes[0][0].set_ylabel("speedup over dense (x)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), out_dir / "lm_layers.png")
        return
    if not torch.cuda.is_available():
        raise SystemExit("lm_layers needs a CUDA GPU")
    tokens = [int(t) for t in args.tokens.split(",")]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in args.layers.split(","):
        out_f, in_f = LAYERS[name]
        activation = parts = None
        if args.fused and name in FUSED:
            out_f, activation, parts = FUSED[name]
        rows += bench_layer(name, out_f, in_f, tokens, args, gen, activation, parts)
        torch.cuda.empty_cache()
    text = table(rows, args)
    stem = ("lm_layers_fused" if args.fused else "lm_layers") + (
        "" if args.block == (64, 64) else f"_b{block_name(args.block)}"
    )
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (out_dir / f"{stem}.md").write_text(text + "\n")
    plot(rows, out_dir / f"{stem}.png")
    print(text)


if __name__ == "__main__":
    main()
