"""What a training run directory holds, in one place: its file layout (`RunDir`) and the schema of its
`summary.json` (`RunSummary`). Plain Python, no torch: every layer may use it.

```
<run dir>/config.yaml               the resolved config (train.py writes it before training)
<run dir>/checkpoints/last.pt       the latest checkpoint (resume, export, evaluate start from it)
<run dir>/checkpoints/best.pt       the checkpoint of the best validation: top-1, a language model's perplexity
<run dir>/metrics.jsonl             one JSON object per logged step
<run dir>/summary.json              RunSummary.to_dict(), written at the end (or on failure)
<run dir>/export/, eval.json        measure.enabled=true: the run's export and its timing vs dense
```
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVAL = "eval.json"
EXPORT = "export"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created or read here)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir | None:
        """The run directory a `<run dir>/checkpoints/<name>.pt` belongs to; None for a checkpoint elsewhere."""
        parent = Path(checkpoint).parent
        return cls(parent.parent) if parent.name == CHECKPOINTS else None

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    @property
    def best(self) -> Path:
        return self.checkpoints / BEST

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def eval(self) -> Path:
        return self.path / EVAL

    @property
    def export(self) -> Path:
        return self.path / EXPORT


@dataclass
class RunSummary:
    """summary.json. A completed run (`Trainer.summary()`, plus the wall time train.py measured) writes every field
    but `traceback`; a failed one (train.py's error path, the sweep callback) only those known without a finished
    trainer: status, error, traceback, model, sparsity, block_size, targets, run_dir and, when known, wall_time_s."""

    status: str  # "completed" | "failed"
    error: str | None = None
    traceback: str | None = None  # failed runs only
    model: str | None = None
    sparsity: float | None = None  # 0 for a dense run
    block_size: list[int] | None = None  # [bh, bw]; None for a dense run
    targets: list[str] | None = None
    val_top1: float | None = None
    val_top5: float | None = None
    ema_val_top1: float | None = None
    val_perplexity: float | None = None  # language models: exp(mean next-token loss)
    val_perplexity_per_byte: float | None = None  # the same per UTF-8 byte of text (compares across tokenizers)
    best_val_top1: float | None = None
    best_val_top5: float | None = None
    best_val_perplexity: float | None = None  # a language model's lowest validation perplexity (best.pt's)
    best_val_perplexity_per_byte: float | None = None  # that validation's per byte
    block_sparsity: dict[str, float] | None = None  # weight name -> measured fraction of all-zero blocks
    mean_block_sparsity: float | None = None
    params_total: int | None = None
    params_kept: int | None = None
    wall_time_s: float | None = None
    images_per_s: float | None = None  # training samples a second (images, or a language model's windows)
    tokens_per_s: float | None = None  # a language model's training tokens a second (None for images)
    epochs: int | None = None
    steps: int | None = None
    world_size: int | None = None
    masks_equal_across_ranks: bool | None = None
    mask_digest: str | None = None
    still_improving: bool | None = None  # validation was still getting better over the last third of the run
    improving_slope: float | None = None  # its least-squares slope per validation (top-1 points; LMs: perplexity)
    run_dir: str | None = None

    FAILED_FIELDS = (
        "status",
        "error",
        "traceback",
        "model",
        "sparsity",
        "block_size",
        "targets",
        "run_dir",
        "wall_time_s",
    )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of summary.json (see the class docstring for which fields a failed run has)."""
        if self.status == "completed":
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "traceback"}
        out = {name: getattr(self, name) for name in self.FAILED_FIELDS}
        return {k: v for k, v in out.items() if v is not None or k not in ("traceback", "wall_time_s")}
