"""train.py through its real entry point: smoke run, resume after SIGKILL, DDP, bad configs, wandb offline."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.helpers.train import ROOT, SMOKE, fault_at, metrics_of, run_train, summary_of


def test_smoke_run_leaves_a_complete_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(*SMOKE, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.yaml", "checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    s = summary_of(run_dir)
    assert s["status"] == "completed" and s["steps"] == 8 and s["epochs"] == 1
    assert 0.0 <= s["val_top1"] <= 100.0
    assert s["mean_block_sparsity"] == pytest.approx(0.8, abs=0.02)
    assert all(name.endswith("weight") for name in s["block_sparsity"])
    assert s["params_kept"] < s["params_total"]
    assert "val top-1" in proc.stdout and f"run directory: {run_dir}" in proc.stdout
    lines = metrics_of(run_dir)
    assert any("train_loss" in ln for ln in lines) and any("val_top1" in ln for ln in lines)
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "lr_scheduler", "scaler", "rng", "progress", "model_spec", "sparsity_spec"):
        assert key in ckpt


def test_dense_run_has_no_masks(tmp_path):
    proc = run_train(*SMOKE, "sparsity=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(tmp_path)
    assert s["sparsity"] == 0.0 and s["block_size"] is None and s["params_kept"] == s["params_total"]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    common = [*SMOKE, "trainer.max_epochs=2", "trainer.checkpoint_every_steps=3", "trainer.log_every_steps=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_train(*common, f"hydra.run.dir={straight}").returncode == 0
    proc = run_train(*common, f"hydra.run.dir={killed}", fault_at(11))
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL mid-epoch 2, last checkpoint at step 9
    assert not (killed / "summary.json").exists()
    proc = run_train(*common, "trainer.resume=true", f"hydra.run.dir={killed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    a, b = summary_of(straight), summary_of(killed)
    for key in ("val_top1", "val_top5", "best_val_top1", "steps", "epochs", "mask_digest"):
        assert a[key] == b[key], key
    wa = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k in wa:
        if isinstance(wa[k], torch.Tensor):
            assert torch.equal(wa[k], wb[k]), k
    # metrics.jsonl has no duplicate steps from the killed attempt
    steps = [m["step"] for m in metrics_of(killed) if "train_loss" in m]
    assert steps == sorted(set(steps))


def test_two_process_ddp_on_cpu_keeps_masks_equal(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    proc = run_train(*SMOKE, "trainer.device=cpu", f"hydra.run.dir={tmp_path}", cmd=cmd, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(tmp_path)
    assert s["world_size"] == 2 and s["masks_equal_across_ranks"] is True
    assert s["steps"] == 4  # 256 images / (2 ranks x 32)
    # only rank 0 wrote a run dir (no stray per-rank Hydra dirs in the repo)
    assert not (ROOT / ".hydra").exists()


# Each mistake fails before any work with one line naming it. Two go through the real command line (the exit code,
# stderr, a mistake found only when the model is built); the rest through the same entry point in this process.
BAD_CONFIGS = [
    ("sparsity.level=1.5", "sparsity.level must be in [0, 1)"),
    ("sparsity.block_size=0", "block_size must be positive"),
    ("sparsity.targets=[mlpp]", "mlpp"),
    ("data=imagefolder", "data.root is required"),
    ("model.name=resnet999", "resnet999"),
    ("trainer.max_epochs=0", "trainer.max_epochs must be > 0"),
    ("optim.name=lamb", "optim.name='lamb' is not one of"),
]


@pytest.mark.parametrize(
    "override,message",
    [("sparsity.strict_blocks=true", "does not divide"), ("data.batch_size=abc", "data.batch_size")],
)
def test_bad_configs_fail_before_work_with_one_clear_line(tmp_path, override, message):
    extra = ["sparsity.block_size=24"] if "strict_blocks" in override else []
    proc = run_train(*SMOKE, *extra, override, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def train_in_process(*overrides: str) -> None:
    """train.py's entry point (train_main) in this process on the smoke preset and `overrides`; the torch thread
    count it sets is put back."""
    from hydra import compose, initialize_config_dir

    from superblock.cli import train_main

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*SMOKE, *overrides])
    threads = torch.get_num_threads()
    try:
        train_main(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("override,message", BAD_CONFIGS)
def test_bad_configs_fail_in_train_main_before_work(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exited:
        train_in_process(override, f"run_dir={tmp_path / 'run'}")
    err = capsys.readouterr().err
    assert exited.value.code != 0
    assert message in err and err.count("superblock: error:") == 1, err[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_key_is_rejected_by_hydra(tmp_path):
    proc = run_train(*SMOKE, "sparsity.levle=0.5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "levle" in proc.stderr


def test_wandb_offline_writes_its_files(tmp_path):
    proc = run_train(
        *SMOKE, "logger=wandb", "logger.mode=offline", f"hydra.run.dir={tmp_path}", env={"WANDB_DIR": str(tmp_path)}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].rglob("*.wandb"))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = run_train(
        *SMOKE,
        "optim.lr=1e25",
        "optim.warmup_epochs=0",
        "trainer.grad_clip=null",
        "trainer.log_every_steps=1",
        "trainer.checkpoint_every_steps=1",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 1
    assert "loss became nan" in proc.stderr and "last good checkpoint" in proc.stderr
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] >= 1 and all(
        torch.isfinite(v).all() for v in ckpt["model"].values() if isinstance(v, torch.Tensor) and v.is_floating_point()
    )
    s = summary_of(tmp_path)
    assert s["status"] == "failed" and "TrainingDiverged" in s["error"]


@pytest.mark.slow
def test_compiled_model_trains_and_checkpoints_plain_keys(tmp_path):
    proc = run_train(*SMOKE, "trainer.compile=true", f"hydra.run.dir={tmp_path}", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert summary_of(tmp_path)["mean_block_sparsity"] == pytest.approx(0.8, abs=0.02)


def test_throughput_leaves_out_the_time_checkpoints_take(tmp_path, monkeypatch):
    """A checkpoint every step, each made to take a second: the logged step times stay those of training (without
    the pause each window after a checkpoint held its second), and the checkpoints are all written."""
    import time

    from superblock.engine.trainer import Trainer

    save = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self, *a, **k: (time.sleep(1.0), save(self, *a, **k))[1])
    train_in_process("trainer.checkpoint_every_steps=1", "trainer.log_every_steps=1", f"run_dir={tmp_path / 'run'}")
    step_ms = [m["step_ms"] for m in metrics_of(tmp_path / "run") if "step_ms" in m]
    assert len(step_ms) == 8 and max(step_ms[1:]) < 700, step_ms  # a smoke step takes ~0.1 s on 2 cores
    assert summary_of(tmp_path / "run")["steps"] == 8 and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
