"""The accuracy-vs-speedup plot (matplotlib's Agg renderer, no pyplot), one panel per model.

No torch: reporting only reads files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from superblock.report.runs import _natural_key, is_dense, parse_float
from superblock.report.table import _models, fmt_block, fmt_num

T = TypeVar("T")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both x and y (both maximised), in increasing x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front[::-1]


def _plot_points(rows: Sequence[dict], metric: str) -> tuple[list[tuple[dict, float, float]], bool]:
    """(row, x, y) for completed runs with a metric; x = speedup if any run measured one (dense = 1x), else density.
    Returns whether x is a speedup."""
    done = [row for row in rows if row["status"] == "completed" and parse_float(row.get(metric)) is not None]
    by_speed = any(row["speedup"] is not None for row in done)
    points = []
    for row in done:
        if by_speed:
            x = row["speedup"] if row["speedup"] is not None else (1.0 if is_dense(row) else None)
        else:
            x = 1.0 - row["sparsity"] if row["sparsity"] is not None else None
        if x is not None:
            points.append((row, float(x), float(row[metric])))
    return points, by_speed


def _draw_panel(ax: Any, rows: Sequence[dict], model: str, metric: str) -> None:
    points, by_speed = _plot_points(rows, metric)
    if not points:
        ax.text(0.5, 0.5, "no completed runs with a result", ha="center", va="center", transform=ax.transAxes)
    sign = 1.0 if by_speed else -1.0  # lower density is the cheaper direction: flip it for the front
    front = pareto_front([(sign * x, y) for _, x, y in points])
    if len(front) > 1:
        ax.step(
            [points[i][1] for i in front],
            [points[i][2] for i in front],
            where="pre",
            color="0.5",
            lw=1.2,
            zorder=1,
            label="Pareto front",
        )
    blocks = sorted({fmt_block(r["block_size"]) for r, _, _ in points if not is_dense(r)}, key=_natural_key)
    colors = {b: f"C{i % 10}" for i, b in enumerate(blocks)}
    for block in blocks:
        mine = [(r, x, y) for r, x, y in points if not is_dense(r) and fmt_block(r["block_size"]) == block]
        ax.scatter(
            [x for _, x, _ in mine],
            [y for _, _, y in mine],
            color=colors[block],
            zorder=3,
            label=f"block {block or '?'}",
        )
    for row, x, y in points:
        text = "dense" if is_dense(row) else f"b{fmt_block(row['block_size'])} s{fmt_num(row['sparsity'], 'g')}"
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for row, x, y in (p for p in points if is_dense(p[0])):
        ax.scatter([x], [y], marker="*", s=120, color="black", zorder=4)
        ax.axhline(y, color="black", ls="--", lw=0.8, zorder=0, label=f"dense ({row['run']})")
    _label_axes(ax, _title(model, [r for r, _, _ in points], by_speed), metric, by_speed, len(rows) - len(points))


def _title(model: str, rows: Sequence[dict], by_speed: bool) -> str:
    where = sorted({f"{r['device'] or '?'} {r['dtype'] or '?'}" for r in rows if r["speedup"] is not None})
    return f"{model}: speed measured on {', '.join(where)}" if by_speed else model


def _label_axes(ax: Any, title: str, metric: str, by_speed: bool, left_out: int) -> None:
    if by_speed:
        ax.set_xlabel("measured speedup vs dense (x)")
    else:
        ax.set_xlabel("density = 1 - sparsity  (sparser →)")
        ax.invert_xaxis()  # so that "cheaper" is to the right in both kinds of plot
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if left_out:
        ax.text(
            0.01,
            0.01,
            f"{left_out} run(s) not shown (not completed or not measured)",
            fontsize=7,
            transform=ax.transAxes,
        )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def panels_by_model(rows: Sequence[dict], draw: Callable[[Any, list[dict], str], T]) -> tuple[Any, list[T]]:
    """A figure with one panel per model (up to 3 a row; Agg renderer, no pyplot: no global backend, no GUI, safe
    in threads and on servers) and what draw(ax, that model's rows, model) returned for each."""
    from matplotlib.figure import Figure

    models = _models(rows) or ["unknown"]
    cols = min(len(models), 3)
    nrows = math.ceil(len(models) / cols)
    fig = Figure(figsize=(6.4 * cols, 4.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    drawn = [draw(ax, [r for r in rows if (r["model"] or "unknown") == model], model)
             for ax, model in zip(axes, models, strict=False)]  # fmt: skip
    for ax in axes[len(models) :]:
        ax.set_visible(False)
    return fig, drawn


def plot_accuracy_vs_speed(rows: Sequence[dict], path: Path, metric: str = "val_top1") -> Path:
    """One panel per model (a single panel in the usual one-model sweep), saved as PNG with the Agg renderer."""
    fig, _ = panels_by_model(rows, lambda ax, mine, model: _draw_panel(ax, mine, model, metric))
    fig.savefig(path, dpi=120)
    return path
