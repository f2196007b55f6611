"""superblock.rundir: the run-directory layout and the summary.json schema."""

from __future__ import annotations

from pathlib import Path

from superblock.rundir import RunDir, RunSummary


def test_run_dir_layout(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    assert run.path == tmp_path
    assert run.config == tmp_path / "config.yaml"
    assert run.last == tmp_path / "checkpoints" / "last.pt" and run.best == tmp_path / "checkpoints" / "best.pt"
    assert run.metrics == tmp_path / "metrics.jsonl" and run.summary == tmp_path / "summary.json"
    assert run.eval == tmp_path / "eval.json" and run.export == tmp_path / "export"
    assert RunDir.of_checkpoint(run.best) == run
    assert RunDir.of_checkpoint(tmp_path / "weights.pt") is None


def test_completed_summary_has_every_field_but_the_traceback() -> None:
    d = RunSummary(status="completed", model="tiny_vit", sparsity=0.8, val_top1=50.0, run_dir="r").to_dict()
    assert "traceback" not in d and d["val_top1"] == 50.0 and "wall_time_s" in d and "mask_digest" in d
    assert list(d)[:3] == ["status", "error", "model"] and list(d)[-1] == "run_dir"


def test_failed_summary_has_only_what_is_known_without_a_trainer() -> None:
    s = RunSummary(
        status="failed",
        error="E: x",
        traceback="tb",
        model=None,
        sparsity=0.9,
        block_size=[16, 16],
        targets=["mlp"],
        run_dir="r",
    )
    assert s.to_dict() == {
        "status": "failed",
        "error": "E: x",
        "traceback": "tb",
        "model": None,
        "sparsity": 0.9,
        "block_size": [16, 16],
        "targets": ["mlp"],
        "run_dir": "r",
    }
    s.wall_time_s = 1.5
    assert s.to_dict()["wall_time_s"] == 1.5
