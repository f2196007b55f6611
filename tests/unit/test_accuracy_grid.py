"""benchmarks/accuracy.py: the frontier grid's jobs, budget, summary table (gap to dense over seeds) and a real run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import accuracy  # noqa: E402

GRID = [
    "--preset",
    "digits_wide",
    "--recipes",
    "reference,default,magnitude_frozen",
    "--permute",
    "none,mlp+heads",
    "--blocks",
    "16,32,64",
    "--levels",
    "0.8,0.9",
    "--seeds",
    "0,1,2",
]


def test_grid_jobs_dense_first_then_seed_by_seed(tmp_path) -> None:
    args = accuracy.parse_args([*GRID, "--out", str(tmp_path), "--start-epoch", "2"])
    jobs = accuracy.jobs_for(args)
    assert len(jobs) == 3 + 3 * 2 * 3 * 2 * 3 and len({j["name"] for j in jobs}) == len(jobs)
    assert [j["recipe"] for j in jobs[:3]] == ["dense"] * 3
    seeds = [j["seed"] for j in jobs[3:]]
    assert seeds == sorted(seeds)  # a grid cut by the budget still has every configuration at seed 0
    job = next(j for j in jobs if j["permute"] == "mlp+heads" and j["block"] == "64")
    cmd = accuracy.command(job, args)
    for expected in (
        "experiment=digits_wide",
        "sparsity.permute=mlp+heads",
        "sparsity.block_size=64",
        "sparsity.start_epoch=2.0",
        "trainer.device=auto",
    ):
        assert expected in cmd, expected
    assert "111 runs" in accuracy.describe(jobs, args)
    with pytest.raises(SystemExit):
        accuracy.parse_args([*GRID, "--recipes", "finetune"])  # an experiment preset cannot add sparse_finetune


def test_run_length_axis_pairs_each_length_with_its_own_dense_runs(tmp_path) -> None:
    root = tmp_path / "tree"
    for i in range(40):  # a validation set of 40 images
        (root / "val" / str(i % 4)).mkdir(parents=True, exist_ok=True)
        (root / "val" / str(i % 4) / f"{i}.png").write_bytes(b"")
    args = accuracy.parse_args(["--preset", "imagefolder", "--root", str(root), "--recipes", "default", "--levels",
                                "0.9", "--blocks", "16", "--seeds", "0,1", "--epochs", "10,40", "--out",
                                str(tmp_path / "out"), "data.image_size=16"])  # fmt: skip
    jobs = accuracy.jobs_for(args)
    assert [j["name"] for j in jobs[:4]] == ["dense_e10_s0", "dense_e40_s0", "dense_e10_s1", "dense_e40_s1"]
    cmd = accuracy.command(next(j for j in jobs if j["name"] == "default_p0_l0.9_b16_e40_s1"), args)
    assert "data=imagefolder" in cmd and "trainer.max_epochs=40" in cmd and cmd[-1] == "data.image_size=16"
    values = {"dense_e10": (80.0, 82.0), "dense_e40": (95.0, 97.0), "default_p0_l0.9_b16_e10": (70.0, 74.0),
              "default_p0_l0.9_b16_e40": (94.0, 96.0)}  # fmt: skip
    rows = [{**j, "value": values[j["name"].rsplit("_s", 1)[0]][j["seed"]]} for j in jobs]
    entries = {(e["recipe"], e["epochs"]): e for e in accuracy.summarize(rows)}
    assert entries[("default", 10)]["gap"] == pytest.approx(-9.0)  # against the 10-epoch dense runs
    assert entries[("default", 40)]["gap"] == pytest.approx(-1.0)
    text = accuracy.resolution(args, list(entries.values()))
    assert "40 images" in text and "a mean of 2 seeds" in text


def test_tile_shapes_are_a_grid_axis(tmp_path) -> None:
    """--blocks takes squares and ROWSxCOLS tiles; names and overrides say which; the table sorts them by area."""
    args = accuracy.parse_args(["--recipes", "default", "--levels", "0.9", "--seeds", "0", "--blocks",
                                "32,64x16,16x64,64x64,128x32", "--out", str(tmp_path)])  # fmt: skip
    assert args.blocks == ["32", "64x16", "16x64", "64", "128x32"]
    jobs = {j["name"]: j for j in accuracy.jobs_for(args)}
    assert "sparsity.block_size=[64,16]" in jobs["default_p0_l0.9_b64x16_s0"]["overrides"]
    assert "sparsity.block_size=32" in jobs["default_p0_l0.9_b32_s0"]["overrides"]
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--blocks", "64x16x2"])
    rows = [_row("dense", 0, 90.0), _row("default", 0, 88.0, block=32)]
    rows += [{**_row("default", 0, v), "block": b} for v, b in ((89.0, "64x16"), (85.0, "16x64"), (86.0, "128x32"))]
    entries = accuracy.summarize(rows)
    assert [e["block"] for e in entries] == [None, "64x16", "32", "16x64", "128x32"]  # area, then taller first
    assert [accuracy.tile_kind(b) for b in ("32", "64x16", "16x64")] == ["square", "tall", "wide"]
    accuracy.plot(entries, tmp_path / "shapes.png", "t", "val_top1")
    assert (tmp_path / "shapes.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_that_failed_is_a_failed_row_not_a_missing_value(tmp_path) -> None:
    """A run dir holding train.py's failure summary (e.g. out of GPU memory) is reported as failed, with its error,
    and not run again."""
    args = accuracy.parse_args(["--preset", "synthetic", "--recipes", "default", "--blocks", "16", "--levels", "0.8",
                                "--seeds", "0", "--out", str(tmp_path)])  # fmt: skip
    job = next(j for j in accuracy.jobs_for(args) if j["recipe"] == "default")
    run_dir = tmp_path / "runs" / job["name"]
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "failed", "error": "CUDA out of memory. Tried"}))
    row = accuracy.run(job, args, accuracy.Budget(None))
    assert row["status"] == "failed: CUDA out of memory. Tried" and row["value"] is None
    ok = {"status": "completed", "val_top1": 91.5, "wall_time_s": 3.0}
    (run_dir / "summary.json").write_text(json.dumps(ok))
    assert accuracy.run(job, args, accuracy.Budget(None))["value"] == 91.5


def test_budget_stops_starting_runs_that_would_not_end_in_time() -> None:
    budget = accuracy.Budget(None)
    assert budget.can_start() and budget.left() is None
    budget = accuracy.Budget(1.0)
    assert budget.can_start()
    budget.finished(120.0)  # runs take 2 minutes, 1 is left
    assert not budget.can_start()


def _row(recipe: str, seed: int, value: float, permute: str = "none", block: int | None = 32) -> dict:
    return {
        "recipe": recipe,
        "permute": permute,
        "level": 0.0 if recipe == "dense" else 0.9,
        "block": None if recipe == "dense" else block,
        "seed": seed,
        "value": value,
        "status": "ok",
    }


def test_summary_gaps_are_per_seed_then_averaged(tmp_path) -> None:
    rows = [
        _row("dense", 0, 90.0),
        _row("dense", 1, 94.0),
        _row("default", 0, 88.0),
        _row("default", 1, 91.0),
        {**_row("default", 0, 89.0, "mlp+heads"), "kept_before": 0.2, "kept_after": 0.3},
        {**_row("default", 1, 92.5, "mlp+heads"), "kept_before": 0.4, "kept_after": 0.5},
        {**_row("reference", 0, 0.0), "value": None, "status": "killed (budget)"},
    ]
    entries = {(e["recipe"], e["permute"]): e for e in accuracy.summarize(rows)}
    plain, permuted = entries[("default", "none")], entries[("default", "mlp+heads")]
    assert plain["gap"] == pytest.approx(-2.5) and plain["gap_std"] == pytest.approx(math.sqrt(0.5))
    assert permuted["gap"] == pytest.approx(-1.25) and permuted["seeds"] == 2
    assert permuted["kept_before"] == pytest.approx(0.3) and permuted["kept_after"] == pytest.approx(0.4)
    assert ("reference", "none") not in entries
    md = accuracy.table(list(entries.values()), "val_top1")
    assert "| default | mlp+heads | 90% | 32 | - | 90.75 +- 2.47 | -1.25 +- 0.35 | 0.300 -> 0.400 | 2 |" in md
    accuracy.plot(list(entries.values()), tmp_path / "a.png", "t", "val_top1")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_two_run_grid_end_to_end_on_cpu(tmp_path) -> None:
    out = tmp_path / "grid"
    accuracy.main(
        [
            "--preset",
            "synthetic",
            "--recipes",
            "default",
            "--permute",
            "mlp+heads",
            "--blocks",
            "16",
            "--levels",
            "0.8",
            "--seeds",
            "0",
            "--max-steps",
            "3",
            "--parallel",
            "2",
            "--device",
            "cpu",
            "--budget-minutes",
            "10",
            "--out",
            str(out),
            "debug=smoke",
        ]
    )
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["recipe"] for r in rows) == ["default", "dense"] and all(r["status"] == "ok" for r in rows)
    sparse = next(r for r in rows if r["recipe"] == "default")
    assert sparse["kept_after"] >= sparse["kept_before"] > 0
    assert "| default | mlp+heads | 80% | 16 |" in (out / "results.md").read_text()
    assert (out / "runs.csv").is_file() and (out / "accuracy.png").is_file()


def test_magnitude_initialised_learned_scores_are_a_recipe(tmp_path) -> None:
    args = accuracy.parse_args(["--preset", "digits", "--recipes", "magnitude_init", "--out", str(tmp_path)])
    job = next(j for j in accuracy.jobs_for(args) if j["recipe"] == "magnitude_init")
    cmd = accuracy.command(job, args)
    assert "sparsity=learned" in cmd and "sparsity.score_init=magnitude" in cmd


def test_recipes_compare_across_grids_with_one_sign(tmp_path) -> None:
    """benchmarks/compare_recipes.py: gaps in % of dense, below zero worse for accuracy and perplexity alike."""
    from benchmarks import compare_recipes

    def grid(metric, dense, rows):
        return {
            "rows": [{"recipe": "dense", "mean": dense, "block": None, "gap": 0.0, "gap_std": 0.0, "seeds": 3}]
            + [{"recipe": r, "block": b, "mean": dense + g, "gap": g, "gap_std": 0.5, "seeds": 3} for r, b, g in rows],
            "runs": [{"metric": metric}],
        }

    acc = grid("val_top1", 90.0, [("default", "16", -4.5), ("reference", "16", -9.0)])
    ppl = grid("val_perplexity", 5.0, [("default", "64x16", 9.9), ("default", "32", 1.0)])
    (tmp_path / "a.json").write_text(json.dumps(acc))
    (tmp_path / "p.json").write_text(json.dumps(ppl))
    assert compare_recipes.relative_gaps(acc)["default"] == (-5.0, 0.5 / 90.0 * 100.0, 3)
    assert compare_recipes.relative_gaps(ppl, "32")["default"][0] == -20.0  # perplexity up 20%: 20% worse
    out = tmp_path / "r.png"
    compare_recipes.main([f"images={tmp_path / 'a.json'}", f"text={tmp_path / 'p.json'}#32", "--out", str(out)])
    assert out.stat().st_size > 0
    # a grid of two levels: #BLOCK@LEVEL picks one (the first row of a recipe is the lower level's)
    two = grid("val_perplexity", 5.0, [("default", "32", 1.0), ("default", "32", 2.0)])
    two["rows"][1]["sparsity"], two["rows"][2]["sparsity"] = 0.8, 0.9
    (tmp_path / "two.json").write_text(json.dumps(two))
    assert compare_recipes.load(f"x={tmp_path / 'two.json'}#32@0.9")[1]["default"][0] == -40.0
    assert compare_recipes.load(f"x={tmp_path / 'two.json'}#32")[1]["default"][0] == -20.0
    with pytest.raises(SystemExit, match="a level is a number"):
        compare_recipes.load(f"x={tmp_path / 'two.json'}#32@high")


def test_pretrained_preset_measures_the_start_and_its_own_recipe(tmp_path) -> None:
    """--preset smollm2: the converted folder as model.pretrained, --as-is one run without a step, the experiment's
    own recipe (its MLP permutation included) beside the reference (whose ramp and frozen masks the experiment cannot
    impose)."""
    folder = tmp_path / "model"
    args = accuracy.parse_args(["--preset", "smollm2", "--root", str(folder), "--as-is", "--recipes",
                                "experiment,reference", "--blocks", "32", "--levels", "0.5", "--seeds", "0,1",
                                "--max-steps", "300", "--out", str(tmp_path / "out")])  # fmt: skip
    jobs = {j["name"]: j for j in accuracy.jobs_for(args)}
    assert list(jobs)[:3] == ["dense_s0", "dense_s1", "as_is"] and len(jobs) == 3 + 2 * 2
    as_is = accuracy.command(jobs["as_is"], args)
    assert "trainer.max_steps=0" in as_is and "trainer.max_steps=300" not in as_is
    assert f"model.pretrained={folder}" in as_is and "experiment=smollm2_sparse" in as_is
    assert "optim.lr=1e-4" in accuracy.command(jobs["dense_s1"], args)  # the dense fine-tune's own best rate
    own = accuracy.command(jobs["experiment_pm_l0.5_b32_s1"], args)
    assert not any(o.startswith("sparsity=") for o in own) and "trainer.max_steps=300" in own
    ref = accuracy.command(jobs["reference_pm_l0.5_b32_s0"], args)
    assert "sparsity.freeze_after_ramp=false" in ref and "sparsity.ramp_fraction=null" in ref
    assert "3 dense + 4 sparse" in accuracy.describe(list(jobs.values()), args)
    with pytest.raises(SystemExit, match="smollm2.py"):
        accuracy.ensure_data(args)  # no converted folder there
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--preset", "digits", "--recipes", "experiment"])  # digits is not an experiment

    # perplexity: the gap also in percent of dense, and the per-byte perplexity beside
    rows = [{**jobs[n], "value": v, "also": b, "status": "ok"} for n, v, b in (
        ("dense_s0", 10.0, 2.0), ("dense_s1", 20.0, 3.0), ("as_is", 12.0, 2.2),
        ("experiment_pm_l0.5_b32_s0", 11.0, 2.1), ("experiment_pm_l0.5_b32_s1", 24.0, 3.3))]  # fmt: skip
    entries = {e["recipe"]: e for e in accuracy.summarize(rows)}
    assert entries["experiment"]["gap_pct"] == pytest.approx(15.0)  # +10% and +20%
    assert entries["as_is"]["gap"] == pytest.approx(2.0) and entries["as_is"]["seeds"] == 1
    md = accuracy.table(list(entries.values()), "val_perplexity")
    assert "| experiment | mlp | 50% | 32 | - | 17.50 +- 9.19 | +2.50 +- 2.12 | +15.0% +- 7.1 | 2.700 +- 0.849 |" in md
    assert "| as_is | none | 0% | - | - | 12.00 +- 0.00 | +2.00 +- 0.00 | +20.0% +- 0.0 |" in md
    assert "a mean of 2 seeds resolves gaps above 4.243" in accuracy.resolution(args, list(entries.values()))
    accuracy.plot(list(entries.values()), tmp_path / "p.png", "t", "val_perplexity")  # no empty 0% panel
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_pretrained_preset_end_to_end_on_a_tiny_converted_llama(tmp_path) -> None:
    pytest.importorskip("transformers")
    from superblock.gguf import save_checked
    from tests.helpers.llama import tiny_llama

    model, tokenizer = tiny_llama(layers=5)  # the experiment keeps layers 0-1 dense: three more carry its sparsity
    save_checked(model, tokenizer, tmp_path / "tiny", echo=lambda _: None)
    out = tmp_path / "grid"
    accuracy.main(["--preset", "smollm2", "--root", str(tmp_path / "tiny"), "--as-is", "--recipes", "experiment",
                   "--blocks", "16", "--levels", "0.5", "--seeds", "0", "--max-steps", "2", "--device", "cpu",
                   "--parallel", "2", "--out", str(out), "data.val_size=4", "data.max_bytes=20000",
                   "data.batch_size=2", "data.seq_len=16"])  # fmt: skip
    rows = {r["recipe"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert set(rows) == {"dense", "as_is", "experiment"} and all(r["status"] == "ok" for r in rows.values())
    assert all(r["also"] > 0 for r in rows.values())  # the per-byte perplexity of every run
    assert all(0 < r["best"] <= r["value"] for r in rows.values())  # the lowest perplexity of each run's validations
    summary = json.loads((out / "runs" / "as_is" / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["val_perplexity"] == rows["as_is"]["value"]
    assert "| as_is |" in (out / "results.md").read_text()
    log = (out / "runs" / "experiment_pm_l0.5_b16_s0" / "stdout.log").read_text()
    assert f"distilling from {tmp_path / 'tiny'}:" in log and "permutation (mlp)" in log  # the experiment's own
    # the same student distilled from this grid's dense fine-tune instead: its run is read, not run again
    accuracy.main(["--preset", "smollm2", "--root", str(tmp_path / "tiny"), "--recipes", "experiment", "--teacher",
                   "dense", "--blocks", "16", "--levels", "0.5", "--seeds", "0", "--max-steps", "2", "--device", "cpu",
                   "--out", str(out), "data.val_size=4", "data.max_bytes=20000", "data.batch_size=2",
                   "data.seq_len=16"])  # fmt: skip
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["recipe"] for r in rows].count("dense") == 2  # once run, once read
    student = next(r for r in rows if r["recipe"] == "experiment+dense_teacher")
    assert student["status"] == "ok" and student["value"] > 0
    log = (out / "runs" / "experiment_tdense_pm_l0.5_b16_s0" / "stdout.log").read_text()
    assert f"distilling from {out.resolve() / 'runs' / 'dense_s0'}:" in log


@pytest.mark.parametrize("recipe", sorted(accuracy.RECIPES))
def test_every_recipe_composes_into_a_valid_train_config(recipe) -> None:
    """A recipe's overrides on the smollm2 preset (the one every recipe may meet) give a config train.py accepts."""
    from hydra import compose, initialize_config_dir

    from superblock.config import to_config

    root = Path(__file__).resolve().parents[2]
    preset, _ = accuracy.PRESETS["smollm2"]
    overrides = [o.format(root="/nonexistent/folder") for o in preset] + accuracy.RECIPES[recipe]
    with initialize_config_dir(config_dir=str(root / "configs"), version_base=None):
        cfg = to_config(compose("train", overrides))
    dense_first2 = [e["match"] for e in cfg.sparsity.level_overrides] == ["model.layers.0.*", "model.layers.1.*"]
    if recipe == "reference":  # the published method: one level for every weight
        assert cfg.sparsity.level_overrides == [] and not cfg.sparsity.level_total
    elif recipe != "finetune":  # (another experiment) the preset's own levels: layers 0-1 dense, the rest make it up
        assert dense_first2 and cfg.sparsity.level_total


