"""train.py with its output going to a log (not a terminal): plain progress lines, one per epoch, no bar frames."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_log_of_a_run_has_one_progress_line_per_epoch_and_no_frames(tmp_path):
    log = tmp_path / "train.log"
    with open(log, "w") as out:  # stdout and stderr into one file, as `python train.py > log 2>&1` does
        proc = subprocess.run(
            [
                sys.executable,
                "train.py",
                "debug=smoke",
                "trainer.threads=1",
                "trainer.max_epochs=3",
                "data.train_size=128",
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text  # no carriage-return frames
    progress = [ln for ln in text.splitlines() if re.match(r"epoch \d+/3: ", ln)]
    assert [ln.split(":")[0] for ln in progress] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    for epoch, line in enumerate(progress, start=1):  # the bar's fields: batches, step, rate, times, postfix
        assert re.search(
            rf"4/4 batches \(100%\), step {4 * epoch}, [\d.]+ batch/s, elapsed \d\d:\d\d, ETA 00:00, "
            r"loss=[\d.]+, lr=\S+, sparsity=[\d.]+, img_s=\d+$",
            line,
        ), line
