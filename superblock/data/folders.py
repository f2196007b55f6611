"""Datasets on disk: an ImageFolder tree (``<root>/train``, ``<root>/val``) and CIFAR-10/100 (torchvision)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.error import URLError

from torch.utils.data import Dataset

from superblock.data.bundle import DataBundle
from superblock.data.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _randaugment,
    image_transforms,
    resolve_augment,
)

log = logging.getLogger(__name__)


def _imagefolder_bundle(
    root: str | None, image_size: int, randaugment: str | None, val_only: bool, augment: dict[str, Any] | None
) -> DataBundle:
    from torchvision.datasets import ImageFolder

    layout = "expected <root>/train/<class>/<image> and <root>/val/<class>/<image>"
    if not root:
        raise ValueError(f"data.root is required for imagefolder data ({layout})")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ValueError(f"data.root {base} does not exist or is not a directory ({layout})")
    for split in ("val",) if val_only else ("train", "val"):
        if not (base / split).is_dir():
            raise ValueError(f"missing {base / split} ({layout})")
    settings, randaugment, note = resolve_augment(augment, randaugment, image_size)
    log.info("%s", note)
    train_tf, val_tf = image_transforms(image_size, IMAGENET_MEAN, IMAGENET_STD, randaugment, settings)
    val = ImageFolder(str(base / "val"), transform=val_tf)
    if val_only:
        return DataBundle(
            None, val, len(val.classes), image_size, IMAGENET_MEAN, IMAGENET_STD, val.classes, transforms=note
        )
    train = ImageFolder(str(base / "train"), transform=train_tf)
    if train.classes != val.classes:
        raise ValueError(
            f"{base / 'train'} and {base / 'val'} have different class folders "
            f"({len(train.classes)} vs {len(val.classes)}); labels would not line up"
        )
    return DataBundle(
        train, val, len(train.classes), image_size, IMAGENET_MEAN, IMAGENET_STD, train.classes, transforms=note
    )


def _cifar_bundle(
    name: str, root: str | None, image_size: int, download: bool, randaugment: str | None, val_only: bool = False
) -> DataBundle:
    from torchvision import datasets
    from torchvision import transforms as T

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    base = str(Path(root or f"data/{name}").expanduser())
    resize = [] if image_size == 32 else [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC)]
    # Classic CIFAR augmentation (pad-and-crop + flip) at the native 32 px, then resize for bigger models.
    train_tf = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            *resize,
            *_randaugment(randaugment, image_size, CIFAR_MEAN),
            T.ToTensor(),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )
    val_tf = T.Compose([*resize, T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    val = _open_cifar(cls, name, base, False, download, val_tf)
    train = None if val_only else _open_cifar(cls, name, base, True, download, train_tf)
    return DataBundle(train, val, len(val.classes), image_size, CIFAR_MEAN, CIFAR_STD, list(train.classes))


def _open_cifar(cls: type, name: str, root: str, train: bool, download: bool, transform: Callable) -> Dataset:
    try:
        return cls(root, train=train, download=download, transform=transform)
    except (URLError, ConnectionError, TimeoutError, socket.gaierror) as err:
        raise RuntimeError(
            f"could not download {name} into {root}: no network is reachable ({err}). Copy the dataset "
            f"(the extracted cifar-*-python folder) into {root} and run with data.download=false"
        ) from err
    except RuntimeError as err:
        if download:
            raise
        # torchvision says "Dataset not found or corrupted" when the files are missing.
        raise ValueError(
            f"{name} not found under {os.path.abspath(root)} ({err}). Pass data.download=true to fetch it "
            f"(needs network), or point data.root at an existing copy"
        ) from err
