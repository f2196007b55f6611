"""The real image pipeline on real files: JPEGs on disk -> ImageFolder -> ViT transforms with timm's RandAugment
-> DataLoader with worker processes, for many batches, with the installed Pillow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from superblock.data import build_datasets, build_loaders, posterize_bits


def write_jpeg_tree(root, classes=("ant", "bee", "cow"), per_class=24, seed=0) -> None:
    """Photograph-like JPEGs of varied sizes and aspect ratios (smooth colour fields plus noise)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(2, per_class // 4))):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(24, 72)), int(rng.integers(24, 72))
                yy, xx = np.mgrid[0:h, 0:w]
                base = np.stack([(xx * (c + 1) * 3) % 256, (yy * 5 + 40 * c) % 256, (xx + yy) % 256], -1)
                img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.jpg", quality=85)


def test_posterize_accepts_zero_bits_like_older_pillow() -> None:
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert np.asarray(posterize_bits(img, 0)).max() == 0
    assert np.asarray(posterize_bits(img, 1)).tolist()[0][0] == [128, 0, 0]
    assert posterize_bits(img, 8) is img


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m10-n3-inc1"])
def test_imagenet_transforms_with_randaugment_on_jpegs_for_many_batches(tmp_path, spec) -> None:
    # m10 with the increasing policy asks posterize for 0 bits every time it is drawn (3 ops per image, 72 images
    # per epoch, 2 epochs): with Pillow >= 13 and timm's own posterize this raised "bits must be between ... 1 and 8".
    write_jpeg_tree(tmp_path)
    bundle = build_datasets("imagefolder", root=str(tmp_path), image_size=32, randaugment=spec)
    train, val, sampler = build_loaders(bundle, batch_size=8, num_workers=2, seed=0, pin_memory=False)
    batches = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for images, targets in train:
            assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
            assert torch.isfinite(images).all() and targets.max() < 3
            batches += 1
    assert batches == 2 * (72 // 8)
    assert sum(len(t) for _, t in val) == len(bundle.val)
