"""The tile-shape frontier: each tile's accuracy gap (benchmarks/accuracy.py grids) beside its per-layer speed
(benchmarks/bsr_linear.py rows), as one table and one plot, so a shape is picked on both at once.

    python benchmarks/shape_frontier.py --speed docs/data/tile_shapes_h100_2026-12-05.csv --level 0.9 \
        --recipe magnitude_frozen \
        "digits 16 px=docs/data/shapes_digits16_cpu_2026-12-05.csv,docs/data/shapes_digits16_large_cpu_2026-12-05.csv" \
        "digits_wide=docs/data/shapes_digits_wide90_cpu_2026-12-05.csv" --out docs/images/shape_frontier.png

Accuracy: each grid's results.json (summary rows of recipe, permute, sparsity, block, gap, gap_std, seeds) or its
runs.csv files (one row per run, summarized again; comma-separated for grids that share dense runs); the rows at
`--level` of `--recipe` without a permutation. Speed: a bsr_linear.py CSV (layer, block, sparsity, ours_x): per layer
at `--level`, and their geometric mean, also as a share of the largest square tile's (the speed a tile of that shape
gives up). The plot: one panel per grid, gap to dense (points, seeds' spread as error bars) against the mean
per-layer speedup, one marker per tile (circle square, triangle up tall, triangle down wide), labelled. `--served`
adds the whole model served (benchmarks/vit_e2e.py rows: the best dense runtime's time over the best sparse
runtime's, per batch size).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import _block_order, block_label, block_shape, summarize, tile_kind  # noqa: E402

MARKERS = {"square": "o", "tall": "^", "wide": "v"}


def read_summary(path: Path | str) -> list[dict]:
    """An accuracy grid's summary rows: its results.json, or its per-run CSVs (runs.csv; several, comma-separated,
    for grids that share their dense runs: a run named twice counts once) summarized again."""
    paths = [Path(x) for x in str(path).split(",") if x]
    if len(paths) == 1 and paths[0].suffix != ".csv":
        return json.loads(paths[0].read_text())["rows"]
    if any(x.suffix != ".csv" for x in paths):
        raise SystemExit(f"{path}: several grids are read from their runs.csv files only")
    runs: dict[str, dict] = {}
    for one in paths:
        with open(one, newline="") as f:
            for r in csv.DictReader(f):
                runs[r["name"]] = {
                    "recipe": r["recipe"], "permute": r.get("permute") or "none", "level": float(r["level"]),
                    "block": r["block"] or None, "seed": int(r["seed"]),
                    "epochs": int(r["epochs"]) if r.get("epochs") else None,
                    "value": float(r["value"]) if r.get("value") and r.get("status", "ok") == "ok" else None,
                }  # fmt: skip
    return summarize(list(runs.values()))


def load_gaps(path: Path | str, level: float, recipe: str) -> dict[str, tuple[float, float, int]]:
    """tile label -> (gap, its std across seeds, seeds) of one accuracy grid at `level`, `recipe`, no permutation."""
    rows = read_summary(path)
    out: dict[str, tuple[float, float, int]] = {}
    for r in rows:
        if r["recipe"] != recipe or r.get("permute", "none") != "none" or r["block"] is None:
            continue
        if math.isclose(float(r["sparsity"]), level):
            out[block_label(r["block"])] = (float(r["gap"]), float(r["gap_std"]), int(r["seeds"]))
    return out


def load_speed(path: Path, level: float, dtype: str = "bf16") -> dict[str, dict[str, float]]:
    """tile label -> {layer: speedup over dense} at `level` from a bsr_linear.py CSV: its `dtype` rows (mode column)
    at the largest batch it measured."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("ours_x") and r.get("mode", dtype) == dtype]
    rows = [r for r in rows if math.isclose(float(r["sparsity"]), level)]
    top = max((int(r["batch"]) for r in rows if r.get("batch")), default=None)
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        if top is None or not row.get("batch") or int(row["batch"]) == top:
            out.setdefault(block_label(row["block"]), {})[row["layer"]] = float(row["ours_x"])
    return out


