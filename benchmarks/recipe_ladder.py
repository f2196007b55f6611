"""What each step of a fine-tune recipe buys: validation perplexity of a pretrained model pruned by successive
recipes, one panel per sparsity level, beside the dense fine-tune and the target, from one CSV.

    python benchmarks/recipe_ladder.py docs/data/smollm2_ladder_h100.csv \
        --within 0.5=0.10,0.7=0.25 --out docs/images/smollm2_ladder.png

The CSV has a row per (level, recipe): level, recipe, perplexity, std (empty for one seed), seeds, per_byte, steps,
source. Rows at level 0 are the dense references; the one whose recipe starts with "dense fine-tune" sets the
targets: at each level L of `--within L=F`, dense x (1 + F). Rows keep their file order (the order the recipe's
steps were added); a row trained for fewer steps than the dense reference is labelled with its step count.
Prints the Markdown table and writes the plot (log-scale perplexity: the steps span 20x).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

DENSE = "dense fine-tune"


def read_rows(path: Path) -> list[dict]:
    """The CSV's rows with numbers parsed (std None for one seed)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    out = []
    for r in rows:
        try:
            out.append({
                "level": float(r["level"]), "recipe": r["recipe"], "perplexity": float(r["perplexity"]),
                "std": float(r["std"]) if r["std"] else None, "seeds": int(r["seeds"]),
                "per_byte": float(r["per_byte"]), "steps": int(r["steps"]), "source": r.get("source", ""),
            })  # fmt: skip
        except (KeyError, ValueError) as e:
            raise SystemExit(f"{path}: row {r} is not level,recipe,perplexity,std,seeds,per_byte,steps: {e}") from e
    return out


def dense_reference(rows: list[dict]) -> dict:
    """The dense fine-tune row the targets are measured against."""
    dense = [r for r in rows if r["level"] == 0.0 and r["recipe"].startswith(DENSE)]
    if not dense:
        raise SystemExit(f"no level-0 row whose recipe starts with {DENSE!r}: the targets need one")
    return dense[0]


def parse_within(spec: str) -> dict[float, float]:
    """'0.5=0.10,0.7=0.25' -> {0.5: 0.10, 0.7: 0.25}."""
    out = {}
    for part in filter(None, spec.split(",")):
        level, sep, frac = part.partition("=")
        if not sep:
            raise SystemExit(f"--within takes LEVEL=FRACTION pairs, got {part!r}")
        out[float(level)] = float(frac)
    return out


def targets(dense: dict, within: dict[float, float]) -> dict[float, float]:
    """level -> the perplexity a sparse row must reach: dense x (1 + F) for each LEVEL=F of --within."""
    return {level: dense["perplexity"] * (1.0 + frac) for level, frac in within.items()}


def label(row: dict, dense_steps: int) -> str:
    short = f" ({row['steps']} steps)" if row["steps"] and row["steps"] < dense_steps else ""
    return row["recipe"] + short


def table(rows: list[dict], dense: dict, goal: dict[float, float]) -> str:
    lines = [
        "| level | recipe | seeds | perplexity / token | per byte | vs the dense fine-tune | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = f"{r['perplexity']:.2f}" + (f" +- {r['std']:.2g}" if r["std"] is not None else "")
        gap = f"{100.0 * (r['perplexity'] / dense['perplexity'] - 1.0):+.0f}%"
        target = f"<= {goal[r['level']]:.2f}" if r["level"] in goal else "-"
        lines.append(
            f"| {r['level']:.0%} | {label(r, dense['steps'])} | {r['seeds']} | {ppl} | {r['per_byte']:.3f} | "
            f"{gap} | {target} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], dense: dict, goal: dict[float, float], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({r["level"] for r in rows if r["level"] > 0.0})
    if not levels:
        raise SystemExit("no sparse rows (level > 0) to draw")
    heights = [sum(r["level"] == lv for r in rows) for lv in levels]
    fig, axes = plt.subplots(
        len(levels), 1, figsize=(9.0, 1.0 + 0.5 * sum(heights) + 0.9 * len(levels)), squeeze=False, sharex=True,
        gridspec_kw={"height_ratios": heights},
    )  # fmt: skip
    for ax, level in zip(axes[:, 0], levels, strict=True):
        mine = [r for r in rows if r["level"] == level]
        ys = list(range(len(mine)))[::-1]
        ax.barh(ys, [r["perplexity"] for r in mine], color="tab:blue", alpha=0.8)
        for y, r in zip(ys, mine, strict=True):
            if r["std"]:
                ax.errorbar(r["perplexity"], y, xerr=r["std"], color="black", capsize=3)
            ax.text(r["perplexity"] * 1.04, y, f"{r['perplexity']:.1f}", va="center", fontsize=8)
        ax.set_yticks(ys, [label(r, dense["steps"]) for r in mine], fontsize=8)
        ax.axvline(dense["perplexity"], color="black", lw=1.2, label=f"dense fine-tune {dense['perplexity']:.2f}")
        if level in goal:
            ax.axvline(goal[level], color="tab:green", ls="--", lw=1.2, label=f"target {goal[level]:.2f}")
        ax.set_xscale("log")
        ax.set_xlabel("validation perplexity per token (log scale; lower is better)")
        ax.set_title(f"{level:.0%} of the masked weights zeroed", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    axes[0, 0].set_xlim(dense["perplexity"] * 0.8, max(r["perplexity"] for r in rows) * 1.6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path, help="level,recipe,perplexity,std,seeds,per_byte,steps,source rows")
    p.add_argument("--within", default="", help="LEVEL=FRACTION targets over the dense fine-tune, comma separated")
    p.add_argument("--out", type=Path, default=Path("recipe_ladder.png"), help="the plot")
    p.add_argument("--title", default="each step of the recipe, same data and length (600 steps unless said)")
    args = p.parse_args(argv)
    rows = read_rows(args.csv)
    dense = dense_reference(rows)
    goal = targets(dense, parse_within(args.within))
    plot(rows, dense, goal, args.out, args.title)
    print(table(rows, dense, goal))


if __name__ == "__main__":
    main()
