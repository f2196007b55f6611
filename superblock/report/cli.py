"""The command line: ``python -m superblock.report <dirs> [--out DIR] [--force] [--metric val_top1]``.

No torch: reporting only reads files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from superblock.report.runs import METRICS, ReportError, collect_runs
from superblock.report.table import status_counts
from superblock.report.writer import write_report


def _default_out(paths: Sequence[str]) -> Path:
    return Path(paths[0]) if len(paths) == 1 else Path(os.path.commonpath([os.path.abspath(p) for p in paths]))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m superblock.report",
        description="Collect sweep/run directories into results.csv, results.md, accuracy_vs_speedup.png and "
        "val_curves.png (each run's validations against its step).",
    )
    parser.add_argument("paths", nargs="+", help="sweep directories and/or run directories (searched recursively)")
    parser.add_argument("--out", help="output directory (default: the one path given, else their common parent)")
    parser.add_argument("--force", action="store_true", help="overwrite existing report files")
    parser.add_argument("--metric", default="val_top1", choices=METRICS, help="accuracy for deltas and the plot")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="report: %(levelname)s: %(message)s")
    try:
        rows = collect_runs(args.paths)
        if not rows:
            raise ReportError(
                f"no runs found under {', '.join(args.paths)} (a run directory holds summary.json or config.yaml)"
            )
        paths = write_report(rows, args.out or _default_out(args.paths), force=args.force, metric=args.metric)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(rows)} runs ({status_counts(rows)})")
    for path in paths.values():
        print(f"wrote {path}")
    return 0
