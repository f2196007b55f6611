"""A Llama-architecture causal LM with Llama-3-8B dimensions, block-sparse vs dense: prefill and greedy decode.

    PYTHONPATH=. python benchmarks/lm_e2e.py --out $OUT                  # 32 layers, prefill 2048, decode 256 tokens
    PYTHONPATH=. python benchmarks/lm_e2e.py --fuse both --compile --out $OUT  # sparse unfused and fused vs dense
    PYTHONPATH=. python benchmarks/lm_e2e.py --fuse on --compile --sparsity 0.5,0.7,0.8,0.9 --out $OUT  # + a plot
    PYTHONPATH=. python benchmarks/lm_e2e.py --layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 \
        --vocab 1000 --prefill 64 --prompt 8 --new-tokens 8 --device cpu   # a smoke run of the same code on a CPU

transformers' LlamaForCausalLM (hidden 4096, intermediate 14336, 32 heads, 8 kv heads, vocab 128256) with random
weights, nothing downloaded, bf16, SDPA attention. In every decoder layer of the dense model built again `sparsity` of
the 64x64 blocks of q/k/v/o and gate/up/down are zeroed at random (exact count per weight) and each of those
nn.Linear is replaced by BlockSparseLinear.from_dense (backend "auto", tuned for the CUDA-graph target at 1 and
`--prefill` tokens); the dense model runs all its weights on cuBLAS (`--dense-weights zeroed`: with the sparse
model's zeros, as the earlier tables in docs/benchmarks.md; zeros draw less power, and the H100's prefill ran 11%
faster on them); embeddings and lm_head stay dense in both. `--sparsity 0.5,0.7,0.8,0.9` measures one sparse model
per level (built, measured and freed in turn) against the same dense one and draws tokens/s against sparsity.
`--fuse on` fuses the sparse model's projections as load_sparse does by default (projection_fusion: q/k/v one
product, gate/up one with silu * up in the kernel: 4 sparse products per layer instead of 7); `--fuse both`
measures the unfused and the fused sparse model, each against the same dense one. Same
process, same runtime, same inputs:

  prefill  ms of one forward over `--prefill` tokens (batch 1, no cache, logits of the last token only, as
           generate() computes them), replayed from a CUDA graph (eager if the capture fails: the table says)
  decode   greedy tokens/s at batch `--batch` (1 by default; the tokens of all sequences): a StaticCache, the
           one-token step (forward, argmax, position += 1) captured in a CUDA graph and replayed `--new-tokens`
           times after a `--prompt`-token prefill. Before timing, the replayed steps' logits are checked against
           the eager steps' and against a cache-free forward. Also timed with the prompt's prefill (eager) in the
           same span, as generate() is timed: the row generate() is compared with.
  generate (--generate) the same decode through transformers' own `model.generate()`: greedy, same batch, a static
           cache and its decode step compiled with mode="reduce-overhead" (CUDA graphs; eager on a CPU), the way
           lm_generate.py serves an export: how close a user's generate() comes to the loop above; and through
           generate(custom_generate=graph_decoding) (superblock.export: the step captured in a CUDA graph, compiled
           first under --compile)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lm_generate import generate_kwargs, timed_generate  # noqa: E402
from superblock.export.decoding import step_inputs  # noqa: E402
from superblock.kernels import BlockSparseLinear, choice_counts  # noqa: E402
from superblock.kernels.projection_fusion import fuse_projections  # noqa: E402
from superblock.sparsity.targets import LLAMA_PROJECTIONS  # noqa: E402
from superblock.timing import capture_graph  # noqa: E402

warnings.filterwarnings("ignore", message=".*Sparse BSR tensor support is in beta.*")


def levels_list(text: str) -> list[float]:
    levels = [float(v) for v in text.split(",") if v.strip()]
    if not levels or any(not 0.0 <= v < 1.0 for v in levels):
        raise argparse.ArgumentTypeError(f"sparsity levels must be in [0, 1), got {text!r}")
    return levels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument(
        "--sparsity",
        type=levels_list,
        default=[0.9],
        help="fraction of blocks zeroed, or a comma list (e.g. 0.5,0.7,0.8,0.9): one sparse model per level, each "
        "against the same dense one, and a plot of tokens/s against sparsity (lm_e2e*_sparsity.png)",
    )
    p.add_argument("--block", type=int, default=64)
    p.add_argument(
        "--dense-weights",
        choices=("full", "zeroed"),
        default="full",
        help="the dense model's weights: all of them (a dense model as users have it), or zeroed where the sparse "
        "model's are (one level only; the earlier tables in docs/benchmarks.md). cuBLAS runs faster on zeros: on "
        "the H100 prefill took 60.3 ms against 67.9",
    )
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded at once (equal-length prompts)")
    p.add_argument("--reps", type=int, default=10, help="prefill calls per timing round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the one-token decode step (dense and sparse alike) before its CUDA graph: "
        "fuses the norms, rotary embeddings and residual adds, about half of an unfused decode step "
        "(prefill, mostly large matmuls, stays uncompiled)",
    )
    p.add_argument(
        "--fuse",
        choices=("off", "on", "both"),
        default="off",
        help="the sparse model's q/k/v and gate/up as fused products (on), one layer per weight (off), or "
        "both models measured",
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="also time model.generate() (greedy, --batch sequences, static cache, decode step compiled with "
        "reduce-overhead on a GPU) beside the benchmark's own decode loop",
    )
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    if args.dense_weights == "zeroed" and len(args.sparsity) > 1:
        p.error("--dense-weights zeroed takes one --sparsity level (the dense model holds that level's zeros)")
    return args


def build_dense(args) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()  # the zeros go into each sparse model (--dense-weights zeroed: here too)


def zero_random_blocks(w: torch.Tensor, block: int, sparsity: float, gen: torch.Generator) -> None:
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    keep = torch.zeros(rows * cols, dtype=torch.bool)
    keep[torch.randperm(rows * cols, generator=gen)[: round((1 - sparsity) * rows * cols)]] = True
    full = keep.view(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)
    w.mul_(full[: w.shape[0], : w.shape[1]].to(w.device, w.dtype))


def kept_fraction(model: nn.Module) -> float:
    """The fraction of the block-sparse layers' blocks that are stored."""
    mods = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    total = sum(-(-m.out_features // m.values.shape[1]) * -(-m.in_features // m.values.shape[2]) for m in mods)
    return sum(int(m.values.shape[0]) for m in mods) / max(total, 1)


def zero_blocks(model: nn.Module, args, level: float) -> nn.Module:
    """`level` of the blocks of every projection zeroed at random: the same blocks for the same level."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for name in LLAMA_PROJECTIONS:
                zero_random_blocks(layer.get_submodule(name).weight, args.block, level, gen)
    return model


def to_sparse(args, level: float, fuse: bool = False) -> nn.Module:
    """The dense model built again (the same weights: built, not copied, since a measured model holds CUDA graphs
    that do not copy) with `level` of the blocks of every projection zeroed and each projection a BlockSparseLinear,
    tuned and prepared."""
    model = zero_blocks(build_dense(args), args, level)
    for layer in model.model.layers:
        for name in LLAMA_PROJECTIONS:
            parent_name, attr = name.rsplit(".", 1)
            parent = layer.get_submodule(parent_name)
            mod = BlockSparseLinear.from_dense(getattr(parent, attr), block_size=args.block)
            mod.tuning_target = "graph"
            setattr(parent, attr, mod)
    if fuse:
        counts = fuse_projections(model)
        print(f"fused q/k/v in {counts['qkv']} layers, gate/up in {counts['gate_up']}", flush=True)
    t0 = time.time()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, BlockSparseLinear):
                mod.prepare([args.batch, args.prefill])
    print(f"tuned and prepared the sparse layers in {time.time() - t0:.1f} s", flush=True)
    return model


def on_gpu(device: str) -> bool:
    return torch.device(device).type == "cuda"


def sync(device: str) -> None:
    if on_gpu(device):
        torch.cuda.synchronize()


def capture(fn, device: str):
    """A CUDA graph of fn() (after a warm-up call on a side stream), or None off CUDA."""
    if not on_gpu(device):
        return None
    return capture_graph(fn)


def compiled(model, args):
    """The model's forward under torch.compile (one graph per input shape), or the model itself."""
    if not args.compile:
        return model
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 16))
    return torch.compile(model, dynamic=False)


