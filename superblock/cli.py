"""Entry-point glue between Hydra and the library (train.py, export.py, evaluate.py): validate, run, report, exit
with a clear status. Nothing in the package imports this module."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from superblock.config import ConfigError, TrainConfig, to_config, to_evaluate_config, to_export_config
from superblock.devices import dtype_name_or_auto
from superblock.engine.distributed import broadcast_object, cleanup, init_distributed
from superblock.rundir import RunDir, RunSummary

# Characters Hydra's override grammar reads as syntax in an unquoted value. A sweep job's run directory is named by
# its overrides (`3_sparsity.block_size=16,sparsity.level=0.8`), so passing it back (`checkpoint=<that dir>`)
# would be misread; and values Hydra cannot take inside quotes either (a quote, a backslash, an interpolation).
_HYDRA_SYNTAX = frozenset("=,[]{}() ")
_UNQUOTABLE = ("'", "\\", "${")


def quote_path_arguments(argv: list[str]) -> list[str]:
    """argv (program name first) with each `key=value` whose value is an existing file or directory that Hydra would
    misread put in quotes, so `python export.py checkpoint=multirun/<sweep>/3_sparsity.level=0.8,...` names that
    directory, as typed. Every other argument (sweeps such as `sparsity.level=0.5,0.8`, flags) is left as it is."""
    quoted = list(argv[:1])
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if (
            sep
            and key
            and not key.startswith("-")
            and not _HYDRA_SYNTAX.isdisjoint(value)
            and not any(u in value for u in _UNQUOTABLE)
            and Path(value).exists()
        ):
            arg = f"{key}='{value}'"
        quoted.append(arg)
    return quoted


def _hydra_context() -> tuple[str | None, bool]:
    """(Hydra's output dir, whether this is a multirun job); (None, False) outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return hc.runtime.output_dir, hc.mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return None, False


# Config-group options renamed: "group=old name" -> what to write instead. The old name keeps working for one release.
DEPRECATED_PRESETS = {
    "sparsity=supermask": "sparsity=learned (the same recipe; sparsity=supermask_reference is the Supermask method)",
}


def _hydra_choices() -> dict[str, Any]:
    """The option Hydra picked in each config group ({} outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return dict(HydraConfig.get().runtime.choices)
    except (ImportError, ValueError):
        return {}


def deprecated_presets(choices: Mapping[str, Any]) -> list[str]:
    """One warning per config-group option chosen under a name that goes away in the next release."""
    chosen = [f"{group}={option}" for group, option in choices.items()]
    return [f"{old} is deprecated: use {DEPRECATED_PRESETS[old]}" for old in chosen if old in DEPRECATED_PRESETS]


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    keys = [k for k in cfg if k != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)


def fail(message: str, code: int = 2) -> None:
    print(f"superblock: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def typed_args(convert: Callable[[DictConfig], Any], cfg: DictConfig) -> dict[str, Any]:
    """The config typed and checked by `convert` (superblock.config), as keyword arguments; a config mistake
    exits 2 with one line."""
    try:
        return asdict(convert(cfg))
    except ConfigError as err:
        fail(str(err), 2)


def show_serving_log() -> None:
    """What loading and serving build (warm-up, compiled graphs, CUDA graphs, with times) on stderr: INFO messages of
    superblock.export, which Python would otherwise drop (export / evaluate run with Hydra's logging off)."""
    log = logging.getLogger("superblock.export")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def run_cli(fn: Callable[..., Any], args: dict[str, Any]) -> Any:
    """Call fn(**args) after applying `kernels.*`; user mistakes and bad inputs (ValueError, missing files) exit 1
    with one line."""
    from superblock.kernels import tuning

    tuning.configure(**args.pop("kernels", {}))
    show_serving_log()
    try:
        return fn(**args)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err), 1)


def export_main(cfg: DictConfig) -> None:
    """Entry of `python export.py`."""
    from superblock.export import export_checkpoint

    run_cli(export_checkpoint, export_args(cfg))


def export_args(cfg: DictConfig) -> dict[str, Any]:
    """export.py's config as export_checkpoint's arguments; the older `batch_size=N` becomes batch_sizes=[N] with a
    deprecation warning (one release more)."""
    args = typed_args(to_export_config, cfg)
    size = args.pop("batch_size", None)
    if size is not None:
        print(f"superblock: warning: batch_size={size} is deprecated: use batch_sizes=[{size}]", file=sys.stderr)
        args["batch_sizes"] = [size]
    return args


def evaluate_main(cfg: DictConfig) -> None:
    """Entry of `python evaluate.py`."""
    from superblock.evaluate import evaluate

    run_cli(evaluate, typed_args(to_evaluate_config, cfg))


