"""Metric logging behind one small interface: console + metrics.jsonl always, Weights & Biases on request."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from superblock.rundir import RunDir


class MetricSink(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...
    def finish(self, status: str = "completed") -> None: ...


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class JsonlSink:
    """One JSON object per line; `truncate_after(step)` drops lines a killed run wrote after its last checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - kept open for the whole run

    def truncate_after(self, step: int) -> None:
        self._file.close()
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")

    def finish(self, status: str = "completed") -> None:
        self._file.close()


class WandbSink:
    """Weights & Biases, imported lazily. mode: online/offline/disabled (default: $WANDB_MODE, else online)."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        project: str,
        entity: str | None,
        mode: str | None,
        tags: list[str],
        name: str | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError as err:  # pragma: no cover - wandb is a dependency
            raise ValueError("logger=wandb needs the wandb package: pip install wandb") from err
        mode = mode or os.environ.get("WANDB_MODE") or "online"
        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            dir=str(run_dir),
            config=config,
            tags=list(tags),
            name=name,
            reinit=True,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=step)

    def finish(self, status: str = "completed") -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


class MetricLogger:
    """Fan-out to every sink; on ranks other than 0 it does nothing."""

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def finish(self, status: str = "completed") -> None:
        for sink in self.sinks:
            sink.finish(status)


LOGGERS = ("console", "wandb")  # logger.name: console (metrics.jsonl and the console) | wandb (and Weights & Biases)


def build_logger(
    name: str,
    run_dir: Path,
    enabled: bool,
    config: dict,
    project: str = "superblock",
    entity: str | None = None,
    mode: str | None = None,
    tags: list[str] | None = None,
) -> MetricLogger:
    if name not in LOGGERS:
        raise ValueError(f"unknown logger {name!r}: use one of {LOGGERS}")
    if not enabled:
        return MetricLogger([])
    sinks: list[MetricSink] = [JsonlSink(RunDir(run_dir).metrics)]
    if name == "wandb":
        sinks.append(WandbSink(run_dir, config, project, entity, mode, tags or [], name=run_dir.name))
    return MetricLogger(sinks)