def test_shape_frontier_puts_each_tiles_gap_beside_its_speed(tmp_path) -> None:
    """benchmarks/shape_frontier.py: gaps from a grid's results.json or its runs.csv (re-summarized per seed), speed
    per layer at the same sparsity, the mean's share of the largest square's; other sparsities and recipes left out."""
    from benchmarks import shape_frontier

    runs = tmp_path / "runs.csv"
    fields = "name,recipe,permute,level,block,epochs,seed,metric,value,status"
    lines = [fields]
    for seed, dense in ((0, 90.0), (1, 92.0)):
        lines.append(f"dense_s{seed},dense,none,0.0,,40,{seed},val_top1,{dense},ok")
        lines.append(f"a{seed},magnitude_frozen,none,0.9,64x16,40,{seed},val_top1,{dense - 1.0 - seed},ok")
        lines.append(f"b{seed},magnitude_frozen,none,0.9,32,40,{seed},val_top1,{dense - 3.0},ok")
        lines.append(f"c{seed},magnitude_frozen,none,0.8,32,40,{seed},val_top1,{dense},ok")  # another sparsity
        lines.append(f"d{seed},default,none,0.9,32,40,{seed},val_top1,{dense - 9.0},ok")  # another recipe
    runs.write_text("\n".join(lines) + "\n")
    more = tmp_path / "more.csv"  # a second grid sharing the dense runs: read together, each run once
    more.write_text("\n".join([fields, lines[1], "e0,magnitude_frozen,none,0.9,64,40,0,val_top1,80.0,ok"]) + "\n")
    assert set(shape_frontier.load_gaps(f"{runs},{more}", 0.9, "magnitude_frozen")) == {"64x16", "32", "64"}
    assert shape_frontier.load_gaps(f"{runs},{more}", 0.9, "magnitude_frozen")["64"] == (-10.0, 0.0, 1)
    gaps = shape_frontier.load_gaps(runs, 0.9, "magnitude_frozen")
    assert set(gaps) == {"64x16", "32"}
    assert gaps["64x16"][0] == pytest.approx(-1.5) and gaps["64x16"][2] == 2
    assert gaps["32"][:2] == (pytest.approx(-3.0), pytest.approx(0.0))

    speed = tmp_path / "speed.csv"
    speed.write_text(
        "layer,block,sparsity,dense_ms,ours_ms,ours_x\n"
        "fc1,64x16,0.9,1,0.5,2.0\nfc2,64x16,0.9,1,0.5,2.0\nfc1,32x32,0.9,1,1,1.0\nfc2,32x32,0.9,1,1,4.0\n"
        "fc1,64x64,0.9,1,1,4.0\nfc2,64x64,0.9,1,1,4.0\nfc1,64x16,0.8,1,1,9.0\n"
    )
    other = tmp_path / "modes.csv"  # another dtype and a smaller batch in one file: the dtype's largest batch counts
    other.write_text(
        "layer,block,sparsity,mode,batch,ours_x\nfc1,64x16,0.9,bf16,256,2.0\nfc1,64x16,0.9,bf16,1,0.5\n"
        "fc1,64x16,0.9,fp32,256,7.0\n"
    )
    assert shape_frontier.load_speed(other, 0.9) == {"64x16": {"fc1": 2.0}}
    table = shape_frontier.table([("grid", gaps)], shape_frontier.load_speed(speed, 0.9))
    row = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert row["64 x 16 (tall)"].endswith("| -1.50 +- 0.71 | 2.00x | 2.00x | 2.00x | 0.50 |")
    assert "| 2.00x | 0.50 |" in row["32 x 32 (square)"]  # geometric mean of 1x and 4x
    assert row["64 x 64 (square)"].endswith("| - | 4.00x | 4.00x | 4.00x | 1.00 |")
    served = tmp_path / "e2e.jsonl"  # the best dense runtime against the best sparse one, per batch
    rows = [
        ("eager", 8, 4.0, 2.0),
        ("cudagraph", 8, 2.0, 1.6),
        ("cudagraph", 256, 9.0, 3.0),
        ("compile", 256, 6.0, 5.0),
    ]
    lines = [{"runtime": r, "batch": b, "dense_ms": d, "sparse_ms": m, "block": "64x16", "sparsity": 0.9,
              "dtype": "bf16"} for r, b, d, m in rows]  # fmt: skip
    lines.append({**lines[0], "sparse_ms": 0.1, "dtype": "fp32"})  # another dtype: left out
    served.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert shape_frontier.load_served([served], 0.9) == {"64x16": {8: 1.25, 256: 2.0}}
    out = tmp_path / "f.png"
    shape_frontier.main([f"grid={runs}", "--speed", str(speed), "--served", str(served), "--out", str(out)])
    assert out.stat().st_size > 0
    with pytest.raises(SystemExit, match="no rows of recipe"):
        shape_frontier.main([f"grid={runs}", "--speed", str(speed), "--recipe", "reference", "--out", str(out)])


