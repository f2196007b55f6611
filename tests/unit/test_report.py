"""superblock.report and superblock.sweep on fake run directories: no training, CPU, a few seconds."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from superblock import report
from superblock.report import ReportError, collect_runs, main, pareto_front, write_report

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID = [(0.8, 16), (0.8, 32), (0.9, 16), (0.9, 32)]


def _summary(model: str, sparsity: float, block: int | None, top1: float, status: str = "completed") -> dict:
    kept = 1.0 - 0.6 * sparsity
    return {
        "status": status,
        "error": None,
        "model": model,
        "sparsity": sparsity,
        "block_size": [block, block] if block else None,
        "targets": ["mlp"] if block else [],
        "val_top1": top1,
        "val_top5": min(top1 + 20.0, 100.0),
        "best_val_top1": top1 + 0.5,
        "best_val_top5": min(top1 + 20.5, 100.0),
        "block_sparsity": {"encoder.layers.0.mlp.0.weight": sparsity, "encoder.layers.0.mlp.3.weight": sparsity},
        "mean_block_sparsity": sparsity,
        "params_total": 1_000_000,
        "params_kept": int(1_000_000 * kept),
        "wall_time_s": 42.0 + 10 * sparsity,
        "images_per_s": 512.0,
        "epochs": 2,
        "steps": 40,
        "run_dir": "",
    }


def _config(model: str, sparsity: float | None, block: int | None) -> dict:
    """As configs/sparsity/{learned,none}.yaml resolve: `none` keeps the defaults' block and targets."""
    if sparsity is None:
        sparse = {"enabled": False, "level": 0.0, "block_size": 16, "targets": ["mlp", "attn"]}
    else:
        sparse = {"enabled": True, "level": sparsity, "block_size": block, "targets": ["mlp"]}
    return {"model": {"name": model, "num_classes": 10}, "sparsity": sparse, "trainer": {"epochs": 2}}


