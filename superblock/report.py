"""Sweep reports: many run directories -> results.csv, results.md and an accuracy-vs-speed plot.

    python -m superblock.report multirun/<sweep> [more dirs...] [--out DIR] [--force] [--metric val_top1]

A run directory is any directory holding `summary.json` (see docs/architecture.md), `config.yaml`, or Hydra's
`.hydra/config.yaml`; the last two without a summary are jobs that died or are still running. An optional
`eval.json` (from evaluate.py) in the run directory, or one level below it, supplies the measured speedup.
This module itself needs no torch: reporting only reads files.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SUMMARY, CONFIG, EVAL = "summary.json", "config.yaml", "eval.json"
OUTPUTS = {"csv": "results.csv", "md": "results.md", "plot": "accuracy_vs_speedup.png"}
METRICS = ("val_top1", "val_top5", "best_val_top1", "best_val_top5", "ema_val_top1")
SUMMARY_FIELDS = (
    "val_top1", "val_top5", "best_val_top1", "best_val_top5", "ema_val_top1", "mean_block_sparsity", "params_total",
    "params_kept", "wall_time_s", "images_per_s", "epochs", "steps",
)  # fmt: skip
EVAL_FIELDS = ("speedup", "latency_ms", "dense_latency_ms", "device", "dtype")
CSV_FIELDS = (
    "run", "model", "sparsity", "block_size", "targets", "val_top1", "val_top5", "best_val_top1", "best_val_top5",
    "ema_val_top1", "delta", "mean_block_sparsity", "params_kept_frac", "params_kept", "params_total", "speedup",
    "latency_ms", "dense_latency_ms", "device", "dtype", "wall_time_s", "images_per_s", "epochs", "steps", "status",
    "error", "run_dir",
)  # fmt: skip


class ReportError(ValueError):
    """A user mistake (no runs, outputs already there, bad path): the CLI prints it and exits with code 2."""


# ---------------------------------------------------------------------------------------------- discovery


def _is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in (SUMMARY, CONFIG, f".hydra/{CONFIG}"))


def _natural_key(text: str) -> list:
    """Sort job "10" after job "9"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories under `paths` (each path may itself be one); hidden dirs and a run's own subdirs skipped."""
    found: set[Path] = set()
    for root in map(Path, paths):
        if not root.is_dir():
            raise ReportError(f"{root} is not a directory")
        for dirpath, dirnames, _ in os.walk(root):
            if _is_run_dir(Path(dirpath)):
                found.add(Path(dirpath).resolve())
                dirnames.clear()  # checkpoints/, exports inside a run are not runs of their own
            else:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .hydra, .submitit
    return sorted(found, key=lambda p: _natural_key(str(p)))


