"""One-shot block masks on a pretrained language model, no training: perplexity per tile shape, sparsity and score.

    python benchmarks/oneshot_lm.py --model pretrained/smollm2-135m-instruct --out $OUT      # CPU: a few minutes
    python benchmarks/oneshot_lm.py --model DIR --levels 0.1,0.3,0.5 --blocks 16,32,64x16 --scores magnitude,activation
    python benchmarks/oneshot_lm.py --model DIR --levels 0.5 --blocks 64x16 --scores activation,activation+refit \
        --calibration 32                   # one-shot pruning with the least-squares refit (sparsity=oneshot)

The model (a transformers folder, e.g. the converted SmolLM2) gets superblock's masks on every q/k/v/o and
gate/up/down projection at each sparsity, with tile scores from the weights' magnitudes (`magnitude`) or from
activation-aware magnitudes (`activation`: sparsity.score_init=activation, calibrated on `--calibration` training
windows of the stdlib corpus), a score with `+refit` also refitting the kept weights to the dense outputs on those
windows (sparsity.reconstruct: `--scores activation+refit`; with `+select` the refit also chooses which tiles to
keep, sparsity.select=output_error), and is evaluated on `--windows` validation windows of
`--seq-len` tokens with its own tokenizer: perplexity per token and per byte. How much a tile shape and a score
destroy before any fine-tune is the starting point the fine-tune has to recover from. Writes oneshot_lm.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superblock import sparsify  # noqa: E402
from superblock.data import build_val_loader  # noqa: E402
from superblock.data.text import text_bundle  # noqa: E402
from superblock.engine.validation import loader_metrics  # noqa: E402
from superblock.sparsity.calibrate import calibrate_scores  # noqa: E402
from superblock.sparsity.reconstruct import reconstruct_weights  # noqa: E402
from superblock.sparsity.targets import LLAMA_PROJECTIONS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a transformers model folder with its tokenizer")
    p.add_argument("--levels", default="0.1,0.3")
    p.add_argument("--blocks", default="16,32,64x16,16x64")
    p.add_argument(
        "--scores", default="magnitude,activation",
        help="magnitude | activation, each optionally +refit (the scores' tiles refit) or +select (the refit chooses "
             "its own tiles: sparsity.select=output_error)",
    )  # fmt: skip
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--windows", type=int, default=16, help="validation windows")
    p.add_argument("--calibration", type=int, default=8, help="training windows that calibrate scores and refits")
    p.add_argument(
        "--level-overrides", default="",
        help="JSON {glob: sparsity} for sparsity.level_overrides, e.g. '{\"*.gate_proj.weight\": 0.1, "
             "\"*.up_proj.weight\": 0.1}'; the others then at --levels (the table gives the zeroed share of all)",
    )  # fmt: skip
    p.add_argument(
        "--level-total", action="store_true",
        help="--levels count all masked weights: the weights without a --level-overrides entry make up what the "
             "overrides leave (sparsity.level_total)",
    )  # fmt: skip
    p.add_argument(
        "--block-overrides", default="",
        help="JSON {glob: tile} for sparsity.block_overrides, e.g. '{\"*.down_proj.weight\": \"16x64\"}': those "
             "weights get that tile, the others --blocks (which dimension should be tall, per layer type)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument(
        "--replot", default="",
        help="earlier runs' oneshot_lm.json files, comma-separated: one table and plot of their rows, nothing measured",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.levels = [float(v) for v in args.levels.split(",") if v]
    args.blocks = [b for b in args.blocks.split(",") if b]
    args.scores = [s for s in args.scores.split(",") if s]
    for score in args.scores:  # before any model is loaded
        if score.partition("+")[2] not in ("", "refit", "select"):
            raise SystemExit(f"--scores {score}: the part after + is refit or select")
    args.level_overrides = json.loads(args.level_overrides) if args.level_overrides else {}
    args.block_overrides = json.loads(args.block_overrides) if args.block_overrides else {}
    return args


def tile(label: str) -> tuple[int, int]:
    rows, _, cols = label.partition("x")
    return int(rows), int(cols or rows)


def load(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        replot([p for p in args.replot.split(",") if p], Path(args.out))
        return
    data = text_bundle(None, seq_len=args.seq_len, tokenizer=args.model, train_size=args.calibration,
                       val_size=args.windows)  # fmt: skip
    device = torch.device(args.device)
    val = build_val_loader(data, batch_size=4)
    calibration = torch.utils.data.DataLoader(data.train, batch_size=4)

    def measured(model) -> dict:
        """Perplexity per token and per byte (validation's own metrics: the windows know their bytes)."""
        m = loader_metrics(model, val, device)
        return {"ppl": m["val_perplexity"], "ppl_byte": m.get("val_perplexity_per_byte", math.nan)}

    targets = [f"*.{name}.weight" for name in LLAMA_PROJECTIONS]

    def forward(model, batch) -> None:
        model(batch[0].to(device))

    rows = [{"score": "dense", "sparsity": 0.0, "block": None, **measured(load(args))}]
    print(rows[0], flush=True)
    for level in args.levels:
        for block in args.blocks:
            for score in args.scores:
                start = time.time()
                model = load(args)
                base, _, refit = score.partition("+")
                report = sparsify(model, sparsity=level, block_size=tile(block), targets=targets, score_init=base,
                                  level_overrides=args.level_overrides, level_total=args.level_total, seed=0,
                                  block_overrides={k: tile(v) for k, v in args.block_overrides.items()})  # fmt: skip
                if base == "activation":
                    calibrate_scores(model, calibration, forward)
                if refit:
                    select = "output_error" if refit == "select" else "scores"
                    print(reconstruct_weights(model, calibration, forward, select=select, progress=True), flush=True)
                zeroed = sum((1 - r.density) * r.shape[0] * r.shape[1] for r in report.rows)
                share = zeroed / sum(r.shape[0] * r.shape[1] for r in report.rows)
                rows.append({"score": score, "sparsity": level, "block": block, "zeroed": share, **measured(model)})
                print(rows[-1], f"{time.time() - start:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oneshot_lm.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    head = f"{args.model}, {args.device}, {time.strftime('%Y-%m-%d')}; {args.windows} windows of {args.seq_len}"
    head += f"; level overrides {args.level_overrides}" if args.level_overrides else ""
    head += " (levels of all masked weights)" if args.level_total and args.level_overrides else ""
    head += f"; tile overrides {args.block_overrides}" if args.block_overrides else ""
    write_report(rows, head, out)


def row_label(r: dict) -> str:
    """A row's name in tables and plots: tile (with its overrides), score, sparsity."""
    if r["block"] is None:
        return "dense"
    block = r["block"] if "x" in r["block"] else f"{r['block']}x{r['block']}"
    tiles = block + "".join(f", {k.strip('*.').split('.')[0]} {v}" for k, v in r.get("overrides", {}).items())
    return f"{tiles} ({r['score']}, {r['sparsity']:.0%})"


def write_report(rows: list[dict], head: str, out: Path) -> None:
    """oneshot_lm.md (the table) and oneshot_lm.png (perplexity per row, log scale, dense marked)."""
    lines = ["| score | sparsity | zeroed (all masked weights) | tile | perplexity / token | per byte |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['score']} | {r['sparsity']:.0%} | {r.get('zeroed', 0.0):.1%} | {row_label(r).split(' (')[0]} | "
              f"{r['ppl']:.4g} | {r['ppl_byte']:.3f} |" for r in rows]  # fmt: skip
    (out / "oneshot_lm.md").write_text(head + "\n\n" + "\n".join(lines) + "\n")
    print("\n" + head + "\n\n" + "\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparse = [r for r in rows if r["block"] is not None]
    labels = [row_label(r) for r in sparse]
    common = {label.rsplit(" (", 1)[1] for label in labels}
    if len(common) == 1:  # one score and sparsity: said once, in the title
        labels = [label.rsplit(" (", 1)[0] for label in labels]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(sparse) + 1.2))
    ax.barh(range(len(sparse)), [r["ppl"] for r in sparse], color="tab:blue")
    ax.set_yticks(range(len(sparse)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    for r in rows:
        if r["block"] is None:
            ax.axvline(r["ppl"], color="k", ls="--", lw=1, label=f"dense {r['ppl']:.3g}")
    ax.set_xlabel("validation perplexity per token (lower is better)")
    ax.legend(fontsize=7)
    ax.set_title(head.split(";")[0] + (f" ({common.pop()[:-1]})" if len(common) == 1 else ""), fontsize=8)
    fig.savefig(out / "oneshot_lm.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def replot(paths: list[str], out: Path) -> None:
    """One table and plot of earlier runs' rows (one dense row: they must share model and windows)."""
    rows, heads = [], []
    for path in paths:
        saved = json.loads(Path(path).read_text())
        overrides = saved["args"].get("block_overrides") or {}
        for r in saved["rows"]:
            if r["block"] is None and any(q["block"] is None for q in rows):
                continue
            rows.append({**r, "overrides": overrides} if r["block"] is not None and overrides else r)
        a = saved["args"]
        heads.append(f"{Path(a['model']).name}, {a['device']}; {a['windows']} windows of {a['seq_len']}")
    out.mkdir(parents=True, exist_ok=True)
    write_report(rows, heads[0] + f"; rows of {len(paths)} runs", out)


if __name__ == "__main__":
    main()
