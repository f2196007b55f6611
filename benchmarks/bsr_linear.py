"""Per-layer block-sparse linear benchmark: dense cuBLAS vs torch BSR vs our Triton kernel vs `auto`.

    python benchmarks/bsr_linear.py                       # full grid (ViT-B/H layers, blocks, sparsities, ...)
    python benchmarks/bsr_linear.py --quick               # the issue's target rows only
    python benchmarks/bsr_linear.py --sweep --quick       # also time a wide set of launch configs (tuning study)
    python benchmarks/bsr_linear.py --layers vitb_fc2 --blocks 64x16,64x64 --sparsity 0.9 --modes bf16 \
        --batches 256 --x-layouts token,feature         # x token-major and feature-major (the kernels read both)

All columns of a row are measured in the same run on the same inputs: random block masks with an exact
number of kept blocks, random activations, triton.testing.do_bench medians (it flushes L2 before every
call; inputs are rotated as well). `bound` = dense time / max(cuBLAS time at the reduced inner dimension
density*K, one read of x plus one write of y at the measured copy bandwidth). `ours` is our kernel with the
launch configuration the tuner picks (superblock.kernels.tuning); `auto` is bsr_linear(backend="auto")
after its one-time measurement. Writes a CSV (and the Markdown table) to --out; prints the table last.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superblock.kernels import BlockSparseLinear, bsr_linear, dense_to_bsr  # noqa: E402
from superblock.kernels import tuning as tuning_mod  # noqa: E402
from superblock.timing import host_us, time_graph  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks")

LAYERS = {  # name: (out, in)
    "vitb_fc1": (3072, 768),
    "vitb_fc2": (768, 3072),
    "vitb_qkv": (2304, 768),
    "vitb_proj": (768, 768),
    "vith_fc1": (5120, 1280),
    "vith_fc2": (1280, 5120),
}
MODES = {  # name: (dtype, fp32 precision of ours, dense allows tf32)
    "bf16": (torch.bfloat16, "ieee", False),
    "fp16": (torch.float16, "ieee", False),
    "fp32": (torch.float32, "ieee", False),
    "fp32x3": (torch.float32, "tf32x3", False),  # ours in 3xTF32 (near-fp32 accuracy) vs true-fp32 cuBLAS
    "tf32": (torch.float32, "tf32", True),  # opt-in tf32 on both sides
}
TOKENS_PER_IMAGE = 197
QUICK = [  # (layer, block, sparsity, mode, batch): the target rows
    *[(lay, 64, s, "bf16", 256) for lay in ("vitb_fc1", "vitb_fc2") for s in (0.8, 0.9)],
    *[(lay, 32, s, "bf16", 256) for lay in ("vitb_fc1", "vitb_fc2") for s in (0.8, 0.9)],
    *[(lay, 16, 0.9, "bf16", 256) for lay in ("vitb_fc1", "vitb_fc2")],
    ("vith_fc1", 64, 0.9, "bf16", 256),
    ("vith_fc2", 64, 0.9, "bf16", 256),
    *[(lay, 64, 0.9, m, 256) for lay in ("vitb_fc1", "vitb_fc2") for m in ("fp32", "fp32x3")],
    *[(lay, 64, 0.9, "bf16", b) for lay in ("vitb_fc1", "vitb_qkv") for b in (1, 32)],
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only the target rows of the issue")
    p.add_argument("--layers", default=",".join(LAYERS))
    p.add_argument("--blocks", default="16,32,64", help="square sizes or HxW, comma separated")
    p.add_argument("--sparsity", default="0.5,0.7,0.8,0.9,0.95")
    p.add_argument("--modes", default="bf16,fp32", help=f"of {','.join(MODES)}")
    p.add_argument("--batches", default="256,1,8,32", help=f"images of {TOKENS_PER_IMAGE} tokens")
    p.add_argument("--x-layouts", default="token", help="token (x [M, K] row-major) and/or feature (x^T stored)")
    p.add_argument("--sweep", action="store_true", help="tune over a wide config set (writes sweep.csv)")
    p.add_argument("--sweep-batches", default="256", help="batches that get the wide set under --sweep")
    p.add_argument("--no-auto", action="store_true", help="skip the auto column")
    p.add_argument("--host", action=argparse.BooleanOptionalAction, default=True, help="the host-cost table")
    p.add_argument("--rep-ms", type=float, default=20.0, help="do_bench rep (ms)")
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1), help="parallel compile")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new rows after this")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the CSV / Markdown")
    p.add_argument("--tag", default="bsr_linear")
    return p.parse_args(argv)


def _blocks(spec: str):
    out = []
    for b in spec.split(","):
        h, _, w = b.partition("x")
        out.append((int(h), int(w or h)))
    return out


def build_cases(args):
    if args.quick:
        return [
            {"layer": lay, "block": (b, b), "sparsity": s, "mode": m, "batch": bt, "x_layout": "token"}
            for lay, b, s, m, bt in QUICK
        ]
    layouts = args.x_layouts.split(",")
    if not set(layouts) <= {"token", "feature"}:
        raise SystemExit(f"--x-layouts takes token and/or feature, got {args.x_layouts}")
    grid = itertools.product(
        [int(b) for b in args.batches.split(",")],
        args.modes.split(","),
        args.layers.split(","),
        _blocks(args.blocks),
        [float(s) for s in args.sparsity.split(",")],
        layouts,
    )
    return [
        {"layer": lay, "block": blk, "sparsity": s, "mode": m, "batch": bt, "x_layout": xl}
        for bt, m, lay, blk, s, xl in grid
    ]


# ------------------------------------------------------------------------------------------ configurations


def sweep_configs(M, bh, bw, dtype, precision):
    """A wide set of launch configurations for the tuning study (not what production measures)."""
    elt = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    if dtype == torch.float32 and precision == "ieee":
        tiles = [(32, 4), (64, 4), (64, 8), (128, 8)]
        stages, groups = (2, 3), (1,)
    else:
        tiles = [(64, 4), (128, 4), (128, 8), (256, 8)]
        stages, groups = (2, 3, 4), tuple(g for g in (1, 2, 4, 8) if g * bh <= 128)
    # thin tiles (<= 32 columns): also KB kept blocks per step, 64 / 128 / 256 packed inputs
    packs = (1,) if bw > 32 or elt == 4 else (1, *(kw // bw for kw in (64, 128, 256)))
    out, seen = [], set()
    for (bm, w), st, g, kb in itertools.product(tiles, stages, groups, packs):
        if kb > 1 and g > 1:
            continue  # KB > 1 walks plain block rows
        for tma in (False, True) if g == 1 and kb == 1 else (False,):
            c = tuning_mod._fit(tuning_mod._cfg(bm, g, w, st, tma, kb), bh, bw, elt)
            sig = tuple(sorted(c.items()))
            if sig not in seen:
                seen.add(sig)
                out.append(c)
    return out


def case_configs(case, args, M):
    dtype, prec, _ = MODES[case["mode"]]
    if args.sweep and str(case["batch"]) in args.sweep_batches.split(","):
        return sweep_configs(M, *case["block"], dtype, prec)
    return tuning_mod.candidate_configs(M, *case["block"], dtype, prec)


# ------------------------------------------------------------------------------------------------- tensors


def random_mask(rows, cols, sparsity, gen, device):
    keep = round((1.0 - sparsity) * rows * cols)
    order = torch.randperm(rows * cols, generator=gen, device="cpu")[:keep]
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[order] = True
    return mask.view(rows, cols).to(device)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x [M, K] token-major as made, or the same values feature-major (stored as x^T [K, M]: what a layer that
    writes its output transposed hands the next one); dense F.linear reads either without a copy."""
    return x.t().contiguous().t() if layout == "feature" else x


