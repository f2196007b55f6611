"""superblock.data: procedural data is deterministic and learnable; real datasets fail with actionable errors."""

from __future__ import annotations

import random
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from superblock.data import (
    SYNTHETIC_CLASSES,
    DataBundle,
    EpochShuffleSampler,
    SeededSamples,
    ShardSampler,
    SyntheticShapes,
    build_datasets,
    build_loaders,
    calibration_loader,
)

ROOT = Path(__file__).resolve().parents[2]


def _stack(ds: SyntheticShapes) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(images), torch.tensor(labels)


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_types() -> None:
    ds = SyntheticShapes(40, image_size=32, seed=0)
    image, label = ds[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    assert ds.classes == list(SYNTHETIC_CLASSES)
    assert SyntheticShapes(4, image_size=48)[0][0].shape == (3, 48, 48)


def test_synthetic_is_deterministic_per_seed_and_index() -> None:
    a, b = SyntheticShapes(30, seed=0), SyntheticShapes(30, seed=0)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, SyntheticShapes(30, seed=1).images)
    # Image i does not depend on how many images the split has.
    assert torch.equal(SyntheticShapes(12, seed=0).images, a.images[:12])


def test_synthetic_train_and_val_differ() -> None:
    bundle = build_datasets("synthetic", train_size=50, val_size=50, seed=0)
    assert not torch.equal(bundle.train.images, bundle.val.images)
    # No val image equals any train image.
    train = bundle.train.images.flatten(1).float()
    val = bundle.val.images.flatten(1).float()
    assert torch.cdist(val, train).min() > 0


def test_synthetic_labels_balanced() -> None:
    counts = torch.bincount(SyntheticShapes(1000, seed=3).targets, minlength=10)
    assert counts.min() == counts.max() == 100


def test_synthetic_is_not_a_colour_statistics_task() -> None:
    # Mean colour per class should be roughly the same: the class lives in the spatial structure.
    ds = SyntheticShapes(2000, seed=0)
    means = torch.stack([ds.images[ds.targets == c].float().mean() / 255 for c in range(10)])
    assert means.max() - means.min() < 0.08


def test_synthetic_subset_of_classes_and_bad_values() -> None:
    bundle = build_datasets("synthetic", train_size=20, val_size=10, num_classes=4)
    assert bundle.num_classes == 4 and int(bundle.train.targets.max()) == 3
    with pytest.raises(ValueError, match="classes"):
        build_datasets("synthetic", num_classes=11)
    with pytest.raises(ValueError, match="train_size"):
        build_datasets("synthetic", train_size=0)


def test_synthetic_is_learnable() -> None:
    """A tiny CNN beats chance (10%) by far after 80 steps: the labels follow the pictures."""
    torch.manual_seed(0)
    x, y = _stack(SyntheticShapes(1500, seed=0, split="train"))
    xv, yv = _stack(SyntheticShapes(300, seed=0, split="val"))
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(xv).argmax(1) == yv).float().mean().item()
    assert accuracy > 0.5


# -------------------------------------------------------------------------------------------- imagefolder


def _image_tree(root, classes=("cat", "dog"), per_class=3, size=(40, 30)) -> None:
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", size, (40 * c + i, 100, 200)).save(folder / f"{i}.png")


def test_imagefolder_loads_and_transforms_to_size(tmp_path) -> None:
    _image_tree(tmp_path)
    bundle = build_datasets("imagefolder", root=str(tmp_path), image_size=24)
    assert isinstance(bundle, DataBundle)
    assert bundle.num_classes == 2 and bundle.classes == ["cat", "dog"]
    assert len(bundle.train) == len(bundle.val) == 6
    assert bundle.train[0][0].shape == (3, 24, 24)
    assert bundle.val[5][0].shape == (3, 24, 24) and bundle.val[5][1] == 1


def test_imagefolder_randaugment_and_subset(tmp_path) -> None:
    _image_tree(tmp_path)
    bundle = build_datasets(
        "imagefolder", root=str(tmp_path), image_size=16, randaugment="rand-m9-mstd0.5-inc1", train_size=4
    )
    assert len(bundle.train) == 4
    assert bundle.train[0][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="randaugment"):
        build_datasets("imagefolder", root=str(tmp_path), randaugment="strong please")


