"""Hydra multirun helpers: a progress line per finished job, failures recorded, where the report is.

Registered in the config (`hydra.callbacks.sweep_progress._target_: superblock.sweep.SweepProgress`), so it runs
with every launcher: in the main process for the basic launcher, in the worker for joblib, inside the job (its
`.submitit/` log) for submitit. Every line is also appended to `<sweep dir>/progress.log`, which works everywhere:
`tail -f multirun/<sweep>/progress.log`.
"""

from __future__ import annotations

import atexit
import os
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from superblock import report
from superblock.io import write_json_atomically
from superblock.rundir import RunDir, RunSummary

PROGRESS_LOG = "progress.log"


def _is_multirun(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.mode", default="")).endswith("MULTIRUN")


def _is_rank_zero() -> bool:
    """A DDP job on SLURM (submitit, tasks_per_node > 1) runs the callback once per rank: only rank 0 reports."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return not rank.isdigit() or int(rank) == 0


def _error_text(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__


def failure_summary(
    run_dir: Path, job_cfg: DictConfig | None, exc: BaseException, sparsity_choice: Any = None
) -> RunSummary:
    """The summary (metrics left out) of a job that raised before the trainer wrote one, with the grid point from
    its config. Unresolved: the failure may be a broken interpolation."""
    cfg = OmegaConf.to_container(job_cfg, resolve=False) if job_cfg is not None else {}
    assert isinstance(cfg, dict)
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    return RunSummary(
        status="failed",
        error=_error_text(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        model=model.get("name"),
        **report.sparsity_fields(cfg, sparsity_choice),
        run_dir=str(run_dir),
    )


def record_failure(run_dir: Path, job_return: JobReturn) -> Path | None:
    """Write a failed summary.json for a job that raised, unless the trainer already wrote one."""
    path = RunDir(run_dir).summary
    exc = job_return._return_value  # `return_value` re-raises for failed jobs
    if job_return.status != JobStatus.FAILED or path.exists() or not isinstance(exc, BaseException):
        return None
    choice = OmegaConf.select(job_return.hydra_cfg, "hydra.runtime.choices.sparsity") if job_return.hydra_cfg else None
    summary = failure_summary(run_dir, job_return.cfg, exc, choice)
    write_json_atomically(path, summary.to_dict())  # never seen half-written
    return path


def job_line(job_num: Any, run_dir: Path, metric: str = "val_top1") -> str:
    """`[sweep] job 3 completed | sparsity 0.8 block 32 | val_top1 61.2 val_top5 85 | ... | <run dir>`."""
    row = report.read_run(run_dir)
    setting = (
        "dense"
        if report.is_dense(row)
        else (f"sparsity {report.fmt_num(row['sparsity'], 'g')} block {report.fmt_block(row['block_size'])}")
    )
    parts = [f"[sweep] job {job_num} {row['status']}", setting]
    if row["status"] == "completed":
        acc = report.accuracy_spec([row])
        numbers = [f"{metric} {report.fmt_num(row[metric], acc)}", f"val_top5 {report.fmt_num(row['val_top5'], acc)}"]
        if row["mean_block_sparsity"] is not None:
            numbers.append(f"block sparsity {report.fmt_num(row['mean_block_sparsity'], '.3f')}")
        if row["params_kept_frac"] is not None:
            numbers.append(f"kept {report.fmt_num(row['params_kept_frac'], '.1%')}")
        if row["speedup"] is not None:
            numbers.append(f"speedup {report.fmt_num(row['speedup'], '.2f', 'x')}")
        parts += [" ".join(numbers), report.fmt_duration(row["wall_time_s"])]
    elif row.get("error"):
        parts.append(str(row["error"]).splitlines()[0][:200])
    return " | ".join([*parts, str(run_dir)])


def job_run_dir(hydra_cfg: DictConfig, job_return: JobReturn) -> Path:
    """Where the job's summary is: the trainer's returned `run_dir` (it differs from Hydra's output dir when
    `run_dir=` is set or a run is resumed in place), else Hydra's output dir."""
    value = job_return._return_value if job_return.status == JobStatus.COMPLETED else None
    if isinstance(value, dict) and value.get("run_dir"):
        return Path(value["run_dir"])
    return Path(hydra_cfg.runtime.output_dir)


def job_sweep_dir(hydra_cfg: DictConfig) -> Path:
    """The sweep dir of a job, as its output dir minus `hydra.sweep.subdir`: re-reading `hydra.sweep.dir` in a
    remote job could evaluate `${now:...}` again, at another second."""
    out, sub = Path(hydra_cfg.runtime.output_dir), Path(str(hydra_cfg.sweep.subdir))
    if sub.parts and out.parts[-len(sub.parts) :] == sub.parts:
        return out.parents[len(sub.parts) - 1]
    return Path(str(hydra_cfg.sweep.dir))


def sweep_end_lines(sweep_dir: Path) -> list[str]:
    rows = report.collect_runs([sweep_dir]) if sweep_dir.is_dir() else []
    tally = report.status_counts(rows) if rows else "no run directories found"
    return [
        f"[sweep] finished: {len(rows)} jobs ({tally}) in {sweep_dir}",
        f"[sweep] report: python -m superblock.report {sweep_dir}",
    ]


class SweepProgress(Callback):
    """One line per finished job while a sweep runs; at the end, a tally and the report command."""

    def __init__(self, metric: str = "val_top1", capture_failures: bool = True) -> None:
        self.metric = metric
        self.capture_failures = capture_failures
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra skips on_multirun_end when a job failed (the sweeper re-raises the first failure after every job
        # ran): the closing lines are printed at exit instead, unless on_multirun_end already did.
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        atexit.register(self._finish)

    def _finish(self) -> None:
        if self._sweep_dir is not None:
            for line in sweep_end_lines(self._sweep_dir):
                print(line, flush=True)
        self._sweep_dir = None

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_multirun(config) or job_return.hydra_cfg is None or not _is_rank_zero():
            return
        try:
            self._report_job(job_return.hydra_cfg.hydra, job_return)
        except Exception as err:  # an exception here would turn a finished training job into a failed one
            print(f"[sweep] progress callback error (the job itself is unaffected): {err!r}", flush=True)

    def _report_job(self, hydra_cfg: DictConfig, job_return: JobReturn) -> None:
        run_dir = job_run_dir(hydra_cfg, job_return)
        if self.capture_failures:
            record_failure(run_dir, job_return)
        line = job_line(hydra_cfg.job.get("num", "?"), run_dir, self.metric)
        print(line, flush=True)
        with open(job_sweep_dir(hydra_cfg) / PROGRESS_LOG, "a") as f:
            f.write(line + "\n")  # one short write per job: lines from parallel jobs do not interleave

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = self._sweep_dir or Path(str(config.hydra.sweep.dir))
        self._finish()
