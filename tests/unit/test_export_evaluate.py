"""evaluate(): the masked, folded and block-sparse forms agree; latency, memory and eval.json are reported."""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import OmegaConf

from superblock.evaluate import evaluate
from superblock.export import ExportError, export_checkpoint
from tests.helpers.runs import make_run

QUICK = {"batch_size": 2, "warmup": 1, "repeats": 2, "rounds": 1, "inputs": 2}


def run_eval(path, mode="all", **kw):
    kw = {"device": "cpu", "max_batches": 1, "latency": QUICK, "echo": lambda _: None, **kw}
    return evaluate(path, mode, **kw)


@pytest.fixture(scope="module")
def run_and_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_run(root / "run", sparsity=0.75)
    export_checkpoint(root / "run", root / "export", device="cpu", layout="bsr", probe_batch=2, echo=lambda _: None)
    return root


def assert_forms_agree(result, forms):
    acc = result["accuracy"]
    assert sorted(acc) == sorted(forms)
    assert len({(a["top1"], a["top5"], a["images"]) for a in acc.values()}) == 1
    for diff in result["agreement"].values():
        assert diff["top1_agreement"] == 1.0 and diff["max_abs_logit_diff"] < 1e-4


def test_all_modes_agree_on_a_run(run_and_export):
    root = run_and_export
    result = run_eval(root / "run")
    assert_forms_agree(result, ["masked", "folded", "bsr"])
    assert result["accuracy"]["bsr"]["images"] == 16  # 1 batch of the run's batch size
    assert set(result["latency"]) == {"batch_size", "folded", "bsr"}
    assert result["latency"]["folded"]["speedup_vs_dense"] == 1.0
    assert result["speedup"] == result["latency"]["bsr"]["speedup_vs_dense"] > 0
    assert result["weight_bytes"]["bsr"] < result["weight_bytes"]["folded"] < result["weight_bytes"]["masked"]
    on_disk = json.loads((root / "run" / "eval.json").read_text())
    assert on_disk["accuracy"] == result["accuracy"] and on_disk["dense_latency_ms"] > 0


def test_evaluation_shows_its_progress(run_and_export, tmp_path, capsys):
    """Accuracy over the validation batches and latency over the forms' rounds are long work (an ImageNet pass, a
    language model's latency on a CPU: minutes): each shows its progress, here as plain lines (not a terminal)."""
    latency = {**QUICK, "repeats": 4, "rounds": 2}
    run_eval(run_and_export / "run", "bsr", max_batches=None, data={"val_size": 48}, latency=latency,
             output=tmp_path / "e.json")  # fmt: skip
    err = capsys.readouterr().err
    assert "evaluate: 3/3 batches (100%)" in err  # 48 images in batches of 16
    assert "latency: 4/4 rounds (100%)" in err  # 2 rounds of each of bsr and folded (the dense baseline)


def test_export_dir_modes_agree_and_masked_needs_the_source(run_and_export, tmp_path):
    root = run_and_export
    result = run_eval(root / "export")
    assert result["kind"] == "export" and result["data"]["name"] == "synthetic"
    assert_forms_agree(result, ["masked", "folded", "bsr"])
    assert (root / "export" / "eval.json").is_file()
    moved = tmp_path / "export"
    shutil.copytree(root / "export", moved)
    shutil.move(root / "run", tmp_path / "run_moved")
    try:
        alone = run_eval(moved, output=tmp_path / "e.json")
    finally:
        shutil.move(tmp_path / "run_moved", root / "run")
    assert_forms_agree(alone, ["folded", "bsr"])
    assert any("source checkpoint" in note for note in alone["notes"])


def test_single_mode_and_options(run_and_export, tmp_path):
    root = run_and_export
    result = run_eval(root / "export", "bsr", data={"val_size": 8}, max_batches=None, output=tmp_path / "e.json")
    assert list(result["accuracy"]) == ["bsr"] and result["accuracy"]["bsr"]["images"] == 8
    assert set(result["weight_bytes"]) == {"folded", "bsr"}  # folded: the dense latency baseline
    quick = run_eval(root / "run", "folded", accuracy=False, latency={"enabled": False}, output=tmp_path / "q.json")
    assert "accuracy" not in quick and "latency" not in quick and list(quick["weight_bytes"]) == ["folded"]


def test_bad_input(run_and_export, tmp_path):
    root = run_and_export
    with pytest.raises(ValueError, match="mode='sparse'"):
        run_eval(root / "run", "sparse")
    shutil.copytree(root / "export", tmp_path / "export")
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    manifest["dtype"] = "fp16"
    (tmp_path / "export" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="edited after export"):
        run_eval(tmp_path / "export")
    with pytest.raises(ValueError, match="data has 7 classes, the model 10"):
        run_eval(root / "run", data={"num_classes": 7}, output=tmp_path / "e.json")
    shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("eval.json"))
    OmegaConf.save(OmegaConf.create({"seed": 0}), tmp_path / "run" / "config.yaml")
    with pytest.raises(ValueError, match="no data config"):
        run_eval(tmp_path / "run")
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "run" / "eval.json").exists()


def test_evaluation_data_needs_only_the_val_split(tmp_path):
    """A val-only ImageFolder copy (no train/ folder) is enough to evaluate; the run's eval transforms apply."""
    from PIL import Image

    from superblock.evaluate import val_loader

    for c in ("a", "b"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (60 * i, 100, 200)).save(tmp_path / "val" / c / f"{i}.png")
    data = {"name": "imagefolder", "root": str(tmp_path), "augment": {"crop_pct": 1.0, "hflip": 0.0}}
    bundle, loader = val_loader(data, seed=0, model_spec={"image_size": 16, "num_classes": 2}, batch_size=4)
    assert bundle.train is None and len(bundle.val) == 6
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1]