def _scheduled(tmp_path, recipes: str, monkeypatch, more: tuple[str, ...] = ()) -> dict[str, dict]:
    """run_all on a 2-seed grid with `run` replaced by a recorder: which runs had ended when each one started."""
    import threading
    import time

    grid = ["--recipes", recipes, "--levels", "0.9", "--blocks", "16", "--seeds", "0,1", "--parallel", "3"]
    args = accuracy.parse_args(
        ["--preset", "imagefolder", "--root", str(tmp_path), *grid, *more, "--out", str(tmp_path)]
    )
    ended: set[str] = set()
    seen: dict[str, dict] = {}
    lock = threading.Lock()

    def fake_run(job, args, budget):
        with lock:
            seen[job["name"]] = {"ended_before": set(ended)}
        time.sleep(0.3 if job["recipe"] == "dense" else 0.05)
        with lock:
            ended.add(job["name"])
        return {"name": job["name"], "recipe": job["recipe"], "status": "ok"}

    monkeypatch.setattr(accuracy, "run", fake_run)
    rows = accuracy.run_all(accuracy.jobs_for(args), args)
    assert len(rows) == len(seen) == 4
    return seen


def test_sparse_runs_start_beside_the_dense_runs_unless_they_start_from_them(tmp_path, monkeypatch) -> None:
    seen = _scheduled(tmp_path, "default", monkeypatch)
    # 3 workers, 2 dense runs queued first: the first sparse run takes the third worker while both dense runs go on
    assert seen["default_p0_l0.9_b16_s0"]["ended_before"] == set()
    (tmp_path / "ft").mkdir()
    seen = _scheduled(tmp_path / "ft", "finetune", monkeypatch)
    for seed in (0, 1):  # the finetune recipe loads its seed's dense run: it starts only once that run has ended
        assert f"dense_s{seed}" in seen[f"finetune_p0_l0.9_b16_s{seed}"]["ended_before"]


