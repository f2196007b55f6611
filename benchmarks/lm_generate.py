"""Served generation of an exported language model: `generate()` tokens/s, block-sparse against the same weights dense.

    python benchmarks/lm_generate.py --export exports/<lm run> --out $OUT      # GPU, bf16: eager and compiled
    python benchmarks/lm_generate.py --export DIR --device cpu --dtype fp32 --runtimes eager --batches 1 \\
        --new-tokens 4 --reps 1                                                  # a smoke run of the same code

The sparse model is `load_sparse(export)` (BlockSparseLinear projections, q/k/v and gate/up fused, kernels tuned
for the runtime), the dense one `load_folded(export)` (the same weights with the pruned blocks as zeros, cuBLAS):
same process, same prompts, same runtime. Runtimes:

  eager    generate() with its dynamic KV cache, nothing compiled
  compile  generate() with a static KV cache, its decode step compiled by transformers with
           mode="reduce-overhead" (CUDA graphs): how a user serves a small model fast
  graph    generate() with a static KV cache and custom_generate=graph_decoding (superblock.export): the
           one-token step captured once in a CUDA graph and replayed, the host checking for finished rows every
           few tokens; graph-compile: the same with the step compiled before capture (compile_step=True)

Each cell is greedy decoding of `--new-tokens` tokens (no early stop) after a `--prompt`-token prompt of random ids,
at batch 1 and 8 by default: tokens/s = batch x new tokens / the median wall time of `--reps` generate() calls after
warm-up (the first call compiles and tunes). `agree` is the share of generated tokens the sparse model picks the
same as the dense one (bf16 rounding differs between kernels, so not always 100%). Writes lm_generate.json and .md
after every row, so a run stopped by a time limit keeps the rows it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superblock.export import graph_decoding, load_folded, load_sparse  # noqa: E402
from superblock.export.serving import prepare_for_decoding, tuning_target  # noqa: E402
from superblock.hf_models import max_positions  # noqa: E402
from superblock.kernels import choice_counts  # noqa: E402

RUNTIMES = ("eager", "compile", "graph", "graph-compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="an export directory of a transformers language model")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (with --dtype fp32), not a measurement")
    p.add_argument("--dtype", default="bf16", help="fp32 | bf16 | fp16")
    p.add_argument("--runtimes", default="eager,compile", help=f"comma-separated, of {RUNTIMES}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    bad = sorted(set(args.runtimes) - set(RUNTIMES))
    if bad:
        p.error(f"unknown runtime {bad}: pick from {RUNTIMES}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA GPU here: this benchmark measures on one (--device cpu --dtype fp32 for a smoke run)")
    return args


def generate_kwargs(runtime: str, new_tokens: int) -> dict:
    """generate() options of a runtime: greedy, exactly `new_tokens` tokens."""
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    if runtime == "eager":
        return {**kwargs, "disable_compile": True}
    if runtime.startswith("graph"):
        return {**kwargs, "cache_implementation": "static", "custom_generate": graph_decoding,
                "compile_step": runtime == "graph-compile", "disable_compile": True}  # fmt: skip
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, mode="reduce-overhead")
    return {**kwargs, "cache_implementation": "static", "compile_config": config}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generate(model, prompt: torch.Tensor, kwargs: dict, reps: int) -> tuple[float, torch.Tensor]:
    """Median seconds of a generate() call after two warm-up calls, and the generated ids."""
    mask = torch.ones_like(prompt)
    pad = model.generation_config.pad_token_id
    kwargs = {**kwargs, "attention_mask": mask, "pad_token_id": pad if pad is not None else 0}
    with torch.no_grad():
        for _ in range(2):
            out = model.generate(prompt, **kwargs)
        times = []
        for _ in range(reps):
            sync(prompt.device)
            start = time.perf_counter()
            out = model.generate(prompt, **kwargs)
            sync(prompt.device)
            times.append(time.perf_counter() - start)
    return statistics.median(times), out[:, prompt.shape[1] :]


def measure(args: argparse.Namespace, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The rows of every runtime x batch; `on_row` gets the rows so far after each one (main writes them out, so a
    run stopped by a time limit keeps what it measured)."""
    device = torch.device(args.device)
    dense = load_folded(args.export, device=device, dtype=args.dtype)
    sparse = load_sparse(args.export, device=device, dtype=args.dtype)
    vocab, limit = dense.config.vocab_size, max_positions(dense)
    if limit is not None and args.prompt + args.new_tokens > limit:
        raise SystemExit(f"--prompt {args.prompt} + --new-tokens {args.new_tokens} > the model's {limit} positions")
    rows = []
    for runtime in args.runtimes:
        # the decode steps' token counts chosen (measured) now: inside a compiled step nothing is measured
        prepare_for_decoding(sparse, args.batches, tuning_target("eager" if runtime == "eager" else "cudagraph"))
        kwargs = generate_kwargs(runtime, args.new_tokens)
        for batch in args.batches:
            gen = torch.Generator().manual_seed(batch)
            prompt = torch.randint(0, vocab, (batch, args.prompt), generator=gen).to(device)
            dense_s, dense_ids = timed_generate(dense, prompt, kwargs, args.reps)
            sparse_s, sparse_ids = timed_generate(sparse, prompt, kwargs, args.reps)
            tokens = batch * args.new_tokens
            rows.append(
                {
                    "runtime": runtime,
                    "batch": batch,
                    "dense_tok_s": tokens / dense_s,
                    "sparse_tok_s": tokens / sparse_s,
                    "speedup": dense_s / sparse_s,
                    "agree": float((dense_ids == sparse_ids).float().mean()),
                    "choices": {str(b): c for b, c in choice_counts(sparse).items()},  # auto's, per token bucket
                }
            )
            print(table(rows[-1:], header=not rows[:-1]), flush=True)
            if on_row is not None:
                on_row(rows)
    return rows


def table(rows: list[dict], header: bool = True) -> str:
    lines = ["| runtime | batch | dense tokens/s | sparse tokens/s | speedup | agree |", "|---|---|---|---|---|---|"]
    lines = lines if header else []
    for r in rows:
        lines.append(
            f"| {r['runtime']} | {r['batch']} | {r['dense_tok_s']:.1f} | {r['sparse_tok_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['agree']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    head = (
        f"{args.export}, {device}, {args.dtype}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; prompt "
        f"{args.prompt} tokens, {args.new_tokens} new tokens, median of {args.reps}\n\n"
        f"`python benchmarks/lm_generate.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(rows: list[dict]) -> None:
        (out / "lm_generate.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        (out / "lm_generate.md").write_text(head + table(rows) + "\n")

    rows = measure(args, on_row=write)
    if not rows:  # every measured row was written as it came; with none, the files still say so
        write(rows)
    print("\n" + head + table(rows))


if __name__ == "__main__":
    main()
