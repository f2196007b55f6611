"""One-shot block masks on a pretrained language model, no training: perplexity per tile shape, sparsity and score.

    python benchmarks/oneshot_lm.py --model pretrained/smollm2-135m-instruct --out $OUT      # CPU: a few minutes
    python benchmarks/oneshot_lm.py --model DIR --levels 0.1,0.3,0.5 --blocks 16,32,64x16 --scores magnitude,activation
    python benchmarks/oneshot_lm.py --model DIR --levels 0.5 --blocks 64x16 --scores activation,activation+refit \
        --calibration 32                   # one-shot pruning with the least-squares refit (sparsity=oneshot)

The model (a transformers folder, e.g. the converted SmolLM2) gets superblock's masks on every q/k/v/o and
gate/up/down projection at each sparsity, with tile scores from the weights' magnitudes (`magnitude`) or from
activation-aware magnitudes (`activation`: sparsity.score_init=activation, calibrated on `--calibration` training
windows of the stdlib corpus), a score with `+refit` also refitting the kept weights to the dense outputs on those
windows (sparsity.reconstruct: `--scores activation+refit`), and is evaluated on `--windows` validation windows of
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

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a transformers model folder with its tokenizer")
    p.add_argument("--levels", default="0.1,0.3")
    p.add_argument("--blocks", default="16,32,64x16,16x64")
    p.add_argument("--scores", default="magnitude,activation", help="magnitude | activation, each optionally +refit")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--windows", type=int, default=16, help="validation windows")
    p.add_argument("--calibration", type=int, default=8, help="training windows that calibrate scores and refits")
    p.add_argument(
        "--level-overrides", default="",
        help="JSON {glob: sparsity} for sparsity.level_overrides, e.g. '{\"*.gate_proj.weight\": 0.1, "
             "\"*.up_proj.weight\": 0.1}'; the others then at --levels (the table gives the zeroed share of all)",
    )  # fmt: skip
    p.add_argument(
        "--block-overrides", default="",
        help="JSON {glob: tile} for sparsity.block_overrides, e.g. '{\"*.down_proj.weight\": \"16x64\"}': those "
             "weights get that tile, the others --blocks (which dimension should be tall, per layer type)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    args.levels = [float(v) for v in args.levels.split(",") if v]
    args.blocks = [b for b in args.blocks.split(",") if b]
    args.scores = [s for s in args.scores.split(",") if s]
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
    data = text_bundle(None, seq_len=args.seq_len, tokenizer=args.model, train_size=args.calibration,
                       val_size=args.windows)  # fmt: skip
    device = torch.device(args.device)
    val = build_val_loader(data, batch_size=4)
    calibration = torch.utils.data.DataLoader(data.train, batch_size=4)

    def measured(model) -> dict:
        """Perplexity per token and per byte (validation's own metrics: the windows know their bytes)."""
        m = loader_metrics(model, val, device)
        return {"ppl": m["val_perplexity"], "ppl_byte": m.get("val_perplexity_per_byte", math.nan)}

    targets = [f"*.{name}.weight" for name in PROJECTIONS]

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
                                  level_overrides=args.level_overrides, seed=0,
                                  block_overrides={k: tile(v) for k, v in args.block_overrides.items()})  # fmt: skip
                if base == "activation":
                    calibrate_scores(model, calibration, forward)
                if refit:
                    print(reconstruct_weights(model, calibration, forward), flush=True)
                zeroed = sum((1 - r.density) * r.shape[0] * r.shape[1] for r in report.rows)
                share = zeroed / sum(r.shape[0] * r.shape[1] for r in report.rows)
                rows.append({"score": score, "sparsity": level, "block": block, "zeroed": share, **measured(model)})
                print(rows[-1], f"{time.time() - start:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oneshot_lm.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = ["| score | sparsity | zeroed (all masked weights) | tile | perplexity / token | per byte |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['score']} | {r['sparsity']:.0%} | {r.get('zeroed', 0.0):.1%} | {r['block'] or '-'} | "
              f"{r['ppl']:.4g} | {r['ppl_byte']:.3f} |" for r in rows]  # fmt: skip
    head = f"{args.model}, {args.device}, {time.strftime('%Y-%m-%d')}; {args.windows} windows of {args.seq_len}"
    head += f"; level overrides {args.level_overrides}" if args.level_overrides else ""
    head += f"; tile overrides {args.block_overrides}\n\n" if args.block_overrides else "\n\n"
    (out / "oneshot_lm.md").write_text(head + "\n".join(lines) + "\n")
    print("\n" + head + "\n".join(lines))


if __name__ == "__main__":
    main()
