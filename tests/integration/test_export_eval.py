"""export.py and evaluate.py through their real entry points (subprocesses), on a run directory made here and on a
`python train.py debug=smoke` run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import make_run
from tests.helpers.scripts import QUICK_EVAL, run


def assert_modes_agree(eval_json: Path, forms=("masked", "folded", "bsr")) -> dict:
    result = json.loads(eval_json.read_text())
    assert sorted(result["accuracy"]) == sorted(forms)
    assert len({a["top1"] for a in result["accuracy"].values()}) == 1
    assert all(d["top1_agreement"] == 1.0 and d["max_abs_logit_diff"] < 1e-4 for d in result["agreement"].values())
    return result


def test_export_then_evaluate(tmp_path):
    make_run(tmp_path / "run")
    out = run("export.py", "checkpoint=run", "output=exp", "layout=bsr", "device=cpu", "probe_batch=2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "equivalence" in out.stdout and "model.safetensors" in out.stdout
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [
        "dense_state_dict.safetensors",
        "manifest.json",
        "model.safetensors",
    ]
    out = run("evaluate.py", "checkpoint=exp", "mode=all", *QUICK_EVAL, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "bsr" in out.stdout and "speedup" in out.stdout
    result = assert_modes_agree(tmp_path / "exp" / "eval.json")
    assert result["speedup"] > 0 and result["latency"]["batch_size"] == 2


def test_a_sweep_jobs_directory_is_passed_back_as_typed(tmp_path):
    """A sweep names each job's run directory by its overrides (`3_sparsity.block_size=[64,16],sparsity.level=0.8`):
    export.py and evaluate.py take it (and the export named after it) unquoted, as the sweep printed it; Hydra's
    grammar would otherwise read its `=`, `,` and brackets as syntax."""
    job = "multirun/3_sparsity.block_size=[8,8],sparsity.level=0.8"
    make_run(tmp_path / job)
    out = run("export.py", f"checkpoint={job}", "layout=bsr", "device=cpu", "probe_batch=2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    export = f"exports/{Path(job).name}"
    assert (tmp_path / export / "manifest.json").is_file()
    out = run("evaluate.py", f"checkpoint={export}", "mode=bsr", "latency.enabled=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / export / "eval.json").is_file()


def test_path_arguments_are_quoted_only_where_hydra_would_misread_an_existing_path(tmp_path):
    from superblock.cli import quote_path_arguments

    job = tmp_path / "0_sparsity.level=0.5,sparsity.block_size=16"
    job.mkdir()
    plain = tmp_path / "plain_dir"
    plain.mkdir()
    argv = ["export.py", f"checkpoint={job}", f"output={plain}", "sparsity.level=0.5,0.8", "--multirun",
            f"x={tmp_path / 'missing=1,2'}", "dtype=bf16"]  # fmt: skip
    assert quote_path_arguments(argv) == [argv[0], f"checkpoint='{job}'", *argv[2:]]


def test_entry_points_fail_cleanly(tmp_path):
    out = run("export.py", "checkpoint=missing_run", cwd=tmp_path)
    assert out.returncode == 1 and "superblock: error: missing_run does not exist" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "exports").exists()

    marker = tmp_path / "marker"
    torch.save({"format": "superblock-checkpoint", "model": _Payload(marker)}, tmp_path / "evil.pt")
    out = run("export.py", "checkpoint=evil.pt", cwd=tmp_path)
    assert out.returncode == 1 and "refusing to load" in out.stderr and not marker.exists()

    make_run(tmp_path / "run")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "manifest.json").write_text('{"format": "superblock-sparse", "version": 1}')
    out = run("evaluate.py", "checkpoint=exp", *QUICK_EVAL, cwd=tmp_path)
    assert out.returncode == 1 and "edited after export" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt", "exp", "run"]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.slow
def test_train_smoke_export_evaluate(tmp_path):
    """The documented path: train.py -> export.py -> evaluate.py (about a minute on 2 CPU cores)."""
    start = time.perf_counter()
    out = run("train.py", "debug=smoke", "hydra.run.dir=smoke", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    out = run("export.py", "checkpoint=smoke", "device=cpu", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((tmp_path / "exports" / "smoke" / "manifest.json").read_text())
    assert manifest["equivalence"]["passed"] and manifest["layout_policy"]["mode"] == "auto"
    assert manifest["source"]["metrics"]
    out = run("evaluate.py", "checkpoint=exports/smoke", "mode=all", *QUICK_EVAL, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert_modes_agree(tmp_path / "exports" / "smoke" / "eval.json")
    out = run("evaluate.py", "checkpoint=smoke", "mode=bsr", "device=cpu", "latency.enabled=false", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    evaluated = json.loads((tmp_path / "smoke" / "eval.json").read_text())
    assert evaluated["accuracy"]["bsr"]["top1"] == pytest.approx(summary["val_top1"], abs=1.0)  # <= 1 image flips
    print(f"train -> export -> evaluate: {time.perf_counter() - start:.1f} s")
