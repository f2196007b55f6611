"""Sparse fine-tuning from a dense run, with distillation, through train.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train import SMOKE, fault_at, run_train, summary_of  # noqa: E402


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dense")
    proc = run_train(*SMOKE, "sparsity=none", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_pretrained_run_dir_starts_from_its_weights(dense_run, tmp_path) -> None:
    from superblock.engine.pretrained import load_run_weights, run_model
    from superblock.models import build_model

    dense = run_model(dense_run)
    student = build_model("micro_vit", num_classes=10, image_size=32)
    load_run_weights(student, dense_run)
    for (k, a), b in zip(dense.state_dict().items(), student.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="predicts 10 classes but this run's data has 5"):
        load_run_weights(build_model("micro_vit", num_classes=5, image_size=32), dense_run)


def test_masked_run_dir_loads_folded(tmp_path) -> None:
    from superblock.engine.pretrained import run_model

    proc = run_train(*SMOKE, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = run_model(tmp_path)
    w = model.encoder.layers[0].mlp[0].weight
    assert not any(".parametrizations." in k for k in model.state_dict())
    assert (w.reshape(w.shape[0] // 8, 8, w.shape[1] // 8, 8).abs().sum((1, 3)) == 0).float().mean() > 0.7


def test_distilled_finetune_resumes_exactly_and_logs_teacher_time(dense_run, tmp_path) -> None:
    common = [
        *SMOKE,
        f"model.pretrained={dense_run}",
        f"distill.teacher={dense_run}",
        "distill.blocks=1.0",  # the layer-wise term too: its hooks must not break resuming exactly
        "sparsity=finetune",
        "sparsity.ramp_epochs=1",
        "trainer.max_epochs=2",
        "trainer.checkpoint_every_steps=3",
        "trainer.log_every_steps=1",
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_train(*common, f"hydra.run.dir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = f"distilling from {dense_run}: soft targets at temperature 2, weight 0.5, every block's output at weight 1"
    assert said in proc.stdout + proc.stderr  # the run says what it distils from, once
    assert run_train(*common, f"hydra.run.dir={killed}", fault_at(11)).returncode == -9
    proc = run_train(*common, "trainer.resume=true", f"hydra.run.dir={killed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = summary_of(straight), summary_of(killed)
    for key in ("val_top1", "steps", "mask_digest"):
        assert a[key] == b[key], key
    logs = [json.loads(ln) for ln in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(m["teacher_ms"] > 0 for m in logs if "train_loss" in m)
    ckpt = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    assert not any("teacher" in k for k in ckpt) and not any("teacher" in k for k in ckpt["model"])
    # started from the dense run: much better than chance after 16 steps at rising sparsity
    assert a["val_top1"] >= summary_of(dense_run)["val_top1"] - 25


def test_teacher_is_frozen_and_must_predict_the_students_classes(dense_run) -> None:
    from superblock.engine.distill import load_teacher

    spec = {"name": "micro_vit", "num_classes": 10, "image_size": 32, "pretrained": None}
    teacher = load_teacher(dense_run, spec, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="predicts 10 classes, the student 5"):
        load_teacher(dense_run, {**spec, "num_classes": 5}, torch.device("cpu"))


def _refit_line(out: str) -> tuple[int, float, float]:
    import re

    m = re.search(r"refit (\d+) masked weights in \d+ groups .* error on the calibration batches (\S+) -> (\S+)", out)
    assert m, out[-2000:]
    return int(m.group(1)), float(m.group(2)), float(m.group(3))


def test_oneshot_refits_the_kept_weights_of_a_pretrained_run(dense_run, tmp_path) -> None:
    """sparsity=oneshot from a dense run: activation-aware masks at the final level from step 0 and the kept weights
    refit to the dense outputs (torchvision's attention: in_proj and out_proj), then the masks stay fixed."""
    common = [*SMOKE, f"model.pretrained={dense_run}", "sparsity=oneshot", "sparsity.calibration_batches=2"]
    proc = run_train(*common, "trainer.max_steps=1", "optim.lr=1e-30", f"hydra.run.dir={tmp_path / 'refit'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, before, after = _refit_line(proc.stdout)
    assert n == 8 and after < before  # 2 layers x (in_proj, out_proj, fc1, fc2)
    assert "calibrate on the model as it starts" not in proc.stdout  # it starts from the dense run
    plain = run_train(
        *common,
        "trainer.max_steps=1",
        "optim.lr=1e-30",
        "sparsity.reconstruct=false",
        f"hydra.run.dir={tmp_path / 'cut'}",
    )
    assert plain.returncode == 0 and "masked weights in" not in plain.stdout
    refit, cut = (
        torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True)["model"] for d in ("refit", "cut")
    )
    name = next(k for k in refit if k.endswith("mlp.0.parametrizations.weight.original"))
    assert not torch.equal(refit[name], cut[name])  # the weights moved
    masks = [run[name.replace("weight.original", "weight.0.mask")] for run in (refit, cut)]
    assert masks[0].sum() == masks[1].sum()  # as many tiles kept (the refit chose which: sparsity.select)


def test_oneshot_from_random_weights_says_it_is_meant_for_pretrained_models(tmp_path) -> None:
    proc = run_train(*SMOKE, "sparsity=oneshot", "sparsity.calibration_batches=1", "trainer.max_steps=1",
                     f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: sparsity.reconstruct and sparsity.score_init=activation calibrate on the model as it starts" in (
        proc.stdout
    )