def prefill_ms(model, args) -> tuple[float, str]:
    ids = torch.randint(0, args.vocab, (1, args.prefill), device=args.device, generator=None)

    def fn():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    runtime, run = "eager", fn
    with torch.no_grad():
        fn()
        try:
            graph = capture(fn, args.device)
            if graph is not None:
                runtime, run = "cuda graph", graph.replay
        except Exception as err:  # e.g. a host sync inside the model: report eager
            print(f"prefill capture failed ({type(err).__name__}: {str(err)[:200]}); timing eager", flush=True)
        times = []
        for _ in range(args.rounds):
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.reps):
                run()
            sync(args.device)
            times.append(1000.0 * (time.perf_counter() - t0) / args.reps)
    return statistics.median(times), runtime


class Decoder:
    """Greedy decoding of `--batch` equal-length prompts around a transformers StaticCache with every tensor at a
    fixed address, so that the
    one-token step (forward, argmax, position += 1) can be captured in a CUDA graph and replayed."""

    def __init__(self, model, args, prompt: torch.Tensor) -> None:
        from transformers import StaticCache

        self.model, self.prompt = model, prompt
        self.step_model = compiled(model, args)  # the one-token step; prefill and checks run eagerly
        self.cache = StaticCache(config=model.config, max_cache_len=args.prompt + args.new_tokens + 16)
        dev = prompt.device
        batch = prompt.shape[0]
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)  # equal-length prompts: one position for all
        self.logits = torch.zeros(batch, model.config.vocab_size, dtype=torch.float32, device=dev)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, model=None):
        kw = step_inputs(self.model, self.cache, positions.view(1, -1), positions.view(-1))
        return (self.model if model is None else model)(input_ids=ids, **kw).logits[:, -1].float()

    def prefill(self) -> None:
        if getattr(self.cache, "is_initialized", False):
            self.cache.reset()  # zero the keys / values and the write position, in place
        n = self.prompt.shape[1]
        logits = self._forward(self.prompt, torch.arange(n, device=self.prompt.device))
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.fill_(n)

    def step(self) -> None:
        self.logits.copy_(self._forward(self.tok, self.pos, self.step_model))
        self.tok.copy_(self.logits.argmax(-1, keepdim=True))
        self.pos.add_(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def decode_prompt(args) -> torch.Tensor:
    """The `--batch` prompts of `--prompt` random token ids that every decode measure starts from (the same each
    call)."""
    gen = torch.Generator().manual_seed(2)
    return torch.randint(0, args.vocab, (args.batch, args.prompt), generator=gen).to(args.device)


def eager_steps(dec: Decoder, steps: int = 3) -> tuple[list, list, torch.Tensor]:
    """Prefill, then `steps` eager steps: the tokens they were fed (and the last one they picked), their logits, and a
    cache-free forward's logits at the same positions ([batch, steps, vocab])."""
    dec.prefill()
    eager, toks = [], [dec.tok.clone()]
    for _ in range(steps):
        dec.step()
        eager.append(dec.logits.clone())
        toks.append(dec.tok.clone())
    full = dec.model(input_ids=torch.cat([dec.prompt, *toks[:steps]], dim=1), use_cache=False).logits.float()
    return toks, eager, full[:, dec.prompt.shape[1] :]


def replay_checks(dec: Decoder, graph, toks: list, eager: list, full: torch.Tensor) -> dict[str, float]:
    """The captured step replayed once per eager step, each replay fed the token the eager step was fed (`toks[i]`),
    against the eager steps' logits and the cache-free forward's (`full[:, i]`). Fed its own argmax instead, one
    sequence of a batch whose top two logits are closer than the replay's rounding takes the other token, and every
    later step of it compares logits of another text."""
    dec.prefill()
    replayed = []
    for tok in toks[: len(eager)]:
        dec.tok.copy_(tok)
        graph.replay()
        replayed.append(dec.logits.clone())
    return {
        "graph_vs_eager": max(rel(r, e) for r, e in zip(replayed, eager, strict=True)),
        "graph_vs_cache_free": max(rel(r, full[:, i]) for i, r in enumerate(replayed)),
    }


def decode_tokens_per_s(model, args) -> tuple[float, float, str, dict]:
    """The benchmark's own greedy loop: tokens/s of the steps alone, and with the prompt's prefill (as generate() is
    timed), the step's runtime, and the checks of the step (eager and replayed) against a cache-free forward."""
    prompt = decode_prompt(args)
    dec = Decoder(model, args, prompt)
    checks = {}
    with torch.no_grad():
        toks, eager, full = eager_steps(dec)
        checks["step_vs_cache_free"] = max(rel(e, full[:, i]) for i, e in enumerate(eager))
        runtime, run = "eager", dec.step
        try:
            graph = capture(dec.step, args.device)
            if graph is not None:
                checks.update(replay_checks(dec, graph, toks, eager, full))
                # bf16 through 32 layers: eager steps differ from a cache-free forward by ~1e-2 already, and fp32
                # atomic sums (the decode kernel) are not bit-reproducible; a wrong capture (stale positions, a
                # baked-in cache slot) is off by far more than that
                limit = max(3e-2, 2 * checks["step_vs_cache_free"])
                if checks["graph_vs_cache_free"] > limit:
                    raise RuntimeError(f"replayed steps are off: {checks['graph_vs_cache_free']:.2e} > {limit:.2e}")
                runtime, run = "cuda graph", graph.replay
        except Exception as err:
            print(f"decode capture failed ({type(err).__name__}: {str(err)[:200]}); timing eager", flush=True)
        rates, with_prompt = [], []  # the steps alone; and with the prompt's prefill, as generate() is timed
        for _ in range(args.rounds):
            sync(args.device)
            t_prompt = time.perf_counter()
            dec.prefill()
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.new_tokens):
                run()
            sync(args.device)
            t1 = time.perf_counter()
            rates.append(args.batch * args.new_tokens / (t1 - t0))
            with_prompt.append(args.batch * args.new_tokens / (t1 - t_prompt))
    return statistics.median(rates), statistics.median(with_prompt), runtime, checks


