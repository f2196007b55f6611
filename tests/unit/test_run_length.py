"""Run length: the start-up notice when a sparse run leaves too few steps at full sparsity, and the end-of-run
`still_improving` verdict (superblock.engine.run_length)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from superblock.engine.run_length import accuracy_noise, recovery_notice, recovery_steps, still_improving

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"sparsity": 0.9, "start_step": 0}


def notice(total, per_epoch, epochs, batch, ramp_fraction=0.5, **spec):
    s = {**SPEC, "ramp_steps": int(total * (ramp_fraction or 0)), **spec}
    return recovery_notice(s, total_steps=total, steps_per_epoch=per_epoch, max_epochs=epochs, batch_size=batch,
                           ramp_fraction=ramp_fraction)  # fmt: skip


def test_a_short_sparse_run_is_told_what_fixes_it():
    # the held-out digit set of the issue: 4,000 images, batch 128 -> 31 steps/epoch, 20 epochs, ramp over half
    msg = notice(620, 31, 20, 128)
    assert msg is not None and "310 optimizer steps at the final sparsity 0.9" in msg
    assert "trainer.min_steps=1200" in msg  # half of 1,200 steps after the ramp
    assert "trainer.max_epochs=39" in msg  # 39 * 31 = 1209 steps
    assert "data.batch_size=64" in msg  # 62 steps/epoch * 20 = 1240
    assert "sparsity.min_recovery_steps=0" in msg


def test_long_enough_dense_or_silenced_runs_get_no_notice():
    assert notice(1240, 62, 20, 64) is None
    assert (
        recovery_notice(None, total_steps=10, steps_per_epoch=1, max_epochs=10, batch_size=8, ramp_fraction=0.5) is None
    )
    s = {**SPEC, "ramp_steps": 5}
    assert recovery_notice(s, total_steps=10, steps_per_epoch=1, max_epochs=10, batch_size=8, ramp_fraction=0.5,
                           floor=0) is None  # fmt: skip


def test_a_max_steps_limited_run_is_told_to_raise_max_steps():
    msg = notice(300, 100, 50, 128)  # 50 epochs would be 5,000 steps: max_steps=300 ends it
    assert "trainer.max_steps=1200" in msg and "max_epochs" not in msg.split("lengthen the run:")[1]


def test_ramp_in_epochs_counts_its_steps():
    s = {**SPEC, "start_step": 100, "ramp_steps": 300}
    assert recovery_steps(s, 1000) == 600
    msg = recovery_notice(s, total_steps=900, steps_per_epoch=100, max_epochs=9, batch_size=64, ramp_fraction=None)
    assert "500 optimizer steps" in msg and "trainer.max_epochs=10" in msg


def test_still_improving_needs_a_gain_above_noise():
    rising = [50, 60, 70, 75, 80, 84, 88]
    assert still_improving(rising, noise=1.0) == (True, pytest.approx(4.0))
    flat = [50, 80, 90, 91.0, 90.6, 91.2, 90.9]
    assert still_improving(flat, noise=1.0)[0] is False
    assert still_improving([88, 89, 90], noise=2.0)[0] is False  # 2 points gained, noise 2: not resolved
    assert still_improving([9.0, 8.0, 7.0, 6.0], noise=0.0, higher_is_better=False) == (True, pytest.approx(-1.0))
    assert still_improving([90, 91], noise=0.0) == (False, 0.0)  # too few validations to say
    assert accuracy_noise(90.0, 400) == pytest.approx(1.5)


@pytest.mark.slow
def test_train_raises_epochs_to_min_steps_prints_the_notice_and_writes_still_improving(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "debug=smoke", "trainer.min_steps=20", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run length:" in proc.stdout and "trainer.max_epochs=" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["epochs"], summary["steps"]) == (3, 24)  # debug=smoke: 1 epoch of 8 steps, raised to reach 20
    assert isinstance(summary["still_improving"], bool) and isinstance(summary["improving_slope"], float)