def test_imagefolder_missing_root_or_split(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=str(missing)):
        build_datasets("imagefolder", root=str(missing))
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=r"val.*expected <root>/train"):
        build_datasets("imagefolder", root=str(tmp_path))
    with pytest.raises(ValueError, match="data.root is required"):
        build_datasets("imagefolder")


# ----------------------------------------------------------------------------------------------- cifar


def test_cifar_missing_without_download_explains_what_to_do(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"data.download=true.*data.root"):
        build_datasets("cifar10", root=str(tmp_path))


def test_cifar_download_offline_is_a_clear_runtime_error(tmp_path, monkeypatch) -> None:
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(RuntimeError, match="no network is reachable"):
        build_datasets("cifar100", root=str(tmp_path), download=True)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="synthetic, imagefolder, cifar10, cifar100"):
        build_datasets("imagenet22k")


# ---------------------------------------------------------------------------------------------- loaders


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochShuffleSampler(100, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == list(range(100))
    assert order(0, 1) != order(0, 0)
    assert order(1, 0) != order(0, 0)
    # Iterating other epochs first does not change an epoch's order (what a mid-epoch resume relies on).
    sampler = EpochShuffleSampler(100, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == order(0, 1)


def test_build_loaders_batches_and_resume_order() -> None:
    bundle = build_datasets("synthetic", train_size=70, val_size=30, seed=0)
    train, val, sampler = build_loaders(bundle, batch_size=16, seed=5, eval_batch_size=25)
    assert len(train) == 4  # drop_last
    assert [len(t) for _, t in val] == [25, 5]
    sampler.set_epoch(2)
    first = [t for _, t in train]
    sampler.set_epoch(2)
    again = [t for _, t in train]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    images, _ = next(iter(train))
    assert images.shape == (16, 3, 32, 32)


def test_build_loaders_rejects_tiny_splits() -> None:
    bundle = build_datasets("synthetic", train_size=10, val_size=10)
    with pytest.raises(ValueError, match="fewer than one batch"):
        build_loaders(bundle, batch_size=16)


def test_shard_sampler_covers_every_sample_once() -> None:
    shards = [list(ShardSampler(10, rank, 4)) for rank in range(4)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    assert [len(s) for s in shards] == [3, 3, 2, 2]  # uneven, never padded with repeats


def test_build_loaders_distributed(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        bundle = build_datasets("synthetic", train_size=64, val_size=20, seed=0)
        train, val, sampler = build_loaders(bundle, batch_size=8, seed=3, distributed=True)
        assert isinstance(sampler, torch.utils.data.DistributedSampler) and sampler.seed == 3
        sampler.set_epoch(1)
        assert len(train) == 8
        assert sum(len(t) for _, t in val) == 20
    finally:
        dist.destroy_process_group()


def test_skip_batches_resumes_the_epoch_without_reading_skipped_samples():
    from superblock.data import build_datasets, build_loaders, skip_batches

    bundle = build_datasets("synthetic", train_size=64, val_size=8, seed=3)
    train, _, sampler = build_loaders(bundle, batch_size=8, seed=3)
    sampler.set_epoch(2)
    full = [t.clone() for _, t in train]
    read = []

    class Spy(torch.utils.data.Dataset):
        def __len__(self):
            return len(bundle.train)

        def __getitem__(self, i):
            read.append(i)
            return bundle.train[i]

    spy = torch.utils.data.DataLoader(Spy(), batch_size=8, sampler=sampler, drop_last=True)
    rest = [t for _, t in skip_batches(spy, 3)]
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, full[3:], strict=True))
    assert len(read) == 8 * (len(full) - 3)


def test_val_only_imagefolder_needs_no_train_split(tmp_path) -> None:
    from superblock.data import build_val_loader

    _image_tree(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "train")
    with pytest.raises(ValueError, match="missing"):
        build_datasets("imagefolder", root=str(tmp_path), image_size=24)
    bundle = build_datasets("imagefolder", root=str(tmp_path), image_size=24, val_only=True)
    assert bundle.train is None and bundle.num_classes == 2 and len(bundle.val) == 6
    images, labels = next(iter(build_val_loader(bundle, batch_size=6)))
    assert images.shape == (6, 3, 24, 24) and labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_transforms_follow_the_augment_settings() -> None:
    from superblock.data import IMAGENET_MEAN, IMAGENET_STD, image_transforms

    train, val = image_transforms(
        32, IMAGENET_MEAN, IMAGENET_STD, None, {"hflip": 0.0, "scale": [0.9, 1.0], "crop_pct": 1.0}
    )
    names = [type(t).__name__ for t in train.transforms]
    assert "RandomHorizontalFlip" not in names and train.transforms[0].scale == (0.9, 1.0)
    assert val.transforms[0].size == 32  # no centre crop margin
    _, val = image_transforms(32, IMAGENET_MEAN, IMAGENET_STD, None)
    assert val.transforms[0].size == int(32 / 0.875)  # ImageNet's default
    with pytest.raises(ValueError, match="unknown data.augment keys"):
        image_transforms(32, IMAGENET_MEAN, IMAGENET_STD, None, {"flip": 0.0})
    train, _ = image_transforms(32, IMAGENET_MEAN, IMAGENET_STD, "torchvision", {"re_prob": 0.5})
    names = [type(t).__name__ for t in train.transforms]
    assert names.index("RandAugment") < names.index("MaybeToTensor") < names.index("RandomErasing")


def test_digits_tree_writer(tmp_path) -> None:
    pytest.importorskip("sklearn")
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_tree", ROOT / "scripts" / "digits_tree.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    counts = mod.write_digits_tree(tmp_path)
    assert counts == {"train": 1438, "val": 359}
    bundle = build_datasets("imagefolder", root=str(tmp_path), image_size=32, augment={"hflip": 0.0, "crop_pct": 1.0})
    assert bundle.num_classes == 10 and bundle.val[0][0].shape == (3, 32, 32)


def test_calibration_batches_are_fixed_shared_by_rank_and_move_nothing_of_the_run() -> None:
    """data.calibration_loader: the same batches whenever asked for, each rank its own share, and asking mid-epoch
    leaves the epoch's batches (persistent workers), the sampler and the process's RNG streams as they were."""
    bundle = build_datasets("synthetic", train_size=64, val_size=16, seed=0)
    train, _, sampler = build_loaders(bundle, batch_size=8, seed=3, num_workers=1)
    sampler.set_epoch(0)
    expected = [t for _, t in train]

    it = iter(train)
    got = [next(it)[1] for _ in range(2)]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = [(x, t) for x, t in calibration_loader(train, 2, seed=7)]
    again = [(x, t) for x, t in calibration_loader(train, 2, seed=7)]
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert (np.random.get_state()[1] == rng[2]).all()
    got += [t for _, t in it]  # the epoch goes on where it was
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))

    assert len(first) == 2 and all(x.shape[0] == 8 for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    other = [t for _, t in calibration_loader(train, 2, seed=8)]
    assert not all(torch.equal(a[1], b) for a, b in zip(first, other, strict=True))
    keys = [list(calibration_loader(train, 2, seed=7, rank=r, world_size=2).sampler) for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 16 and not set(keys[0]) & set(keys[1])


def test_calibration_batches_of_augmented_samples_draw_from_their_own_seeds() -> None:
    """A training split whose samples draw random numbers (augmentation): the calibration batches are the same on
    every call, and the process's torch RNG does not move."""

    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 32

        def __getitem__(self, i: int):
            return torch.rand(3) + i, i

    train = torch.utils.data.DataLoader(SeededSamples(Noisy(), seed=1), batch_size=4)
    state = torch.get_rng_state()
    a = [x for x, _ in calibration_loader(train, 3, seed=0)]
    b = [x for x, _ in calibration_loader(train, 3, seed=0)]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)) and len(a) == 3