# ---------------------------------------------------------------------------------------------- reading one run


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    """(content, None) or (None, reason); a file that is not a JSON object counts as unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path.name} unreadable: {err}"
    if not isinstance(data, dict):
        return None, f"{path.name} unreadable: expected a JSON object, found {type(data).__name__}"
    return data, None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        log.warning("%s: unreadable (%s); its sparsity/model are unknown", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def parse_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def parse_block(value: Any) -> list[int] | None:
    """A block size as [bh, bw]: from 32, [32, 32], [16, 32] or "16x32"; None when absent or not a block."""
    if isinstance(value, str):
        value = value.lower().split("x")
    if not isinstance(value, (list, tuple)):
        value = [value, value]
    try:
        bh, bw = (int(v) for v in value)
    except (TypeError, ValueError):
        return None
    return [bh, bw]


def parse_targets(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _hydra_choice(run_dir: Path, group: str) -> Any:
    """The option Hydra picked for a config group in this job (`sparsity=none` -> "none"), None if unknown."""
    hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml").get("hydra")
    runtime = hydra_cfg.get("runtime") if isinstance(hydra_cfg, dict) else None
    choices = runtime.get("choices") if isinstance(runtime, dict) else None
    return choices.get(group) if isinstance(choices, dict) else None


def sparsity_fields(cfg: dict, choice: Any = None) -> dict:
    """sparsity / block_size / targets of a run config; (0, None, []) for a dense run: `sparsity=none` (the Hydra
    choice), `sparsity.enabled: false`, or a null sparsity node."""
    node = cfg.get("sparsity")
    disabled = isinstance(node, dict) and node.get("enabled") is False
    if choice == "none" or disabled or ("sparsity" in cfg and node is None):
        return {"sparsity": 0.0, "block_size": None, "targets": []}
    node = node if isinstance(node, dict) else {}
    return {
        "sparsity": parse_float(node.get("level")),
        "block_size": parse_block(node.get("block_size")),
        "targets": parse_targets(node.get("targets")),
    }


def _from_config(run_dir: Path) -> dict:
    """model and grid point from the resolved config (or Hydra's copy), for runs without a usable summary."""
    cfg = _read_yaml(run_dir / CONFIG) or _read_yaml(run_dir / ".hydra" / CONFIG)
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    return {"model": model.get("name"), **sparsity_fields(cfg, _hydra_choice(run_dir, "sparsity"))}


def _speed(run_dir: Path) -> dict:
    """Speed fields from eval.json in the run dir, else from the first one a level below (an export dir)."""
    candidates = [run_dir / EVAL, *sorted(run_dir.glob(f"*/{EVAL}"))]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return {}
    data, reason = _read_json(path)
    if data is None:
        log.warning("%s: %s; speed left out for this run", run_dir, reason)
        return {}
    out = {key: data.get(key) for key in EVAL_FIELDS}
    out["speedup"] = parse_float(out["speedup"])
    return out


def _status(summary: dict | None, reason: str | None, has_summary: bool) -> tuple[str, str | None]:
    if not has_summary:
        return "incomplete", "no summary.json: the job is still running, was killed, or died before writing it"
    if summary is None:
        return "corrupt", reason
    return str(summary.get("status") or "unknown"), summary.get("error")


def _mean_block_sparsity(summary: dict) -> float | None:
    mean = parse_float(summary.get("mean_block_sparsity"))
    per_layer = summary.get("block_sparsity")
    if mean is None and isinstance(per_layer, dict) and per_layer:
        values = [v for v in map(parse_float, per_layer.values()) if v is not None]
        mean = sum(values) / len(values) if values else None
    return mean


def read_run(run_dir: str | Path) -> dict:
    """One report row for one run directory; never raises for bad contents (the row's status says what is wrong)."""
    run_dir = Path(run_dir).resolve()
    has_summary = (run_dir / SUMMARY).is_file()
    summary, reason = _read_json(run_dir / SUMMARY) if has_summary else (None, None)
    if reason:
        log.warning("%s: %s; listed as corrupt", run_dir, reason)
    status, error = _status(summary, reason, has_summary)
    summary = summary or {}
    row: dict[str, Any] = {"run": run_dir.name, "run_dir": str(run_dir), "status": status, "error": error}
    row.update({key: summary.get(key) for key in SUMMARY_FIELDS})
    row["mean_block_sparsity"] = _mean_block_sparsity(summary)
    fallback = _from_config(run_dir)
    row["model"] = summary.get("model") or fallback["model"]
    row["sparsity"] = parse_float(summary.get("sparsity")) if "sparsity" in summary else fallback["sparsity"]
    row["block_size"] = parse_block(summary.get("block_size")) if "block_size" in summary else fallback["block_size"]
    row["targets"] = parse_targets(summary.get("targets")) if "targets" in summary else fallback["targets"]
    kept, total = parse_float(row["params_kept"]), parse_float(row["params_total"])
    row["params_kept_frac"] = kept / total if kept is not None and total else None
    row.update({key: None for key in EVAL_FIELDS} | _speed(run_dir))
    return row


def _relative_names(rows: list[dict]) -> None:
    """Name each run by its path relative to all runs' common directory ("3", "0/lr=0.1"), its own name if alone."""
    dirs = [row["run_dir"] for row in rows]
    common = os.path.commonpath(dirs) if dirs else ""
    for row in rows:
        rel = os.path.relpath(row["run_dir"], common)
        row["run"] = Path(row["run_dir"]).name if rel == "." else rel


def is_dense(row: dict) -> bool:
    return row.get("sparsity") == 0


def _sort_key(row: dict) -> tuple:
    sparsity = row["sparsity"] if row["sparsity"] is not None else math.inf
    block = row["block_size"] or [0, 0]
    return (row["model"] or "", not is_dense(row), sparsity, block[0] * block[1], block, _natural_key(row["run"]))


def collect_runs(paths: Iterable[str | Path]) -> list[dict]:
    """Every run under `paths` as a report row (see CSV_FIELDS), sorted by model, dense first, sparsity, block."""
    rows = [read_run(d) for d in find_run_dirs(paths)]
    _relative_names(rows)
    return sorted(rows, key=_sort_key)


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
                log.warning("several dense runs of %s: deltas use %s, not %s", model, baselines[model]["run"],
                            row["run"])  # fmt: skip
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
    header = ["run", "model", "sparsity", "block", "targets", "val top-1", "val top-5", f"Δ {metric} vs dense",
              "block sparsity", "params kept", "speedup", "wall time", "status"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    for row in rows:
        cells = [
            row["run"], row["model"] or "", "dense" if is_dense(row) else fmt_num(row["sparsity"], "g"),
            fmt_block(row["block_size"]), ", ".join(row["targets"]), fmt_num(row["val_top1"], acc),
            fmt_num(row["val_top5"], acc), fmt_num(row["delta"], "+" + acc), fmt_num(row["mean_block_sparsity"], ".3f"),
            fmt_num(row["params_kept_frac"], ".1%"), fmt_num(row["speedup"], ".2f", "x"),
            fmt_duration(row["wall_time_s"]), _status_cell(row),
        ]  # fmt: skip
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
        return "Speedup: not measured (run evaluate.py, or sweep with `sweep.measure=true`); plot x-axis = density."
    where = "; ".join(f"{device or '?'} {dtype or '?'}" for device, dtype in sorted(measured, key=str))
    return f"Speedup: measured vs dense on {where}."


def _problems(rows: Sequence[dict]) -> list[str]:
    bad = [row for row in rows if row["status"] != "completed"]
    if not bad:
        return []
    lines = ["", "## Runs that did not complete", ""]
    lines += [f"- `{row['run']}` ({row['status']}): {_cell(row.get('error') or 'no error recorded')}" for row in bad]
    return lines


def markdown_report(rows: Sequence[dict], baselines: dict[str, dict], metric: str, plot_name: str) -> str:
    lines = ["# Sweep report", "", f"{len(rows)} runs: {status_counts(rows)}.", ""]
    for model in _models(rows):
        base = baselines.get(model)
        text = f"run `{base['run']}`, {metric} = {fmt_num(base[metric])}" if base else "none in these runs (no deltas)"
        lines.append(f"- Dense baseline of {model}: {text}.")
    lines += ["", _speed_context(rows), "", f"![{metric} vs speed]({plot_name})", "", markdown_table(rows, metric)]
    return "\n".join(lines + _problems(rows)) + "\n"


# ---------------------------------------------------------------------------------------------- plot


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
        ax.step([points[i][1] for i in front], [points[i][2] for i in front], where="pre", color="0.5", lw=1.2,
                zorder=1, label="Pareto front")  # fmt: skip
    blocks = sorted({fmt_block(r["block_size"]) for r, _, _ in points if not is_dense(r)}, key=_natural_key)
    colors = {b: f"C{i % 10}" for i, b in enumerate(blocks)}
    for block in blocks:
        mine = [(r, x, y) for r, x, y in points if not is_dense(r) and fmt_block(r["block_size"]) == block]
        ax.scatter([x for _, x, _ in mine], [y for _, _, y in mine], color=colors[block], zorder=3,
                   label=f"block {block or '?'}")  # fmt: skip
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
        ax.text(0.01, 0.01, f"{left_out} run(s) not shown (not completed or not measured)", fontsize=7,
                transform=ax.transAxes)  # fmt: skip
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def plot_accuracy_vs_speed(rows: Sequence[dict], path: Path, metric: str = "val_top1") -> Path:
    """One panel per model (a single panel in the usual one-model sweep), saved as PNG with the Agg renderer."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI, safe in threads and on servers

    models = _models(rows) or ["unknown"]
    cols = min(len(models), 3)
    nrows = math.ceil(len(models) / cols)
    fig = Figure(figsize=(6.4 * cols, 4.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, model in zip(axes, models, strict=False):
        _draw_panel(ax, [r for r in rows if (r["model"] or "unknown") == model], model, metric)
    for ax in axes[len(models) :]:
        ax.set_visible(False)
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------------- report


def output_paths(out_dir: str | Path) -> dict[str, Path]:
    return {key: Path(out_dir) / name for key, name in OUTPUTS.items()}


def write_report(rows: Sequence[dict], out_dir: str | Path, force: bool = False, metric: str = "val_top1") -> dict:
    """Write results.csv, results.md and accuracy_vs_speedup.png into `out_dir`; returns {"csv"|"md"|"plot": path}.
    Raises ReportError when there are no rows, or when an output exists and `force` is False."""
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
        log.warning("runs of %d models mixed (%s): deltas are per model, the plot has one panel per model",
                    len(models), ", ".join(models))  # fmt: skip
    rows = [dict(row) for row in rows]
    baselines = add_deltas(rows, metric)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_csv(rows, paths["csv"], metric)
    paths["md"].write_text(markdown_report(rows, baselines, metric, paths["plot"].name))
    plot_accuracy_vs_speed(rows, paths["plot"], metric)
    return paths


def _default_out(paths: Sequence[str]) -> Path:
    return Path(paths[0]) if len(paths) == 1 else Path(os.path.commonpath([os.path.abspath(p) for p in paths]))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m superblock.report",
        description="Collect sweep/run directories into results.csv, results.md and accuracy_vs_speedup.png.",
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


if __name__ == "__main__":
    sys.exit(main())
