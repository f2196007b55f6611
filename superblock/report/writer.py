"""write_report: report rows -> results.csv, results.md, accuracy_vs_speedup.png and val_curves.png in one directory.

No torch: reporting only reads files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from superblock.report.curves import plot_curves
from superblock.report.plot import plot_accuracy_vs_speed
from superblock.report.runs import METRICS, ReportError
from superblock.report.table import _models, add_deltas, markdown_report, write_csv

log = logging.getLogger(__name__)

OUTPUTS = {"csv": "results.csv", "md": "results.md", "plot": "accuracy_vs_speedup.png", "curves": "val_curves.png"}


def output_paths(out_dir: str | Path) -> dict[str, Path]:
    return {key: Path(out_dir) / name for key, name in OUTPUTS.items()}


def write_report(rows: Sequence[dict], out_dir: str | Path, force: bool = False, metric: str = "val_top1") -> dict:
    """Write results.csv, results.md, accuracy_vs_speedup.png and, where any run logged a validation, val_curves.png
    into `out_dir`; returns {"csv"|"md"|"plot"|"curves": path} (no "curves" when none was drawn). Raises ReportError
    when there are no rows, or when an output exists and `force` is False."""
    if not rows:
        raise ReportError("no runs to report")
    if metric not in METRICS:
        raise ReportError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    paths = output_paths(out_dir)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise ReportError(f"{', '.join(existing)} already exist(s): pass --force to overwrite, or --out DIR")
    models = _models(rows)
    if len(models) > 1:
        log.warning(
            "runs of %d models mixed (%s): deltas are per model, the plot has one panel per model",
            len(models),
            ", ".join(models),
        )
    rows = [dict(row) for row in rows]
    baselines = add_deltas(rows, metric)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_csv(rows, paths["csv"], metric)
    plot_accuracy_vs_speed(rows, paths["plot"], metric)
    paths["curves"].unlink(missing_ok=True)  # --force: no stale curves beside a report that has none
    curves = plot_curves(rows, paths["curves"], metric)
    if curves is None:
        del paths["curves"]
    curves_name = curves.name if curves else None
    paths["md"].write_text(markdown_report(rows, baselines, metric, paths["plot"].name, curves_name))
    return paths
