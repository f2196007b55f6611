"""Sweep reports: many run directories -> results.csv, results.md, an accuracy-vs-speed plot and validation curves.

    python -m superblock.report multirun/<sweep> [more dirs...] [--out DIR] [--force] [--metric val_top1]

A run directory is any directory holding `summary.json` (see docs/architecture.md), `config.yaml`, or Hydra's
`.hydra/config.yaml`; the last two without a summary are jobs that died or are still running. An optional
`eval.json` (from evaluate.py) in the run directory, or one level below it, supplies the measured speedup.
This package itself needs no torch: reporting only reads files.

Modules: ``runs`` (finding and reading run directories into rows), ``table`` (dense deltas, csv, markdown),
``plot`` (accuracy vs speedup), ``curves`` (each run's validations against its step, from metrics.jsonl),
``writer`` (write_report: all the files), ``cli`` (``main``, run by ``__main__``). Every public name is importable
from ``superblock.report``.
"""

from superblock.report.cli import main
from superblock.report.curves import curve_metric, plot_curves, read_curve
from superblock.report.plot import pareto_front, plot_accuracy_vs_speed
from superblock.report.runs import (
    CONFIG,
    EVAL,
    EVAL_FIELDS,
    METRICS,
    SUMMARY,
    SUMMARY_FIELDS,
    ReportError,
    collect_runs,
    find_run_dirs,
    is_dense,
    parse_block,
    parse_float,
    parse_targets,
    read_run,
    sparsity_fields,
)
from superblock.report.table import (
    CSV_FIELDS,
    accuracy_spec,
    add_deltas,
    dense_baselines,
    fmt_block,
    fmt_duration,
    fmt_num,
    markdown_report,
    markdown_table,
    status_counts,
    write_csv,
)
from superblock.report.writer import OUTPUTS, output_paths, write_report

__all__ = [
    "CONFIG",
    "CSV_FIELDS",
    "EVAL",
    "EVAL_FIELDS",
    "METRICS",
    "OUTPUTS",
    "SUMMARY",
    "SUMMARY_FIELDS",
    "ReportError",
    "accuracy_spec",
    "add_deltas",
    "collect_runs",
    "curve_metric",
    "dense_baselines",
    "find_run_dirs",
    "fmt_block",
    "fmt_duration",
    "fmt_num",
    "is_dense",
    "main",
    "markdown_report",
    "markdown_table",
    "output_paths",
    "pareto_front",
    "parse_block",
    "parse_float",
    "parse_targets",
    "plot_accuracy_vs_speed",
    "plot_curves",
    "read_curve",
    "read_run",
    "sparsity_fields",
    "status_counts",
    "write_csv",
    "write_report",
]
