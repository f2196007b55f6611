"""Running the repository's entry points (export.py, evaluate.py, train.py) as a user does, from any directory:
a subprocess with the repository on PYTHONPATH, and the quickest evaluate.py settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

QUICK_EVAL = ["device=cpu", "max_batches=1", "latency.batch_size=2", "latency.repeats=2", "latency.rounds=1"]


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(REPO / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