def make_run(
    root: Path,
    name: str,
    model: str = "tiny_vit",
    sparsity: float | None = 0.8,
    block: int | None = 16,
    top1: float | None = 60.0,
    summary: dict | str | None = None,
) -> Path:
    """A run dir as train.py leaves it in a Hydra multirun: .hydra/, config.yaml, metrics.jsonl, summary.json.
    `summary` overrides the generated one (a str is written verbatim); top1=None leaves summary.json out."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    cfg = _config(model, sparsity, block)
    for path in (run / "config.yaml", run / ".hydra" / "config.yaml"):
        path.write_text(yaml.safe_dump(cfg))
    choice = "none" if sparsity is None else "learned"
    hydra_yaml = {"hydra": {"mode": "MULTIRUN", "runtime": {"choices": {"sparsity": choice, "model": model}}}}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 40, "loss": 1.2}) + "\n")
    if summary is None and top1 is not None:
        summary = _summary(model, sparsity or 0.0, block, top1)
        summary["run_dir"] = str(run)
    if isinstance(summary, dict):
        summary = json.dumps(summary)
    if summary is not None:
        (run / "summary.json").write_text(summary)
    return run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """multirun/<sweep>: a 2x2 grid (jobs 0-3), a dense run (4), a failed (5), a corrupt (6) and a killed job (7)."""
    root = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    for i, (sparsity, block) in enumerate(GRID):
        make_run(root, str(i), sparsity=sparsity, block=block, top1=70.0 - 50 * (sparsity - 0.7) - block / 16)
    make_run(root, "4", sparsity=None, block=None, top1=75.0)
    failed = _summary("tiny_vit", 0.95, 64, 0.0, status="failed") | {"error": "RuntimeError: loss is NaN | step 3"}
    make_run(root, "5", sparsity=0.95, block=64, summary=failed)
    make_run(root, "6", sparsity=0.7, block=8, summary='{"status": "completed", "val_top1": ')
    make_run(root, "7", sparsity=0.99, block=32, top1=None)
    return root


def _by_run(rows: list[dict]) -> dict[str, dict]:
    return {row["run"]: row for row in rows}


def test_collect_runs_reads_grid_dense_failed_corrupt_and_killed(sweep: Path) -> None:
    rows = _by_run(collect_runs([sweep]))
    assert set(rows) == {str(i) for i in range(8)}  # .hydra/ and checkpoints/ are not runs
    for i, (sparsity, block) in enumerate(GRID):
        assert rows[str(i)]["sparsity"] == sparsity and rows[str(i)]["block_size"] == [block, block]
        assert rows[str(i)]["status"] == "completed" and rows[str(i)]["params_kept_frac"] == pytest.approx(
            1 - 0.6 * sparsity, abs=1e-6
        )
    assert rows["4"]["sparsity"] == 0 and rows["4"]["block_size"] is None and report.is_dense(rows["4"])
    assert rows["5"]["status"] == "failed" and "NaN" in rows["5"]["error"]
    # the corrupt and the killed runs still show their grid point, read from config.yaml
    assert rows["6"]["status"] == "corrupt" and "summary.json" in rows["6"]["error"]
    assert (rows["6"]["sparsity"], rows["6"]["block_size"], rows["6"]["model"]) == (0.7, [8, 8], "tiny_vit")
    assert rows["7"]["status"] == "incomplete" and rows["7"]["sparsity"] == 0.99


def test_rows_sorted_dense_first_then_sparsity_then_block(sweep: Path) -> None:
    order = [row["run"] for row in collect_runs([sweep])]
    assert order == ["4", "6", "0", "1", "2", "3", "5", "7"]


def test_cli_subprocess_writes_csv_markdown_and_png(sweep: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "superblock.report", str(sweep)],
        capture_output=True,
        text=True,
        env=env,
        cwd=sweep.parent,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "corrupt" in proc.stderr  # the corrupt summary is reported, the report still written
    assert "8 runs" in proc.stdout
    with open(sweep / "results.csv", newline="") as f:
        rows = _by_run(list(csv.DictReader(f)))
    assert len(rows) == 8
    assert {(rows[str(i)]["sparsity"], rows[str(i)]["block_size"]) for i in range(4)} == {
        (str(s), str(b)) for s, b in GRID
    }
    assert float(rows["0"]["delta_val_top1"]) == pytest.approx(rows_top1(sweep, "0") - 75.0)
    assert float(rows["4"]["delta_val_top1"]) == 0.0
    assert rows["5"]["status"] == "failed" and rows["5"]["delta_val_top1"] == ""  # a failed run is no result
    assert rows["6"]["status"] == "corrupt" and rows["6"]["delta_val_top1"] == ""
    _assert_png(sweep / "accuracy_vs_speedup.png")


def rows_top1(sweep: Path, run: str) -> float:
    return json.loads((sweep / run / "summary.json").read_text())["val_top1"]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    PIL = pytest.importorskip("PIL.Image")
    with PIL.open(path) as image:
        image.verify()
    with PIL.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200


def _markdown_table(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_main_markdown_table_renders_with_failures_marked(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep), "--out", str(sweep / "report")]) == 0
    md = (sweep / "report" / "results.md").read_text()
    table = _markdown_table(md)
    header, separator, body = table[0], table[1], table[2:]
    assert header[:4] == ["run", "model", "sparsity", "block"] and "status" in header
    assert all(set(cell) <= set("-:") and cell for cell in separator) and len(separator) == len(header)
    assert len(body) == 8 and all(len(row) == len(header) for row in body)  # the escaped "|" did not split a row
    rows = {row[0]: dict(zip(header, row, strict=True)) for row in body}
    assert rows["4"]["sparsity"] == "dense" and rows["0"]["sparsity"] == "0.8" and rows["1"]["block"] == "32"
    assert rows["0"]["Δ val_top1 vs dense"] == "-11.00" and rows["0"]["val top-1"] == "64.00"
    assert rows["5"]["status"].startswith("**failed**") and rows["6"]["status"].startswith("**corrupt**")
    assert rows["7"]["status"].startswith("**incomplete**")
    assert "![val_top1 vs speed](accuracy_vs_speedup.png)" in md
    assert "## Runs that did not complete" in md and "loss is NaN" in md
    assert "Dense baseline of tiny_vit: run `4`" in md
    _assert_png(sweep / "report" / "accuracy_vs_speedup.png")
    assert "wrote" in capsys.readouterr().out


def test_existing_outputs_need_force_or_out(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(sweep)]) == 0
    (sweep / "results.md").write_text("keep me")
    capsys.readouterr()
    assert main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "--out" in err
    assert (sweep / "results.md").read_text() == "keep me"
    assert main([str(sweep), "--out", str(sweep / "elsewhere")]) == 0
    assert main([str(sweep), "--force"]) == 0
    assert (sweep / "results.md").read_text().startswith("# Sweep report")


def test_empty_or_missing_dir_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs found" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert not list((tmp_path / "empty").glob("results.*"))
    with pytest.raises(ReportError, match="no runs"):
        write_report([], tmp_path)


def test_measured_speedup_from_eval_json(sweep: Path, caplog: pytest.LogCaptureFixture) -> None:
    for run, speedup in (("2", 1.4), ("3", 1.9)):
        speed = {
            "speedup": speedup,
            "latency_ms": 10 / speedup,
            "dense_latency_ms": 10.0,
            "device": "cuda",
            "dtype": "bfloat16",
        }
        (sweep / run / "eval.json").write_text(json.dumps(speed))
    (sweep / "1" / "export").mkdir()
    (sweep / "1" / "export" / "eval.json").write_text(json.dumps({"speedup": 1.1, "device": "cuda"}))
    (sweep / "0" / "eval.json").write_text("not json")
    rows = _by_run(collect_runs([sweep]))
    assert "eval.json unreadable" in caplog.text and rows["0"]["status"] == "completed"
    assert (rows["0"]["speedup"], rows["1"]["speedup"], rows["3"]["speedup"]) == (None, 1.1, 1.9)
    assert rows["3"]["dtype"] == "bfloat16"
    paths = write_report(list(rows.values()), sweep / "out")
    md = paths["md"].read_text()
    assert "Speedup: measured vs dense on cuda bfloat16" in md and "| 1.90x |" in md
    _assert_png(paths["plot"])


def test_mixed_models_warn_and_compare_each_to_its_own_dense(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    make_run(tmp_path, "a_dense", model="vit_b_16", sparsity=None, block=None, top1=80.0)
    make_run(tmp_path, "a_sparse", model="vit_b_16", sparsity=0.9, block=32, top1=77.0)
    make_run(tmp_path, "b_dense", model="tiny_vit", sparsity=None, block=None, top1=50.0)
    make_run(tmp_path, "b_sparse", model="tiny_vit", sparsity=0.9, block=32, top1=49.0)
    paths = write_report(collect_runs([tmp_path]), tmp_path / "out")
    assert "2 models mixed" in caplog.text
    with open(paths["csv"], newline="") as f:
        deltas = {row["run"]: float(row["delta_val_top1"]) for row in csv.DictReader(f)}
    assert deltas == {"a_dense": 0.0, "a_sparse": -3.0, "b_dense": 0.0, "b_sparse": -1.0}
    _assert_png(paths["plot"])


def test_language_model_runs_get_a_perplexity_column(tmp_path: Path) -> None:
    for name, sparsity, top1, ppl in (("dense", None, 52.0, 5.8), ("sparse", 0.7, 46.0, 7.2)):
        summary = _summary("hf:gpt2", sparsity or 0.0, 32 if sparsity else None, top1) | {"val_perplexity": ppl}
        make_run(tmp_path, name, model="hf:gpt2", sparsity=sparsity, block=32 if sparsity else None, summary=summary)
    paths = write_report(collect_runs([tmp_path]), tmp_path / "out")
    table = _markdown_table(Path(paths["md"]).read_text())
    column = table[0].index("val perplexity")
    assert sorted(row[column] for row in table[2:]) == ["5.800", "7.200"]
    with open(paths["csv"], newline="") as f:
        assert {row["run"]: float(row["val_perplexity"]) for row in csv.DictReader(f)} == {"dense": 5.8, "sparse": 7.2}


def test_list_of_run_dirs_and_metric_choice(sweep: Path, tmp_path: Path) -> None:
    runs = [sweep / "0", sweep / "4"]
    assert main([*map(str, runs), "--metric", "best_val_top1"]) == 0  # default out: their common parent
    with open(sweep / "results.csv", newline="") as f:
        rows = _by_run(list(csv.DictReader(f)))
    assert set(rows) == {"0", "4"} and float(rows["0"]["delta_best_val_top1"]) == pytest.approx(-11.0)
    assert main([str(sweep / "0"), "--out", str(tmp_path / "one")]) == 0  # a single run dir is fine too


def test_pareto_front_maximises_both_axes() -> None:
    points = [(1.0, 80.0), (1.5, 79.0), (1.4, 70.0), (2.0, 75.0), (2.0, 60.0), (3.0, 50.0)]
    assert pareto_front(points) == [0, 1, 3, 5]
    assert pareto_front([]) == []


# ------------------------------------------------------------------------------- sweep callback, real Hydra

APP = """
import json, sys
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg):
    if cfg.sparsity.level == cfg.fail_at:
        raise RuntimeError("boom: diverged")
    run = Path(HydraConfig.get().runtime.output_dir)
    s = cfg.sparsity.level
    (run / "summary.json").write_text(json.dumps({
        "status": "completed", "error": None, "model": cfg.model.name, "sparsity": s,
        "block_size": [cfg.sparsity.block_size] * 2, "targets": ["mlp"], "val_top1": 70 - 10 * s,
        "val_top5": 90.0, "mean_block_sparsity": s, "params_total": 100, "params_kept": int(100 * (1 - s)),
        "wall_time_s": 1.5}))

