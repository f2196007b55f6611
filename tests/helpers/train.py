"""Running train.py as a user does, from the tests: a subprocess in the repo root, the smoke preset, the fault
drill's override and the run's summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["debug=smoke", "trainer.threads=1"]


def run_train(*args: str, env: dict | None = None, cmd: list[str] | None = None, timeout: int = 300):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        (cmd or [sys.executable, "train.py"]) + list(args),
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fault_at(step: int) -> str:
    """The override that makes a run SIGKILL itself right after optimizer step `step` (trainer.fault_at_step)."""
    return f"trainer.fault_at_step={step}"


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics_of(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl, a dict per logged line."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
