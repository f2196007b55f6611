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


def test_a_constant_schedule_counts_every_step_at_the_final_sparsity():
    """sparsity=oneshot on an experiment that sets a ramp_fraction: constant from step 0, no ramp to wait out."""
    s = {**SPEC, "schedule": "constant", "ramp_steps": 3}
    assert recovery_steps(s, 6) == 6
    msg = recovery_notice(s, total_steps=6, steps_per_epoch=889, max_epochs=10, batch_size=4, ramp_fraction=0.5)
    assert "6 optimizer steps at the final sparsity" in msg and "trainer.max_steps=600" in msg


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


def test_step_floor_and_what_auto_means_for_each_dataset():
    from superblock.engine.run_length import auto_min_steps, step_floor

    assert step_floor(600, 0.5) == 1200 and step_floor(600, None) == 600 and step_floor(600, 0.75) == 2400
    assert step_floor(0, 0.5) == 0 and step_floor(600, 1.0) == 0  # check off / a ramp over the whole run
    assert auto_min_steps("imagefolder", "image_classification", 1_437, 1200) == 1200  # the digits
    assert auto_min_steps("small_images", "image_classification", 4_000, 1200) == 1200
    assert auto_min_steps("synthetic", "image_classification", 12_000, 1200) is None  # the smoke set
    assert auto_min_steps("cifar10", "image_classification", 50_000, 1200) is None  # epochs are long already
    assert auto_min_steps("text", "causal_lm", 5_000, 1200) is None  # the evidence is from images
    assert auto_min_steps("imagefolder", "image_classification", 1_437, 0) is None  # min_recovery_steps=0


def test_auto_raises_the_epochs_of_a_small_real_image_tree(tmp_path):
    """Real PNG files through the real transforms and loaders: 3 classes x 8 images, batch 8 -> 3 steps an epoch."""
    from PIL import Image

    from superblock.config import DataConfig
    from superblock.engine.builders import build_data

    for c in range(3):
        for split, n in (("train", 8), ("val", 2)):
            (tmp_path / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (12, 12), (40 * c, 7 * i, 90)).save(tmp_path / split / f"c{c}" / f"{i}.png")
    data = DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, batch_size=8, num_workers=0)
    common = {"seed": 0, "distributed": False, "accumulate": 1, "max_epochs": 2, "max_steps": None}
    auto = build_data(data, **common, min_steps="auto", auto_floor=20)
    assert (auto.steps_per_epoch, auto.epochs, auto.total_steps, auto.min_steps) == (3, 7, 21, 20)
    exact = build_data(data, **common, min_steps=None, auto_floor=20)
    assert (exact.epochs, exact.total_steps) == (2, 6)
    capped = build_data(data, **{**common, "max_steps": 10}, min_steps="auto", auto_floor=20)
    assert capped.total_steps == 10  # trainer.max_steps still ends the run
    synthetic = DataConfig(name="synthetic", image_size=16, batch_size=8, train_size=24, val_size=8)
    assert build_data(synthetic, **common, min_steps="auto", auto_floor=20).epochs == 2
    from superblock.engine.run_length import raised_length_notice

    line = raised_length_notice(2, 7, 3, "auto", 20, 24)
    assert "7 epochs instead of trainer.max_epochs=2" in line and "at least 20 optimizer steps" in line
    assert "trainer.min_steps=null" in line


def test_min_steps_takes_a_count_auto_or_null():
    from superblock.config import ConfigError, to_config

    assert to_config({}).trainer.min_steps == "auto"
    assert to_config({"trainer": {"min_steps": None}}).trainer.min_steps is None
    assert to_config({"trainer": {"min_steps": 300}}).trainer.min_steps == 300
    for bad in ("soon", 0, -5):
        with pytest.raises(ConfigError, match="trainer.min_steps"):
            to_config({"trainer": {"min_steps": bad}})


def test_a_ramp_over_the_whole_run_is_told_to_end_the_ramp_earlier():
    msg = notice(1000, 100, 10, 64, ramp_fraction=1.0)
    assert msg is not None and "0 optimizer steps" in msg and "sparsity.ramp_fraction below 1" in msg
    assert "trainer.min_steps" not in msg  # no length is enough while the ramp takes the whole run