def load_served(paths: list[Path], level: float, dtype: str = "bf16") -> dict[str, dict[int, float]]:
    """tile label -> {batch: the best dense runtime's time / the best sparse runtime's time} from
    benchmarks/vit_e2e.py rows (.jsonl) at `level` and `dtype`: the whole model served, each side in its fastest
    runtime."""
    best: dict[tuple[str, int], list[float]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line) if line.strip() else None
            if not row or row.get("block") is None or row.get("dtype", dtype) != dtype:
                continue
            if not math.isclose(float(row.get("sparsity", level)), level):
                continue
            key = (block_label(row["block"]), int(row["batch"]))
            dense, sparse = best.setdefault(key, [math.inf, math.inf])
            best[key] = [min(dense, float(row["dense_ms"])), min(sparse, float(row["sparse_ms"]))]
    out: dict[str, dict[int, float]] = {}
    for (tile, batch), (dense, sparse) in best.items():
        out.setdefault(tile, {})[batch] = dense / sparse
    return out


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def table(grids: list[tuple[str, dict]], speed: dict[str, dict[str, float]], served: dict | None = None) -> str:
    """Markdown: tile, area, each grid's gap, each layer's speedup, the mean's share of the largest square's and,
    with `served` (load_served), the whole model's speedup per batch size."""
    served = served or {}
    batches = sorted({b for per in served.values() for b in per})
    tiles = sorted({t for _, g in grids for t in g} | set(speed), key=_block_order)
    layers = sorted({layer for s in speed.values() for layer in s})
    squares = [t for t in speed if tile_kind(t) == "square"]
    top = max(squares, key=_block_order) if squares else None
    head = ["tile (rows x cols)", "area", *(f"{label}: gap" for label, _ in grids), *layers, "mean speedup"]
    head += [f"of {top} x {top}'s"] if top else []
    head += [f"served, batch {b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for t in tiles:
        rows, cols = block_shape(t)
        cells = [f"{rows} x {cols} ({tile_kind(t)})", str(rows * cols)]
        cells += [f"{g[t][0]:+.2f} +- {g[t][1]:.2f}" if t in g else "-" for _, g in grids]
        per_layer = speed.get(t, {})
        cells += [f"{per_layer[layer]:.2f}x" if layer in per_layer else "-" for layer in layers]
        mean = geomean(per_layer.values())
        cells.append(f"{mean:.2f}x" if per_layer else "-")
        if top:
            cells.append(f"{mean / geomean(speed[top].values()):.2f}" if per_layer else "-")
        cells += [f"{served[t][b]:.2f}x" if b in served.get(t, {}) else "-" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(grids: list[tuple[str, dict]], speed: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = sorted({t for _, g in grids for t in g}, key=_block_order)
    colors = {t: f"C{i % 10}" for i, t in enumerate(tiles)}  # one colour per tile in every panel
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 4.0), squeeze=False)
    for ax, (label, gaps) in zip(axes[0], grids, strict=True):
        for t, (gap, std, _) in sorted(gaps.items(), key=lambda kv: _block_order(kv[0])):
            if t not in speed:
                continue
            x = geomean(speed[t].values())
            ax.errorbar(x, gap, yerr=std, fmt=MARKERS[tile_kind(t)], capsize=3, ms=7, color=colors[t])
            ax.annotate(t, (x, gap), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.axhline(0.0, color="black", lw=1)
        ax.set_xlabel("per-layer speedup over dense (geometric mean)")
        ax.set_ylabel("gap to dense (points; below 0: worse)")
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _grid(spec: str, level: float, recipe: str) -> tuple[str, dict]:
    label, _, path = spec.rpartition("=")
    if not label:
        raise SystemExit(f"give each grid as LABEL=results.json or LABEL=runs.csv[,runs.csv], got {spec!r}")
    gaps = load_gaps(path, level, recipe)
    if not gaps:
        raise SystemExit(f"{path}: no rows of recipe {recipe!r} at sparsity {level} without a permutation")
    return label, gaps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grids", nargs="+", help="LABEL=path/to/results.json (benchmarks/accuracy.py)")
    p.add_argument("--speed", required=True, help="a benchmarks/bsr_linear.py CSV (layer, block, sparsity, ours_x)")
    p.add_argument("--level", type=float, default=0.9, help="the sparsity of both sides (default 0.9)")
    p.add_argument("--recipe", default="magnitude_frozen", help="the accuracy grids' recipe (default magnitude_frozen)")
    p.add_argument("--served", default="", help="benchmarks/vit_e2e.py .jsonl rows, comma-separated (whole model)")
    p.add_argument("--out", default="shape_frontier.png", help="the plot")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    grids = [_grid(spec, args.level, args.recipe) for spec in args.grids]
    speed = load_speed(Path(args.speed), args.level)
    if not speed:
        raise SystemExit(f"{args.speed}: no speed rows at sparsity {args.level}")
    title = args.title or f"tile shapes at {args.level:.0%}: accuracy ({args.recipe}) against per-layer speed"
    plot(grids, speed, Path(args.out), title)
    served = load_served([Path(x) for x in args.served.split(",") if x], args.level)
    print(table(grids, speed, served))


if __name__ == "__main__":
    main()
