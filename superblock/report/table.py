"""Report rows -> deltas against each model's dense run, results.csv and the markdown report.

No torch: reporting only reads files.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from superblock.report.runs import METRICS, is_dense, parse_float

log = logging.getLogger(__name__)

CSV_FIELDS = (
    "run",
    "model",
    "sparsity",
    "block_size",
    "targets",
    "val_top1",
    "val_top5",
    "best_val_top1",
    "best_val_top5",
    "ema_val_top1",
    "val_perplexity",
    "best_val_perplexity",
    "delta",
    "mean_block_sparsity",
    "params_kept_frac",
    "params_kept",
    "params_total",
    "speedup",
    "latency_ms",
    "dense_latency_ms",
    "device",
    "dtype",
    "wall_time_s",
    "images_per_s",
    "epochs",
    "steps",
    "status",
    "error",
    "run_dir",
)


# ---------------------------------------------------------------------------------------------- dense deltas


def _models(rows: Sequence[dict]) -> list[str]:
    return sorted({row["model"] or "unknown" for row in rows})


def dense_baselines(rows: Sequence[dict], metric: str = "val_top1") -> dict[str, dict]:
    """model -> its completed dense row with a `metric` value (the first one, in report order, if several)."""
    baselines: dict[str, dict] = {}
    for row in rows:
        if is_dense(row) and row["status"] == "completed" and parse_float(row.get(metric)) is not None:
            model = row["model"] or "unknown"
            if model in baselines:
                log.warning(
                    "several dense runs of %s: deltas use %s, not %s", model, baselines[model]["run"], row["run"]
                )
                continue
            baselines[model] = row
    return baselines


def add_deltas(rows: Sequence[dict], metric: str = "val_top1") -> dict[str, dict]:
    """Set row["delta"] = row[metric] - the dense run's (same model) for completed runs, else None; returns the
    baselines. A failed run's last numbers stay in the table but get no delta: they are not a result."""
    baselines = dense_baselines(rows, metric)
    for row in rows:
        base, value = baselines.get(row["model"] or "unknown"), parse_float(row.get(metric))
        usable = base is not None and value is not None and row["status"] == "completed"
        row["delta"] = value - float(base[metric]) if usable else None
    return baselines


# ---------------------------------------------------------------------------------------------- formatting


def fmt_block(block: list[int] | None) -> str:
    if not block:
        return ""
    return str(block[0]) if block[0] == block[1] else f"{block[0]}x{block[1]}"


def fmt_num(value: Any, spec: str = ".4g", suffix: str = "") -> str:
    value = parse_float(value)
    return "" if value is None else f"{value:{spec}}{suffix}"


def fmt_duration(seconds: Any) -> str:
    seconds = parse_float(seconds)
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def _csv_value(key: str, value: Any) -> Any:
    if key == "block_size":
        return fmt_block(value)
    if key == "targets":
        return ";".join(value)
    return "" if value is None else value


def write_csv(rows: Sequence[dict], path: Path, metric: str) -> None:
    header = [f"delta_{metric}" if key == "delta" else key for key in CSV_FIELDS]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([_csv_value(key, row.get(key)) for key in CSV_FIELDS] for row in rows)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _status_cell(row: dict) -> str:
    if row["status"] == "completed" or not row.get("error"):
        return row["status"]
    error = str(row["error"]).splitlines()[0] if str(row["error"]).strip() else ""
    return f"**{row['status']}**: {error[:60]}{'…' if len(error) > 60 else ''}"


def accuracy_spec(rows: Sequence[dict]) -> str:
    """Two decimals for accuracies in percent, four for fractions: one format for the whole table."""
    values = [parse_float(row.get(key)) for row in rows for key in METRICS]
    return ".2f" if any(v is not None and abs(v) > 1.0 for v in values) else ".4f"


def markdown_table(rows: Sequence[dict], metric: str = "val_top1") -> str:
    acc = accuracy_spec(rows)
    header = [
        "run",
        "model",
        "sparsity",
        "block",
        "targets",
        "val top-1",
        "val top-5",
        f"Δ {metric} vs dense",
        "block sparsity",
        "params kept",
        "speedup",
        "wall time",
        "status",
    ]
    lm = any(row.get("val_perplexity") is not None for row in rows)  # language models: next-token top-1, perplexity
    if lm:
        header.insert(7, "val perplexity")
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    for row in rows:
        cells = [
            row["run"],
            row["model"] or "",
            "dense" if is_dense(row) else fmt_num(row["sparsity"], "g"),
            fmt_block(row["block_size"]),
            ", ".join(row["targets"]),
            fmt_num(row["val_top1"], acc),
            fmt_num(row["val_top5"], acc),
            fmt_num(row["delta"], "+" + acc),
            fmt_num(row["mean_block_sparsity"], ".3f"),
            fmt_num(row["params_kept_frac"], ".1%"),
            fmt_num(row["speedup"], ".2f", "x"),
            fmt_duration(row["wall_time_s"]),
            _status_cell(row),
        ]
        if lm:
            cells.insert(7, fmt_num(row.get("val_perplexity"), ".3f"))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def status_counts(rows: Sequence[dict]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def _speed_context(rows: Sequence[dict]) -> str:
    measured = {(row["device"], row["dtype"]) for row in rows if row["speedup"] is not None}
    if not measured:
        return "Speedup: not measured (run evaluate.py, or sweep with `measure.enabled=true`); plot x-axis = density."
    where = "; ".join(f"{device or '?'} {dtype or '?'}" for device, dtype in sorted(measured, key=str))
    return f"Speedup: measured vs dense on {where}."


def _problems(rows: Sequence[dict]) -> list[str]:
    bad = [row for row in rows if row["status"] != "completed"]
    if not bad:
        return []
    lines = ["", "## Runs that did not complete", ""]
    lines += [f"- `{row['run']}` ({row['status']}): {_cell(row.get('error') or 'no error recorded')}" for row in bad]
    return lines


def markdown_report(
    rows: Sequence[dict], baselines: dict[str, dict], metric: str, plot_name: str, curves_name: str | None = None
) -> str:
    lines = ["# Sweep report", "", f"{len(rows)} runs: {status_counts(rows)}.", ""]
    for model in _models(rows):
        base = baselines.get(model)
        text = f"run `{base['run']}`, {metric} = {fmt_num(base[metric])}" if base else "none in these runs (no deltas)"
        lines.append(f"- Dense baseline of {model}: {text}.")
    lines += ["", _speed_context(rows), "", f"![{metric} vs speed]({plot_name})", ""]
    if curves_name:
        lines += [f"![validation curves]({curves_name})", ""]
    lines += [markdown_table(rows, metric)]
    return "\n".join(lines + _problems(rows)) + "\n"