def train_main(cfg: DictConfig) -> dict[str, Any] | None:
    """Entry of `python train.py`: returns the summary (Hydra multirun collects it)."""
    from superblock.engine.trainer import Trainer, TrainingDiverged, find_resume, write_summary

    hydra_dir, multirun = _hydra_context()
    for message in deprecated_presets(_hydra_choices()):
        print(f"superblock: warning: {message}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    run_dir: Path | None = None
    try:
        conf: TrainConfig = to_config(cfg)
        if conf.trainer.threads:
            torch.set_num_threads(conf.trainer.threads)
        dist = init_distributed(conf.trainer.device)
        # One run directory, chosen on rank 0 and shared: ranks must never disagree about where to write.
        run_dir = Path(broadcast_object(conf.run_dir or hydra_dir or "outputs/run")).resolve()
        resume = find_resume(conf.trainer.resume, run_dir)
        owner = RunDir.of_checkpoint(resume) if resume is not None else None
        if owner is not None:
            run_dir = owner.path  # resuming a run (this one or another) continues it in place
        resolved = plain_config(cfg)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.create(resolved), RunDir(run_dir).config)
        trainer = Trainer(conf, run_dir, dist, resolved)
        if resume is not None and dist.is_main:
            print(f"resuming from {resume}", flush=True)
        summary = trainer.fit(resume)
        summary.wall_time_s = time.perf_counter() - start
        if dist.is_main:
            write_summary(run_dir, summary)
            print_final(summary)
            if conf.measure.enabled:
                measure_speed(run_dir, conf)
        cleanup()
        return summary.to_dict()
    except (ConfigError, ValueError, TrainingDiverged, FileNotFoundError, RuntimeError) as err:
        code = 1 if isinstance(err, TrainingDiverged) else 2
        if isinstance(err, RuntimeError) and not isinstance(err, TrainingDiverged):
            traceback.print_exc()
            code = 1
        if run_dir is not None:
            write_failed(run_dir, cfg, err, time.perf_counter() - start)
        if multirun:
            # One failed job must not stop the sweep: report it and let the launcher go on.
            print(f"superblock: job failed: {err}", file=sys.stderr, flush=True)
            return {"status": "failed", "error": str(err)}
        fail(str(err), code)
    return None


def measure_speed(run_dir: Path, conf: TrainConfig) -> dict | None:
    """Export the finished run and time it against dense on this device: accuracy and speed from one job."""
    from superblock.evaluate import evaluate
    from superblock.export import export_checkpoint

    m, run = conf.measure, RunDir(run_dir)
    dtype = dtype_name_or_auto(m.dtype)  # on the device export and evaluate pick (auto)
    try:
        sizes = [m.batch_size]
        export_checkpoint(run.path, run.export, dtype=dtype, layout=m.layout, batch_sizes=sizes, overwrite=True)
        result = evaluate(
            run.export, mode="bsr", dtype=dtype, accuracy=False, latency={"batch_size": m.batch_size}, output=run.eval
        )
        print(
            f"measured speedup vs dense: {result.get('speedup', float('nan')):.2f}x ({dtype}, batch "
            f"{m.batch_size}, {result.get('device')})",
            flush=True,
        )
        return result
    except Exception as err:  # noqa: BLE001 - a failed measurement must not fail a finished training job
        print(f"superblock: warning: speed measurement failed: {err}", file=sys.stderr, flush=True)
        return None


def write_failed(run_dir: Path, cfg: DictConfig, err: BaseException, wall: float) -> None:
    from superblock.engine.trainer import write_summary
    from superblock.sweep import failure_summary

    # Reporting a failure must never hide the original error.
    with contextlib.suppress(Exception):
        write_summary(run_dir, replace(failure_summary(run_dir, cfg, err), wall_time_s=wall))


def print_final(s: RunSummary) -> None:
    line = (
        f"\nval top-1 {s.val_top1:.2f}% (top-5 {s.val_top5:.2f}%) | "
        f"measured block sparsity {s.mean_block_sparsity:.3f} over {len(s.block_sparsity)} weights "
        f"(block {s.block_size}) | params kept {s.params_kept:,}/{s.params_total:,}"
        if s.block_size
        else f"\nval top-1 {s.val_top1:.2f}% (top-5 {s.val_top5:.2f}%) | dense model"
    )
    if s.val_perplexity is not None:
        per_byte = f", {s.val_perplexity_per_byte:.3f} per byte" if s.val_perplexity_per_byte is not None else ""
        line += f" | val perplexity {s.val_perplexity:.3f} per token{per_byte}"
    if s.still_improving:
        what = "perplexity" if s.val_perplexity is not None else "val top-1"
        line += (
            f"\n{what} was still improving at the end ({s.improving_slope:+.3g} per validation over the last third):"
            " this run is short; more epochs would likely help (summary.json: still_improving)"
        )
    print(line)
    print(f"run directory: {s.run_dir}", flush=True)