def generate_tokens_per_s(model, args, graph: bool = False) -> tuple[float, str]:
    """Greedy tokens/s of model.generate() on the decode loop's prompts (all sequences' tokens), and its runtime;
    `graph`: with custom_generate=graph_decoding (the step replayed from a CUDA graph, compiled first under
    --compile)."""
    if graph:
        runtime = "graph-compile" if args.compile else "graph"
        label = f"generate(custom_generate=graph_decoding{', compile_step' if args.compile else ''})"
    else:
        runtime = "compile" if on_gpu(args.device) else "eager"
        label = "generate(), static cache, reduce-overhead" if runtime == "compile" else "generate(), eager"
    seconds, _ = timed_generate(model, decode_prompt(args), generate_kwargs(runtime, args.new_tokens), args.rounds)
    return args.batch * args.new_tokens / seconds, label


def table_row(
    title: str, label: str, dense: dict, sparse: dict, key: str, fmt: str, runtimes: str, lower_is_faster: bool = False
) -> str:
    """One line of the report: a measure's dense and sparse values, the sparse model's speedup, the runtimes."""
    a, b = dense[key], sparse[key]
    speedup = a / b if lower_is_faster else b / a
    return f"| {title} | {label} | {a:{fmt}} | {b:{fmt}} | **{speedup:.2f}x** | {runtimes} |"