if __name__ == "__main__":
    main()
"""

CONF = """
model: {name: tiny_vit}
sparsity: {level: 0.5, block_size: 16, targets: [mlp]}
fail_at: -1.0
hydra:
  callbacks:
    progress: {_target_: superblock.sweep.SweepProgress}
  sweep: {dir: SWEEP_DIR}
"""


def _hydra_app(tmp_path: Path) -> Path:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "train.yaml").write_text(CONF.replace("SWEEP_DIR", str(tmp_path / "sweep")))
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    return tmp_path / "app.py"


def _multirun(app: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"}
    cmd = [sys.executable, str(app), "-m", "sparsity.level=0.7,0.9", "sparsity.block_size=16,32", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=app.parent, timeout=300)


def test_sweep_progress_lines_and_report_command(tmp_path: Path) -> None:
    proc = _multirun(_hydra_app(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[sweep] job")]
    assert len(lines) == 4 and all(" completed | sparsity " in line for line in lines)
    assert "val_top1 63.00" in lines[0] and "kept 30.0%" in lines[0]
    assert proc.stdout.count(f"python -m superblock.report {tmp_path / 'sweep'}") == 1
    assert (tmp_path / "sweep" / "progress.log").read_text().splitlines() == lines
    assert main([str(tmp_path / "sweep")]) == 0


def test_sweep_failed_job_is_recorded_and_reported(tmp_path: Path) -> None:
    proc = _multirun(_hydra_app(tmp_path), "fail_at=0.9")
    assert proc.returncode != 0  # Hydra re-raises the first failure once every job has run
    log = (tmp_path / "sweep" / "progress.log").read_text()
    assert log.count(" completed | ") == 2 and log.count(" failed | ") == 2 and "boom: diverged" in log
    summary = json.loads((tmp_path / "sweep" / "2" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["sparsity"] == 0.9 and summary["block_size"] == [16, 16]
    assert "RuntimeError" in summary["traceback"]
    assert "[sweep] finished: 4 jobs (2 completed, 2 failed)" in proc.stdout  # printed at exit despite the failure
    assert f"python -m superblock.report {tmp_path / 'sweep'}" in proc.stdout
    rows = _by_run(collect_runs([tmp_path / "sweep"]))
    assert [rows[str(i)]["status"] for i in range(4)] == ["completed", "completed", "failed", "failed"]
    assert main([str(tmp_path / "sweep")]) == 0


@pytest.mark.slow
def test_sweep_progress_with_joblib_launcher(tmp_path: Path) -> None:
    proc = _multirun(_hydra_app(tmp_path), "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "sweep" / "progress.log").read_text().splitlines()) == 4


@pytest.mark.slow
def test_sweep_progress_with_submitit_local(tmp_path: Path) -> None:
    proc = _multirun(_hydra_app(tmp_path), "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5")
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "sweep" / "progress.log").read_text().splitlines()) == 4
    assert proc.stdout.count("[sweep] finished: 4 jobs (4 completed)") == 1
    assert len([row for row in collect_runs([tmp_path / "sweep"]) if row["status"] == "completed"]) == 4


def test_killed_dense_job_reads_as_dense_from_its_config(tmp_path: Path) -> None:
    make_run(tmp_path, "dense", sparsity=None, block=None, top1=None)
    (row,) = collect_runs([tmp_path])
    assert (row["status"], row["sparsity"], row["block_size"], row["targets"]) == ("incomplete", 0.0, None, [])


def test_callback_uses_the_run_dir_the_trainer_returned(tmp_path: Path) -> None:
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from superblock.sweep import job_run_dir, job_sweep_dir

    hydra_cfg = OmegaConf.create(
        {"runtime": {"output_dir": str(tmp_path / "sw" / "3_a=1")}, "sweep": {"dir": "x", "subdir": "3_a=1"}}
    )
    ret = JobReturn(status=JobStatus.COMPLETED, _return_value={"run_dir": str(tmp_path / "resumed")})
    assert job_run_dir(hydra_cfg, ret) == tmp_path / "resumed"
    assert job_run_dir(hydra_cfg, JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError())).name == "3_a=1"
    assert job_sweep_dir(hydra_cfg) == tmp_path / "sw"


def _validations(run: Path, lines: list) -> None:
    """metrics.jsonl as the trainer writes it: training lines, then a validation line per epoch (str: verbatim)."""
    text = [ln if isinstance(ln, str) else json.dumps(ln) for ln in lines]
    (run / "metrics.jsonl").write_text("\n".join(text) + "\n")


def test_read_curve_takes_each_validation_once_and_skips_what_does_not_parse(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r")
    _validations(run, [
        {"step": 10, "train_loss": 2.0},
        {"step": 20, "val_top1": 40.0, "epoch": 1},
        '{"step": 40, "val_top1": ',  # killed mid-write, then resumed from step 20
        {"step": 40, "val_top1": 52.0, "epoch": 2},
        {"step": 40, "val_top1": 55.0, "epoch": 2},  # validated again after a resume: the later line stands
        {"step": 60, "val_top1": float("nan")},
    ])  # fmt: skip
    assert report.read_curve(run, "val_top1") == [(20, 40.0), (40, 55.0)]
    assert report.read_curve(run, "val_perplexity") == [] and report.read_curve(tmp_path / "none", "val_top1") == []
    assert report.curve_metric("best_val_top1") == report.curve_metric("ema_val_top1") == "val_top1"


def test_language_model_curves_are_perplexity_and_image_curves_top1(tmp_path: Path) -> None:
    for name, sparsity, ppl in (("dense", None, [9.0, 7.5]), ("s50", 0.5, [14.0, 11.0])):
        summary = _summary("hf:llama", sparsity or 0.0, 64 if sparsity else None, 50.0) | {"val_perplexity": ppl[-1]}
        run = make_run(tmp_path / "lm", name, model="hf:llama", sparsity=sparsity, block=64, summary=summary)
        _validations(run, [{"step": 100 * (i + 1), "val_perplexity": p, "val_top1": 50.0} for i, p in enumerate(ppl)])
    run = make_run(tmp_path / "vit", "v", sparsity=0.8, block=16, top1=60.0)
    _validations(run, [{"step": 8, "val_top1": 41.0}, {"step": 16, "val_top1": 60.0}])
    paths = write_report(collect_runs([tmp_path]), tmp_path / "out")
    _assert_png(paths["curves"])
    assert "![validation curves](val_curves.png)" in paths["md"].read_text()
    from matplotlib.figure import Figure

    drawn = []  # what each panel drew, read back from the axes the report's own panel function filled
    for model in ("hf:llama", "tiny_vit"):
        ax = Figure().subplots()
        rows = [r for r in collect_runs([tmp_path]) if r["model"] == model]
        assert report.curves._draw_panel(ax, rows, model, "val_top1") == len(rows)
        drawn.append((ax.get_ylabel(), ax.get_yscale(), sorted(tuple(line.get_ydata()) for line in ax.get_lines())))
    assert drawn[0] == ("val_perplexity (lower is better)", "log", [(9.0, 7.5), (14.0, 11.0)])
    assert drawn[1] == ("val_top1", "linear", [(41.0, 60.0)])


def test_runs_without_validations_get_no_curves_and_force_drops_stale_ones(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs", "a", top1=60.0)
    _validations(run, [{"step": 8, "val_top1": 60.0}])
    out = tmp_path / "out"
    assert "curves" in write_report(collect_runs([tmp_path / "runs"]), out)
    _validations(run, [{"step": 8, "train_loss": 1.0}])  # the same run, its validations gone
    paths = write_report(collect_runs([tmp_path / "runs"]), out, force=True)
    assert "curves" not in paths and not (out / "val_curves.png").exists()
    assert "validation curves" not in paths["md"].read_text()
