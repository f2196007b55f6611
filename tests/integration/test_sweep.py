"""Grid sweeps through the real entry point (sequential and submitit_local launchers), then the report."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.train import ROOT, run_train

GRID = ["sweep=smoke_grid", "debug=smoke", "trainer.threads=1"]


def report(*paths: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "superblock.report", *map(str, paths), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def read_rows(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def check_grid_report(sweep: Path, out: Path) -> None:
    proc = report(sweep, out=out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_rows(out)
    assert len(rows) == 4
    grid = {(float(r["sparsity"]), r["block_size"]) for r in rows}
    assert grid == {(0.5, "8"), (0.5, "16"), (0.8, "8"), (0.8, "16")}
    assert all(r["status"] == "completed" for r in rows)
    png = (out / "accuracy_vs_speedup.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    curves = (out / "val_curves.png").read_bytes()  # each run's validations, from the metrics.jsonl train.py wrote
    assert curves[:8] == b"\x89PNG\r\n\x1a\n" and len(curves) > 10_000
    md = (out / "results.md").read_text().splitlines()
    assert "![validation curves](val_curves.png)" in md
    table = [ln for ln in md if ln.startswith("|")]
    assert len(table) == 2 + 4 and set(table[1].replace("|", "").strip()) <= set("-: ")


def test_sequential_grid_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(*GRID, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[sweep] job") == 4  # a progress line per finished job
    assert len(list(sweep.glob("*/summary.json"))) == 4
    check_grid_report(sweep, tmp_path / "report")


@pytest.mark.slow
def test_submitit_local_grid_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(*GRID, "hydra/launcher=local_submitit", f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_grid_report(sweep, tmp_path / "report")


def test_failed_job_is_listed_without_breaking_the_sweep_or_report(tmp_path):
    sweep = tmp_path / "sweep"
    # block 1000 is larger than every weight of the micro ViT: that job fails at start-up, the other runs on.
    proc = run_train("-m", "debug=smoke", "trainer.threads=1", "sparsity.block_size=8,1000", f"hydra.sweep.dir={sweep}")
    assert "job failed" in proc.stderr
    proc = report(sweep, out=tmp_path / "report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["block_size"]: r for r in read_rows(tmp_path / "report")}
    assert rows["8"]["status"] == "completed"
    assert rows["1000"]["status"] == "failed" and "larger than weight" in rows["1000"]["error"]
    assert (tmp_path / "report" / "accuracy_vs_speedup.png").is_file()


@pytest.mark.slow
def test_measure_puts_speed_next_to_accuracy(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "debug=smoke",
        "trainer.threads=1",
        "measure.enabled=true",
        "measure.batch_size=8",
        "measure.layout=bsr",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = [p for p in sweep.iterdir() if (p / "summary.json").exists()]
    assert (job / "eval.json").is_file() and (job / "export" / "manifest.json").is_file()
    assert report(sweep, out=tmp_path / "report").returncode == 0
    (row,) = read_rows(tmp_path / "report")
    assert float(row["speedup"]) > 0