def report(rows: dict[str, dict], args) -> str:
    """The markdown table: dense against each sparse variant (unfused "sparse", fused "sparse_fused")."""
    d = rows["dense"]
    device = torch.cuda.get_device_name() if on_gpu(args.device) else "cpu"
    dims = (
        f"hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads / {args.kv_heads} kv, "
        f"{args.layers} layers, vocab {args.vocab}"
    )
    runtime = "torch.compile + " if args.compile else ""
    lines = [
        f"{device}, torch {torch.__version__}, bf16, LlamaForCausalLM ({dims}), sparsity "
        f"{', '.join(f'{v:g}' for v in args.sparsity)} block "
        f"{args.block} on q/k/v/o/gate/up/down, {time.strftime('%Y-%m-%d')}",
        "",
        "| measure | model | dense | sparse | speedup | runtime (dense / sparse) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in rows.items():
        if name == "dense":
            continue
        label = "sparse, q/k/v + gate/up fused" if name.startswith("sparse_fused") else "sparse"
        if len(args.sparsity) > 1:
            label += f", {s['sparsity']:.0%}"
        prefill_rt = f"{d['prefill_runtime']} / {s['prefill_runtime']}"
        lines.append(
            table_row(f"prefill {args.prefill} tokens (ms)", label, d, s, "prefill_ms", ".2f", prefill_rt, True)
        )
        rates = (  # tokens/s rows: (measure, row key, runtime column); the generate() rows only with --generate
            (f"greedy decode, batch {args.batch} (tokens/s; prompt {args.prompt}, {args.new_tokens} new)",
             "decode_tok_s", f"{runtime}{d['decode_runtime']} / {runtime}{s['decode_runtime']}"),
            # what generate() is measured against: its calls include the prompt
            ("greedy decode, the loop with its prompt's prefill (tokens/s, as generate() is timed)",
             "decode_with_prompt_tok_s", f"{d['decode_runtime']} / {s['decode_runtime']}, prompt eager"),
            (f"greedy decode through generate(), batch {args.batch} (tokens/s)", "generate_tok_s",
             s.get("generate_runtime")),
            (f"greedy decode through generate() with graph_decoding, batch {args.batch} (tokens/s)", "graph_tok_s",
             s.get("graph_runtime")),
        )  # fmt: skip
        lines += [table_row(title, label, d, s, key, ".1f", runtimes=rt) for title, key, rt in rates if key in s]
    for name, s in rows.items():
        if s.get("choices"):
            picks = "; ".join(
                f"up to {b} tokens: " + ", ".join(f"{k} x{v}" for k, v in c.items()) for b, c in s["choices"].items()
            )
            lines.append(f"\n`auto` in {name} (layers per backend / kernel, per token bucket): {picks}")
    return "\n".join(lines)


def measure(model: nn.Module, args) -> dict:
    """One model's row: prefill ms, decode tokens/s (and through generate() with --generate), seconds taken."""
    t0 = time.time()
    ms, prefill_rt = prefill_ms(model, args)
    tps, with_prompt, decode_rt, checks = decode_tokens_per_s(model, args)
    row = {"prefill_ms": ms, "prefill_runtime": prefill_rt, "decode_tok_s": tps, "decode_runtime": decode_rt}
    row["decode_with_prompt_tok_s"] = with_prompt  # the loop timed as generate() is: its prompt included
    row["checks"] = checks
    if args.generate:
        row["generate_tok_s"], row["generate_runtime"] = generate_tokens_per_s(model, args)
        row["graph_tok_s"], row["graph_runtime"] = generate_tokens_per_s(model, args, graph=True)
    row["seconds"] = time.time() - t0
    if counts := choice_counts(model):  # which kernels auto chose, per token bucket (none in the dense model)
        row["choices"] = {str(b): c for b, c in counts.items()}
    return row


def row_name(variant: str, level: float, args) -> str:
    """ "sparse" / "sparse_fused", with "@<level>" when several levels are measured."""
    return variant if len(args.sparsity) == 1 else f"{variant}@{level:g}"


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "lm_e2e_compiled" if args.compile else "lm_e2e"
    if args.fuse != "off":
        stem += "_fused" if args.fuse == "on" else "_fuse_both"

    def write(rows: dict[str, dict]) -> str:  # after every row: a run stopped by a time limit keeps its rows
        text = report(rows, args)
        (out_dir / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        (out_dir / f"{stem}.md").write_text(text + "\n")
        return text

    dense = build_dense(args)
    if args.dense_weights == "zeroed":
        zero_blocks(dense, args, args.sparsity[0])
    variants = {"off": ("sparse",), "on": ("sparse_fused",), "both": ("sparse", "sparse_fused")}[args.fuse]
    rows: dict[str, dict] = {"dense": measure(dense, args)}
    print(json.dumps({"dense": rows["dense"]}), flush=True)
    text = write(rows)
    for level in args.sparsity:
        for variant in variants:  # one sparse model at a time: each is built dense (8B) before it is made sparse
            t0 = time.time()
            model = to_sparse(args, level, fuse=variant == "sparse_fused")
            print(f"built {variant} at {level:g} in {time.time() - t0:.1f} s", flush=True)
            name = row_name(variant, level, args)
            rows[name] = {"sparsity": level, "kept_fraction": kept_fraction(model), **measure(model, args)}
            print(json.dumps({name: rows[name]}), flush=True)
            text = write(rows)
            del model
            if on_gpu(args.device):
                torch.cuda.empty_cache()
    if len(args.sparsity) > 1:
        plot_against_sparsity(rows, out_dir / f"{stem}_sparsity.png")
    print(text)


def plot_against_sparsity(rows: dict[str, dict], path: Path) -> None:
    """Decode tokens/s (left) and prefill speedup (right) against sparsity, per sparse variant; dense as a line; a
    cross marks a decode timed in another runtime than dense's (its capture failed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = rows["dense"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in sorted({name.split("@")[0] for name in rows} - {"dense"}):
        points = sorted(((r["sparsity"], r) for n, r in rows.items() if n.split("@")[0] == variant), key=lambda p: p[0])
        xs = [100 * x for x, _ in points]
        line = left.plot(xs, [r["decode_tok_s"] for _, r in points], "o-", label=variant)[0]
        off = [(100 * x, r["decode_tok_s"]) for x, r in points if r["decode_runtime"] != dense["decode_runtime"]]
        if off:  # the step's capture failed (the log says why): timed in another runtime than dense's
            left.plot([x for x, _ in off], [y for _, y in off], "x", color=line.get_color(), markersize=12,
                      label=f"{variant}: not from a graph")  # fmt: skip
        right.plot(xs, [dense["prefill_ms"] / r["prefill_ms"] for _, r in points], "o-", label=variant)
    left.axhline(dense["decode_tok_s"], color="gray", linestyle="--", label="dense")
    right.axhline(1.0, color="gray", linestyle="--", label="dense")
    left.set(xlabel="sparsity (% of 64x64 blocks zeroed)", ylabel="greedy decode (tokens/s)")
    right.set(xlabel="sparsity (% of 64x64 blocks zeroed)", ylabel="prefill speedup over dense")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