def test_a_run_cut_by_the_budget_says_how_far_it_got(tmp_path) -> None:
    assert accuracy.last_validation(tmp_path, "val_perplexity") == ""  # nothing logged
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 200, "train_loss": 3.0}) + "\n"
        + json.dumps({"step": 200, "val_perplexity": 41.25, "epoch": 1}) + "\n"
        + json.dumps({"step": 400, "train_loss": 2.5}) + "\n"
        + '{"step": 400, "val_perpl'  # the line being written when the run was stopped
    )  # fmt: skip
    assert accuracy.last_validation(tmp_path, "val_perplexity") == " at step 200: val_perplexity 41.25"


def test_teacher_dense_distils_every_sparse_run_from_its_seeds_dense_run(tmp_path, monkeypatch) -> None:
    grid = ["--preset", "smollm2", "--root", str(tmp_path), "--recipes", "experiment,reference", "--levels", "0.5"]
    grid += ["--blocks", "64x16", "--out", str(tmp_path)]
    args = accuracy.parse_args([*grid, "--seeds", "0,1", "--teacher", "dense"])
    jobs = accuracy.jobs_for(args)
    sparse = [j for j in jobs if j["recipe"] != "dense"]
    assert {j["recipe"] for j in sparse} == {"experiment+dense_teacher", "reference+dense_teacher"}
    for job in sparse:
        cmd = accuracy.command(job, args)
        dense = tmp_path.resolve() / "runs" / f"dense_s{job['seed']}"
        teacher = f"distill.teacher={dense}"
        assert teacher in cmd and job["name"].endswith(f"_s{job['seed']}") and "_tdense_" in job["name"]
        # the experiment's own teacher (the pretrained folder) is overridden: the later override wins in Hydra
        assert cmd.index(teacher) > cmd.index(f"model.pretrained={tmp_path.resolve()}")
    plain = accuracy.jobs_for(accuracy.parse_args(grid))
    assert not any(o.startswith("distill.teacher=") for j in plain for o in j["overrides"])
    assert not any(j.get("after") for j in plain)  # nothing waits without a dense teacher
    (tmp_path / "td").mkdir()
    seen = _scheduled(tmp_path / "td", "default", monkeypatch, ("--teacher", "dense"))
    for seed in (0, 1):  # a run distilled from its seed's dense run starts only once that run has ended
        assert f"dense_s{seed}" in seen[f"default_tdense_p0_l0.9_b16_s{seed}"]["ended_before"]


def test_a_grid_runs_an_experiments_own_permutation_unless_told_otherwise(tmp_path) -> None:
    """smollm2's experiment permutes its MLPs (sparsity.permute: mlp in its file): a grid that does not pass --permute
    runs it so, where it used to force sparsity.permute=none on every run; --permute still chooses."""
    grid = ["--root", str(tmp_path), "--recipes", "experiment", "--levels", "0.5", "--out", str(tmp_path)]
    args = accuracy.parse_args(["--preset", "smollm2", *grid])
    assert args.permute == ["mlp"]
    job = accuracy.jobs_for(args)[-1]
    assert "sparsity.permute=mlp" in accuracy.command(job, args) and "_pm_" in job["name"]
    assert accuracy.parse_args(["--preset", "smollm2", *grid, "--permute", "none"]).permute == ["none"]
    assert accuracy.parse_args(["--preset", "lm_tiny", "--out", str(tmp_path)]).permute == ["none"]
