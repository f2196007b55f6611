"""Training-engine correctness that only shows with real data, worker processes, several ranks or bad numbers:
per-rank augmentation, exact resume with workers + RandAugment, the logged loss window, non-finite gradients."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from PIL import Image

from superblock.config import to_config
from superblock.data import build_datasets, build_loaders, usable_workers
from superblock.engine.distributed import DistInfo
from superblock.engine.trainer import Trainer, TrainingDiverged, rank_seed, seed_everything

sys.path.insert(0, str(Path(__file__).parent))
from test_real_images import write_jpeg_tree  # noqa: E402
from test_train import ROOT, SMOKE, fault_at, run_train, summary_of  # noqa: E402


def _same_image_tree(root: Path, n: int = 16) -> None:
    """Every file holds the same picture: two samples can only differ by their augmentation."""
    img = Image.effect_mandelbrot((48, 48), (-2.0, -1.2, 0.8, 1.2), 60).convert("RGB")
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n // 2):
                img.save(root / split / cls / f"{i}.png")


def _rank_batches(rank: int, world: int, port: int, root: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        bundle = build_datasets("imagefolder", root=root, image_size=32, randaugment="rand-m9-mstd0.5-inc1")
        train, _, sampler = build_loaders(
            bundle, batch_size=4, num_workers=1, seed=0, distributed=True, pin_memory=False
        )
        sampler.set_epoch(0)
        images, _ = next(iter(train))
        seed_everything(rank_seed(0, rank))  # what the Trainer does once the model is built
        queue.put((rank, images, torch.rand(4)))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_draw_different_augmentations(tmp_path) -> None:
    _same_image_tree(tmp_path)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank_batches, args=(r, 2, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (imgs, draws)) for r, imgs, draws in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (img0, rand0), (img1, rand1) = got[0], got[1]
    for a, b in zip(img0, img1, strict=True):  # identical source pictures, different augmentations
        assert not torch.allclose(a, b)
    assert not torch.equal(rand0, rand1)  # dropout / drop-path / mixup streams differ too
    assert rank_seed(0, 0) == 0  # a single process keeps the run's seed


def test_workers_are_capped_at_the_cpus_this_process_may_use(monkeypatch) -> None:
    cpus = len(os.sched_getaffinity(0))
    assert usable_workers(0) == 0 and usable_workers(10_000) == cpus
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cpus))
    assert usable_workers(8) == 1


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_with_workers_and_randaugment_on_jpegs(tmp_path) -> None:
    data = tmp_path / "data"
    write_jpeg_tree(data, per_class=32)
    common = [
        *SMOKE,
        "data=imagefolder",
        f"data.root={data}",
        "data.image_size=32",
        "data.num_workers=2",
        "data.batch_size=16",
        "data.randaugment=rand-m9-mstd0.5-inc1",
        "trainer.max_epochs=2",
        "trainer.checkpoint_every_steps=2",
        "trainer.log_every_steps=1",
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_train(*common, f"hydra.run.dir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_train(*common, f"hydra.run.dir={killed}", fault_at(9))
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed in epoch 2 (6 steps/epoch), last checkpoint at 8
    proc = run_train(*common, "trainer.resume=true", f"hydra.run.dir={killed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = summary_of(straight), summary_of(killed)
    for key in ("val_top1", "val_top5", "steps", "mask_digest"):
        assert a[key] == b[key], key
    la = {m["step"]: m["train_loss"] for m in _jsonl(straight) if "train_loss" in m}
    lb = {m["step"]: m["train_loss"] for m in _jsonl(killed) if "train_loss" in m}
    assert la == lb


def test_logged_loss_is_the_mean_over_the_steps_in_the_window(tmp_path) -> None:
    # 8 steps per epoch, logs every 3: epoch 2's first window holds step 9 alone (it restarts with the epoch).
    common = [*SMOKE, "trainer.max_epochs=2", "sparsity=none"]
    every1, every3 = tmp_path / "every1", tmp_path / "every3"
    assert run_train(*common, "trainer.log_every_steps=1", f"hydra.run.dir={every1}").returncode == 0
    assert run_train(*common, "trainer.log_every_steps=3", f"hydra.run.dir={every3}").returncode == 0
    one = {m["step"]: m["train_loss"] for m in _jsonl(every1) if "train_loss" in m}
    three = {m["step"]: m["train_loss"] for m in _jsonl(every3) if "train_loss" in m}
    assert sorted(three) == [3, 6, 9, 12, 15, 16]
    assert three[9] == pytest.approx(one[9], rel=1e-5)  # was one[9] / 3: divided by step % 3 or 3
    assert three[12] == pytest.approx((one[10] + one[11] + one[12]) / 3, rel=1e-5)
    assert three[3] == pytest.approx((one[1] + one[2] + one[3]) / 3, rel=1e-5)


def _trainer(run_dir: Path, *overrides: str) -> Trainer:
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*SMOKE, *overrides])
    return Trainer(to_config(cfg), run_dir, DistInfo(0, 1, 0, torch.device("cpu")), {})


def test_a_nonfinite_gradient_stops_the_run_before_it_reaches_a_checkpoint(tmp_path) -> None:
    trainer = _trainer(
        tmp_path,
        "trainer.checkpoint_every_steps=1",
        "trainer.log_every_steps=100",
        "trainer.grad_clip=null",
        "trainer.max_epochs=1",
    )
    head = trainer.model.heads.head.weight
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:  # finite loss, NaN gradient at the 4th backward
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 4 else grad

    head.register_hook(poison)
    with pytest.raises(TrainingDiverged, match="gradient became non-finite"):
        trainer.fit()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 3
    weights = [v for v in ckpt["model"].values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert weights and all(torch.isfinite(v).all() for v in weights)
