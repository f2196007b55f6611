"""Recipes side by side over several grids: each recipe's gap to dense on each set, from benchmarks/accuracy.py's
results.json files, as one table and one bar plot (the decision of the default recipe needs every set at once).

    python benchmarks/compare_recipes.py "digits 16 px (90%, b16)=docs/frontier/digits16/results.json" \
        "lm_tiny (70%, b32)=docs/frontier/lm_tiny/results.json#32" --out docs/images/recipes.png
    # one tile at one sparsity of a grid of several levels: #BLOCK@LEVEL
    python benchmarks/compare_recipes.py "80%, 64 x 16=<grid>/results.json#64x16@0.8" \
        "90%, 64 x 16=<grid>/results.json#64x16@0.9" --out <plot>

A gap is shown in percent of the dense value, signed so that below zero is worse than dense for every metric
(accuracy: sparse - dense; perplexity: dense - sparse), with the seeds' spread of the gap as the error bar.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def relative_gaps(
    results: dict, block: str | None = None, level: float | None = None
) -> dict[str, tuple[float, float, int]]:
    """recipe -> (gap %, its std %, seeds) of one grid's sparse rows at `block` and sparsity `level` (each None: any;
    a recipe's first such row)."""
    rows = results["rows"]
    dense = next(r for r in rows if r["recipe"] == "dense")["mean"]
    lower_is_better = "perplexity" in results["runs"][0]["metric"]
    sign = -1.0 if lower_is_better else 1.0
    out: dict[str, tuple[float, float, int]] = {}
    for r in rows:
        wanted = block in (None, r["block"]) and level in (None, r.get("sparsity"))
        if r["recipe"] != "dense" and r["recipe"] not in out and wanted:
            out[r["recipe"]] = (sign * 100.0 * r["gap"] / dense, 100.0 * r["gap_std"] / dense, r["seeds"])
    return out


def load(spec: str) -> tuple[str, dict[str, tuple[float, float, int]]]:
    """LABEL=path/results.json, or LABEL=path/results.json#BLOCK for one tile of a grid of several, or
    #BLOCK@LEVEL for that tile at one sparsity."""
    label, _, path = spec.rpartition("=")
    if not label:
        raise SystemExit(f"give each grid as LABEL=results.json[#BLOCK[@LEVEL]], got {spec!r}")
    path, _, where = path.partition("#")
    block, _, level = where.partition("@")
    try:
        at = float(level) if level else None
    except ValueError:
        raise SystemExit(f"a level is a number (e.g. #64x16@0.9), got {level!r} in {spec!r}") from None
    return label, relative_gaps(json.loads(Path(path).read_text()), block or None, at)


def table(grids: list[tuple[str, dict]]) -> str:
    recipes = sorted({r for _, g in grids for r in g})
    lines = ["| recipe | " + " | ".join(label for label, _ in grids) + " |", "|---" * (len(grids) + 1) + "|"]
    for rec in recipes:
        cells = [f"{g[rec][0]:+.2f} +- {g[rec][1]:.2f} %" if rec in g else "-" for _, g in grids]
        lines.append(f"| {rec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(grids: list[tuple[str, dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = sorted({r for _, g in grids for r in g})
    width = 0.8 / max(len(recipes), 1)
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(grids), 4.2))
    for i, rec in enumerate(recipes):
        xs = [j + (i - (len(recipes) - 1) / 2) * width for j, (_, g) in enumerate(grids) if rec in g]
        ys = [g[rec][0] for _, g in grids if rec in g]
        es = [g[rec][1] for _, g in grids if rec in g]
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=rec)
    ax.axhline(0.0, color="black", lw=1)
    ax.set_xticks(range(len(grids)), [label for label, _ in grids], fontsize=8)
    ax.set_ylabel("gap to dense, % of dense (below 0: worse)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grids", nargs="+", help="LABEL=path/to/results.json")
    p.add_argument("--out", default="recipes.png", help="the plot")
    p.add_argument("--title", default="sparse recipes against dense, same data and length, 3 seeds")
    args = p.parse_args(argv)
    grids = [load(spec) for spec in args.grids]
    plot(grids, Path(args.out), args.title)
    print(table(grids))


if __name__ == "__main__":
    main()
