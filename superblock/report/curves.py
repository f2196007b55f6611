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

from superblock.report.plot import panels_by_model
from superblock.report.runs import _natural_key, is_dense, parse_float
from superblock.report.table import fmt_block, fmt_num
from superblock.rundir import METRICS

PERPLEXITY = "val_perplexity"


def curve_metric(metric: str) -> str:
    """The per-validation key behind a report metric: best_val_top1 and ema_val_top1 are read from val_top1's
    validations (the best is a summary of the curve; the EMA is validated under its own key only when it exists)."""
    return "val_" + metric.removeprefix("best_").removeprefix("ema_").removeprefix("val_")


def read_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric key of the run's metrics.jsonl: its (step, value) points in step order, the file read once; a
    line that does not parse (a run killed mid-write) is skipped, a missing file gives {}."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return {}
    points: dict[str, dict[int, float]] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = entry.get("step") if isinstance(entry, dict) else None
        if not isinstance(step, int):
            continue
        for key, raw in entry.items():
            value = parse_float(raw)
            if value is not None and math.isfinite(value):
                points.setdefault(key, {})[step] = value  # a resumed run validates a step again: the later stands
    return {key: sorted(by_step.items()) for key, by_step in points.items()}


def read_curve(run_dir: str | Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every line of the run's metrics.jsonl that holds `key`, in step order (read_curves)."""
    return read_curves(run_dir).get(key, [])


def _label(row: dict) -> str:
    if is_dense(row):
        return f"{row['run']} (dense)"
    return f"{row['run']} (b{fmt_block(row['block_size'])} s{fmt_num(row['sparsity'], 'g')})"


def _draw_panel(ax: Any, rows: Sequence[dict], model: str, metric: str) -> int:
    """The curves of one model's runs; returns how many runs had one."""
    runs = sorted(rows, key=lambda r: (not is_dense(r), _natural_key(r["run"])))
    curves = [read_curves(row["run_dir"]) for row in runs]
    lm = any(row.get(PERPLEXITY) is not None or PERPLEXITY in c for row, c in zip(runs, curves, strict=True))
    key = PERPLEXITY if lm else curve_metric(metric)  # a run killed before its summary has only its curve
    drawn = 0
    for row, c in zip(runs, curves, strict=True):
        if not c.get(key):
            continue
        dense = is_dense(row)
        ax.plot(*zip(*c[key], strict=True), marker="o", ms=3, lw=2.0 if dense else 1.2,
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
    fig, drawn = panels_by_model(rows, lambda ax, mine, model: _draw_panel(ax, mine, model, metric))
    if not sum(drawn):
        return None
    fig.savefig(path, dpi=120)
    return path
