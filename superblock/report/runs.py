"""Finding run directories and reading each into one report row (summary.json, config.yaml, eval.json).

No torch: reporting only reads files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from superblock.rundir import CONFIG, EVAL, SUMMARY

log = logging.getLogger(__name__)

METRICS = ("val_top1", "val_top5", "best_val_top1", "best_val_top5", "ema_val_top1")
SUMMARY_FIELDS = (
    "val_top1",
    "val_top5",
    "best_val_top1",
    "best_val_top5",
    "ema_val_top1",
    "mean_block_sparsity",
    "params_total",
    "params_kept",
    "wall_time_s",
    "images_per_s",
    "epochs",
    "steps",
    "val_perplexity",
    "best_val_perplexity",
    "val_perplexity_per_byte",
)
EVAL_FIELDS = ("speedup", "latency_ms", "dense_latency_ms", "device", "dtype")


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
