"""Validation curves: each run's validation metric against its optimizer step, from its metrics.jsonl, one panel per
model (matplotlib's Agg renderer, no pyplot). A language model's panel draws perplexity (log scale, lower is better),
any other the report's top-1 / top-5 metric.

No torch: reporting only reads files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from superblock.report.runs import _natural_key, is_dense, parse_float
from superblock.report.table import _models, fmt_block, fmt_num

METRICS_FILE = "metrics.jsonl"
PERPLEXITY = "val_perplexity"


def curve_metric(metric: str) -> str:
    """The per-validation key behind a report metric: best_val_top1 and ema_val_top1 are read from val_top1's
    validations (the best is a summary of the curve; the EMA is validated under its own key only when it exists)."""
    return "val_" + metric.removeprefix("best_").removeprefix("ema_").removeprefix("val_")


def read_curve(run_dir: str | Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every validation line of the run's metrics.jsonl that holds `key`, in step order; a line
    that does not parse (a run killed mid-write) is skipped, a missing file gives []."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    points = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        value = parse_float(entry.get(key)) if isinstance(entry, dict) else None
        step = entry.get("step") if isinstance(entry, dict) else None
        if value is not None and math.isfinite(value) and isinstance(step, int):
            points[step] = value  # a resumed run validates a step again: the later line stands
    return sorted(points.items())


def _label(row: dict) -> str:
    if is_dense(row):
        return f"{row['run']} (dense)"
    return f"{row['run']} (b{fmt_block(row['block_size'])} s{fmt_num(row['sparsity'], 'g')})"


def _draw_panel(ax: Any, rows: Sequence[dict], model: str, metric: str) -> int:
    """The curves of one model's runs; returns how many runs had one."""
    lm = any(row.get(PERPLEXITY) is not None or read_curve(row["run_dir"], PERPLEXITY) for row in rows)
    key = PERPLEXITY if lm else curve_metric(metric)  # a run killed before its summary has only its curve
    drawn = 0
    for row in sorted(rows, key=lambda r: (not is_dense(r), _natural_key(r["run"]))):
        points = read_curve(row["run_dir"], key)
        if not points:
            continue
        dense = is_dense(row)
        ax.plot(*zip(*points, strict=True), marker="o", ms=3, lw=2.0 if dense else 1.2,
                color="black" if dense else None, label=_label(row))  # fmt: skip
        drawn += 1
    if key == PERPLEXITY and drawn:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 8, 9, 10 rather than 8 x 10^0
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key + (" (lower is better)" if key == PERPLEXITY else ""))
    ax.set_title(model)
    ax.grid(alpha=0.3, which="both")
    if drawn:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no validation in any run's metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    return drawn


def plot_curves(rows: Sequence[dict], path: Path, metric: str = "val_top1") -> Path | None:
    """One panel per model, saved as PNG; None (nothing written) when no run has a validation line."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, safe in threads and on servers

    models = _models(rows) or ["unknown"]
    cols = min(len(models), 3)
    nrows = math.ceil(len(models) / cols)
    fig = Figure(figsize=(6.4 * cols, 4.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    drawn = 0
    for ax, model in zip(axes, models, strict=False):
        drawn += _draw_panel(ax, [r for r in rows if (r["model"] or "unknown") == model], model, metric)
    for ax in axes[len(models) :]:
        ax.set_visible(False)
    if not drawn:
        return None
    fig.savefig(path, dpi=120)
    return path