def make_tensors(case, device, n_rot=1, seed=0):
    out_f, in_f = LAYERS[case["layer"]]
    bh, bw = case["block"]
    dtype = MODES[case["mode"]][0]
    gen = torch.Generator().manual_seed(seed)
    rows, cols = -(-out_f // bh), -(-in_f // bw)
    mask = random_mask(rows, cols, case["sparsity"], gen, device)
    full = mask.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:out_f, :in_f]
    w = (torch.randn(out_f, in_f, device=device) * full / math.sqrt(in_f)).to(dtype)
    values, crow, col = dense_to_bsr(w, (bh, bw))
    M = case["batch"] * TOKENS_PER_IMAGE
    xs = [_layout(torch.randn(M, in_f, device=device).to(dtype), case["x_layout"]) for _ in range(n_rot)]
    return {"w": w, "values": values, "crow": crow, "col": col, "xs": xs, "M": M, "N": out_f, "K": in_f}


def torch_bsr_weight(t):
    bh, bw = t["values"].shape[1:]
    rows, cols = t["crow"].numel() - 1, -(-t["K"] // bw)
    return torch.sparse_bsr_tensor(
        t["crow"].long(), t["col"].long(), t["values"], size=(rows * bh, cols * bw), check_invariants=False
    )


def torch_bsr_fn(t, wb):
    k_pad = wb.shape[1] - t["K"]
    xs = [F.pad(x, (0, k_pad)) if k_pad else x for x in t["xs"]]
    n = t["N"]
    return _rotating(lambda x: F.linear(x, wb)[:, :n], xs)


def _rotating(fn, xs):
    state = {"i": 0}

    def run():
        state["i"] += 1
        return fn(xs[state["i"] % len(xs)])

    return run


# -------------------------------------------------------------------------------------------------- timing


def bench(fn, rep_ms: float) -> float:
    """Median time of fn() in ms (triton.testing.do_bench on CUDA; perf_counter on CPU for smoke runs)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=max(2.0, rep_ms / 4), rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ceilings(device):
    """Copy bandwidth (bytes read + written per second) and dense matmul rates, measured now."""
    if device.type != "cuda":
        return {"copy_TBps": 0.05, "bf16_TFLOPs": 0.1, "fp32_TFLOPs": 0.1}
    a = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), 50)
    res = {"copy_TBps": 2 * a.numel() / (t * 1e-3) / 1e12}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        x = torch.randn(8192, 8192, device=device).to(dt)
        t = bench(lambda x=x: x @ x, 100)
        res[f"{name}_TFLOPs"] = 2 * 8192**3 / (t * 1e-3) / 1e12
    return res


# --------------------------------------------------------------------------------------------- compilation


def _warm_worker(job):
    """Compile (into Triton's on-disk cache) the kernels of one problem, in a side process.

    Only what Triton specializes on matters (dtype, block, flags, divisibility of the sizes), so the weight is
    random at 90% sparsity whatever the row's sparsity."""
    torch.cuda.set_device(0)
    dtype = getattr(torch, job["dtype"])
    N, K, M = job["N"], job["K"], job["M"]
    bh, bw = job["block"]
    rows, cols = -(-N // bh), -(-K // bw)
    keep = torch.rand(rows, cols, device="cuda") < 0.1
    full = keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:N, :K]
    w = (torch.randn(N, K, device="cuda") * full).to(dtype)
    values, crow, col = dense_to_bsr(w, (bh, bw))
    x = _layout(torch.randn(M, K, device="cuda").to(dtype), job["x_layout"])
    bias = torch.randn(N, device="cuda").to(dtype) if job.get("bias") else None
    failed = 0
    for cfg in job["configs"]:
        try:
            bsr_linear(
                x,
                values,
                crow,
                col,
                (N, K),
                bias,
                job.get("act"),
                backend="triton",
                fp32_precision=job["prec"],
                config=cfg,
            )
        except Exception:
            failed += 1
    if job.get("torch"):
        with contextlib.suppress(Exception):
            bsr_linear(x, values, crow, col, (N, K), bias, job.get("act"), backend="torch")
    torch.cuda.synchronize()
    return failed


def warm_kernels(jobs, workers: int) -> None:
    """Run _warm_worker over jobs in `workers` spawned processes (compilation is the slow part)."""
    if workers <= 1 or not jobs or not torch.cuda.is_available():
        return
    t0 = time.time()
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        failed = sum(pool.map(_warm_worker, jobs))
    print(f"precompiled {len(jobs)} jobs in {time.time() - t0:.0f}s ({failed} configs failed)", flush=True)


def precompile(cases, args):
    jobs, seen = [], set()
    for case in cases:  # sparsity and seeds do not change what is compiled
        M = case["batch"] * TOKENS_PER_IMAGE
        sig = (case["layer"], case["block"], case["mode"], case["batch"], case["x_layout"])
        if sig not in seen:
            seen.add(sig)
            dtype, prec, _ = MODES[case["mode"]]
            N, K = LAYERS[case["layer"]]
            configs = case_configs(case, args, M)
            for i in range(0, len(configs), 4):  # small jobs spread well over the workers
                job = {
                    "N": N,
                    "K": K,
                    "M": M,
                    "block": case["block"],
                    "dtype": str(dtype).split(".")[-1],
                    "prec": prec,
                    "configs": configs[i : i + 4],
                    "torch": i == 0,
                    "x_layout": case["x_layout"],
                }
                jobs.append(job)
    warm_kernels(jobs, args.workers)


# ----------------------------------------------------------------------------------------------------- rows


def run_case(case, args, device, ceil, dense_cache, sweep_rows):
    dtype, prec, dense_tf32 = MODES[case["mode"]]
    torch.backends.cuda.matmul.allow_tf32 = dense_tf32
    M = case["batch"] * TOKENS_PER_IMAGE
    out_f, in_f = LAYERS[case["layer"]]
    elt = torch.finfo(dtype).bits // 8
    x_bytes = M * in_f * elt
    n_rot = max(1, min(8, math.ceil(120e6 / max(x_bytes, 1))))
    t = make_tensors(case, device, n_rot)
    shape = (t["N"], t["K"])
    row = {**case, "block": f"{case['block'][0]}x{case['block'][1]}", "tokens": M, "N": out_f, "K": in_f}

    dkey = (case["layer"], case["mode"], M, case["x_layout"])  # dense on the same x
    if dkey not in dense_cache:
        dense_cache[dkey] = bench(_rotating(lambda x: F.linear(x, t["w"]), t["xs"]), args.rep_ms)
    row["dense_ms"] = dense_cache[dkey]
    rkey = (case["layer"], case["mode"], M, case["sparsity"])
    if rkey not in dense_cache:
        kr = max(16, round(in_f * (1 - case["sparsity"]) / 16) * 16)
        xr = torch.randn(M, kr, device=device).to(dtype)
        wr = torch.randn(out_f, kr, device=device).to(dtype)
        dense_cache[rkey] = bench(lambda: F.linear(xr, wr), args.rep_ms)
    row["reduced_ms"] = dense_cache[rkey]
    row["bytes_ms"] = (x_bytes + M * out_f * elt) / (ceil["copy_TBps"] * 1e12) * 1e3

    try:
        row["torch_ms"] = bench(torch_bsr_fn(t, torch_bsr_weight(t)), args.rep_ms)
    except Exception as err:  # no torch kernel for this case
        row["torch_ms"] = float("nan")
        row["torch_error"] = str(err).splitlines()[0][:80]

    # ours: the tuner's measurement over the configs, then do_bench of the winner
    args_t = (t["xs"][0], t["values"], t["crow"], t["col"], shape, None, None)
    configs = case_configs(case, args, M)
    if device.type == "cuda":
        times, entry = tuning_mod.measure(args_t, prec, configs, backends=("triton",))
        best = entry.get("triton_config")
        for label, us in entry.get("gpu_us", {}).items():  # GPU time of each configuration (graph replays)
            sweep_rows.append({**row, "config": label, "tuner_ms": us / 1000.0})
    else:
        best = configs[0]
    if best is not None:

        def ours(x):
            return bsr_linear(
                x, t["values"], t["crow"], t["col"], shape, backend="triton", fp32_precision=prec, config=best
            )

        row["ours_ms"] = bench(_rotating(ours, t["xs"]), args.rep_ms)
        row["ours_config"] = json.dumps(best, separators=(",", ":"))
        if device.type == "cuda":  # GPU time alone (CUDA-graph replays): the eager column minus host cost
            x0, y0 = t["xs"][0], torch.empty(M, out_f, device=device, dtype=dtype)
            kw = {"backend": "triton", "fp32_precision": prec, "config": best, "out": y0}
            row["ours_graph_ms"] = time_graph(lambda: bsr_linear(x0, t["values"], t["crow"], t["col"], shape, **kw))
            row["dense_graph_ms"] = time_graph(lambda: torch.matmul(x0, t["w"].t(), out=y0))
            row["ours_graph_x"] = row["dense_graph_ms"] / row["ours_graph_ms"]
    else:
        row["ours_ms"] = float("nan")

    if not args.no_auto:

        def auto(x):
            return bsr_linear(x, t["values"], t["crow"], t["col"], shape, backend="auto", fp32_precision=prec)

        auto(t["xs"][0])  # the one-time measurement
        key = tuning_mod.problem_key(M, *shape, *case["block"], t["values"].shape[0], dtype, prec, False, None)
        entry = tuning_mod.lookup(tuning_mod.scope_for(device), key) if device.type == "cuda" else None
        row["auto_backend"] = entry["backend"] if entry else "cpu"
        row["auto_ms"] = bench(_rotating(auto, t["xs"]), args.rep_ms)

    for col_name in ("torch", "ours", "auto"):
        if f"{col_name}_ms" in row:
            row[f"{col_name}_x"] = row["dense_ms"] / row[f"{col_name}_ms"]
    row["bound_x"] = row["dense_ms"] / max(row["reduced_ms"], row["bytes_ms"])
    return row


FIELDS = [
    "layer",
    "N",
    "K",
    "block",
    "sparsity",
    "mode",
    "batch",
    "tokens",
    "x_layout",
    "dense_ms",
    "torch_ms",
    "ours_ms",
    "dense_graph_ms",
    "ours_graph_ms",
    "auto_ms",
    "auto_backend",
    "reduced_ms",
    "bytes_ms",
    "torch_x",
    "ours_x",
    "auto_x",
    "ours_graph_x",
    "bound_x",
    "ours_config",
    "torch_error",
]


def markdown(rows):
    """The speed table: eager columns (do_bench of back-to-back calls: host cost shows when the GPU outruns the
    launches) and CUDA-graph columns (GPU time alone), each a ratio to dense in the same runtime."""
    head = (
        "| layer | block | sparsity | dtype | tokens | dense ms | torch BSR ms | ours ms | auto | torch x | ours x | "
        "auto x | dense graph ms | ours graph ms | graph x | bound x |"
    )
    lines = [head, "|" + "---|" * 16]
    nan = float("nan")
    for r in rows:
        lines.append(
            f"| {r['layer']} {r['N']}x{r['K']} | {r['block']}{' xT' if r.get('x_layout') == 'feature' else ''} | "
            f"{r['sparsity']} | {r['mode']} | {r['tokens']} | "
            f"{r['dense_ms']:.4f} | {r['torch_ms']:.4f} | {r['ours_ms']:.4f} | {r.get('auto_backend', '-')} | "
            f"{r.get('torch_x', nan):.2f} | {r.get('ours_x', nan):.2f} | {r.get('auto_x', nan):.2f} | "
            f"{r.get('dense_graph_ms', nan):.4f} | {r.get('ours_graph_ms', nan):.4f} | "
            f"{r.get('ours_graph_x', nan):.2f} | "
            f"{r['bound_x']:.2f} |"
        )
    return "\n".join(lines)


HOST_LAYERS = ("vitb_fc1", "vitb_fc2")
HOST_TOKENS = (1, TOKENS_PER_IMAGE, 256 * TOKENS_PER_IMAGE)


def host_costs(device) -> list[dict]:
    """Host (CPU) time per call in us of dense F.linear and of our three entry points (the functional op with a
    pinned config, `auto` with its choice kept, BlockSparseLinear.forward), block 64 at 90%, bf16, eager."""
    if device.type != "cuda":
        return []
    return [_host_row(layer, tokens, device) for layer in HOST_LAYERS for tokens in HOST_TOKENS]


@torch.no_grad()
def _host_row(layer: str, tokens: int, device) -> dict:
    case = {"layer": layer, "block": (64, 64), "sparsity": 0.9, "mode": "bf16", "batch": 1, "x_layout": "token"}
    t = make_tensors(case, device)
    x = torch.randn(tokens, t["K"], device=device, dtype=torch.bfloat16)
    shape, v, c, cl = (t["N"], t["K"]), t["values"], t["crow"], t["col"]
    cfg = tuning_mod.default_config(tokens, *shape, 64, 64, torch.bfloat16, "ieee", v.shape[0])
    mod = BlockSparseLinear.from_bsr(v, c, cl, shape).prepare(tokens)
    fns = {
        "F.linear": lambda: F.linear(x, t["w"]),
        "bsr_linear(config)": lambda: bsr_linear(x, v, c, cl, shape, backend="triton", config=cfg),
        "auto": lambda: bsr_linear(x, v, c, cl, shape),
        "module": lambda: mod(x),
    }
    row = {"layer": layer, "tokens": tokens, "module_choice": mod.choices()[tuning_mod.token_bucket(tokens)]}
    row.update({name: host_us(fn) for name, fn in fns.items()})
    torch.cuda.synchronize()
    return row


def host_markdown(rows) -> str:
    lines = [
        "| layer | tokens | F.linear us | bsr_linear(config) us | auto us | BlockSparseLinear us | module's choice |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        ch = r["module_choice"]
        lines.append(
            f"| {r['layer']} | {r['tokens']} | {r['F.linear']:.1f} | {r['bsr_linear(config)']:.1f} | {r['auto']:.1f} "
            f"| {r['module']:.1f} | {ch.backend}{'' if ch.config is None else ' ' + json.dumps(ch.config)} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = build_cases(args)
    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": getattr(tuning_mod._triton_bsr.triton, "__version__", "none"),
    }
    ceil = ceilings(device)
    env.update({k: round(v, 2) for k, v in ceil.items()})
    print(json.dumps(env), flush=True)
    precompile(cases, args)

    t_start = time.time()
    rows, sweep_rows, dense_cache = [], [], {}
    csv_path = out_dir / f"{args.tag}.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS, extrasaction="ignore")
        writer.writeheader()
        for i, case in enumerate(cases):
            if time.time() - t_start > args.budget_s:
                print(f"budget reached after {i} of {len(cases)} rows", flush=True)
                break
            row = run_case(case, args, device, ceil, dense_cache, sweep_rows)
            rows.append(row)
            writer.writerow(row)
            fh.flush()
            print(
                f"[{i + 1}/{len(cases)}] {row['layer']} b{row['block']} s{row['sparsity']} {row['mode']} "
                f"M={row['tokens']}: dense {row['dense_ms']:.4f} torch {row['torch_ms']:.4f} "
                f"ours {row['ours_ms']:.4f} ({row.get('ours_x', 0):.2f}x) auto {row.get('auto_backend', '-')} "
                f"{row.get('auto_x', 0):.2f}x bound {row['bound_x']:.2f}x",
                flush=True,
            )
    if sweep_rows:
        with (out_dir / f"{args.tag}_sweep.csv").open("w", newline="") as fh:
            keys = ["layer", "block", "sparsity", "mode", "tokens", "config", "tuner_ms"]
            w = csv.DictWriter(fh, keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(sweep_rows)
    md = markdown(rows)
    host_md = host_markdown(host_costs(device)) if args.host else ""
    header = f"{env['device']}, torch {env['torch']}, triton {env['triton']}, copy {ceil['copy_TBps']:.2f} TB/s"
    (out_dir / f"{args.tag}.md").write_text(header + "\n\n" + md + "\n\n" + host_md + "\n")
    print(header)
    print(md)
    if host_md:
        print("\nHost time per call (us, CPU time of the calling thread; block 64 / 90%, bf16, eager):")
        print(host_md)


if __name__ == "__main__":
    main()
