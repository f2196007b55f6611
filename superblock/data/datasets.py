"""build_datasets: a dataset name and options -> a :class:`DataBundle` (synthetic, imagefolder, cifar10/100, text)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from superblock.data.bundle import DataBundle
from superblock.data.folders import _cifar_bundle, _imagefolder_bundle
from superblock.data.synthetic import _synthetic_bundle
from superblock.data.text import text_bundle

DATASET_NAMES = ("synthetic", "imagefolder", "cifar10", "cifar100", "text")


def build_datasets(
    name: str,
    root: str | None = None,
    image_size: int | None = None,
    download: bool = False,
    train_size: int | None = None,
    val_size: int | None = None,
    seed: int = 0,
    randaugment: str | None = None,
    num_classes: int | None = None,
    val_only: bool = False,
    augment: dict[str, Any] | None = None,
    seq_len: int | None = None,
    tokenizer: str | None = None,
    max_bytes: int | None = None,
    task: str | None = None,
    val_max_bytes: int | None = None,
) -> DataBundle:
    """Build the train and val datasets of ``name`` (one of :data:`DATASET_NAMES`).

    ``image_size=None`` uses the dataset's natural size (32 for synthetic/CIFAR, 224 for imagefolder).
    ``train_size`` / ``val_size`` cap the splits (synthetic: set them) with a seeded random subset, for
    quick runs. ``randaugment`` is a timm RandAugment string such as ``rand-m9-mstd0.5-inc1`` or
    ``torchvision``; it applies to the training split of image datasets only. ``num_classes`` only
    applies to synthetic data (2..10). ``val_only`` builds (and needs on disk) only the validation split,
    e.g. to evaluate on a val-only copy of ImageNet. ``augment`` sets the image-folder transforms
    (:func:`image_transforms`).

    ``text`` (:func:`text_bundle`) reads ``root`` (``None``: the Python stdlib's own source) with ``tokenizer``
    (``None``: UTF-8 bytes; else a local tokenizer directory), ``max_bytes`` of it (``val_max_bytes`` of it for
    validation, when set), into ``seq_len``-token samples
    for ``task`` (``causal_lm``, ``sequence_classification`` or ``None``: from the layout). Its caps are evenly
    spaced, not seeded; the image arguments (``image_size``, ``download``, ``randaugment``, ``augment``) do not
    apply to it, and the text ones apply only to it.
    """
    for label, value in (("train_size", train_size), ("val_size", val_size)):
        if value is not None and value < 1:
            raise ValueError(f"data.{label} must be >= 1, got {value}")
    if name == "synthetic":
        bundle = _synthetic_bundle(image_size, train_size, val_size, seed, num_classes)
        bundle.train = None if val_only else bundle.train
        return bundle
    if num_classes is not None:
        raise ValueError(f"num_classes is fixed by the {name} dataset; only synthetic data takes it")
    if name == "text":
        return text_bundle(root, seq_len, tokenizer, max_bytes, train_size, val_size, task, val_only, val_max_bytes)
    if name == "imagefolder":
        bundle = _imagefolder_bundle(root, image_size or 224, randaugment, val_only, augment)
    elif name in ("cifar10", "cifar100"):
        bundle = _cifar_bundle(name, root, image_size or 32, download, randaugment, val_only)
    else:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    bundle.train = None if bundle.train is None else _seeded_subset(bundle.train, train_size, seed)
    bundle.val = _seeded_subset(bundle.val, val_size, seed + 1)
    return bundle


def _seeded_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    n = len(dataset)  # type: ignore[arg-type]
    if size is None or size >= n:
        return dataset
    # A random (not leading) subset: ImageFolder and CIFAR files are sorted by class.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    return Subset(dataset, sorted(order.tolist()))
