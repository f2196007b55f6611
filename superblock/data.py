"""Datasets, transforms and loaders.

``synthetic`` is a procedural, learnable image-classification task (no files, no downloads) so the default
run and every test work on a fresh laptop; ``imagefolder`` and ``cifar10``/``cifar100`` are the real ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import random
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# Fixed constants, not the data's statistics (its mean is ~0.3: dark backgrounds): for models trained from
# scratch any fixed affine map works, and these keep pixels within about [-1.7, 1.7].
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.3, 0.3, 0.3)

DATASET_NAMES = ("synthetic", "imagefolder", "cifar10", "cifar100")

# ---------------------------------------------------------------------------------------------------------
# Procedural shapes
# ---------------------------------------------------------------------------------------------------------

# Each image draws this many uniform numbers; the renderer maps them to position, size, colours, ... .
# Fixing the count keeps image i identical whatever the dataset size or the renderer's batching.
_NUM_PARAMS = 16
_SUPERSAMPLE = 2  # render at 2x and average down: smooth edges, so size and position vary continuously


def _disc(u: Tensor, v: Tensor, t: Tensor) -> Tensor:
    return u.square() + v.square() <= 1.0


def _ring(u: Tensor, v: Tensor, t: Tensor) -> Tensor:
    r2 = u.square() + v.square()
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _square(u: Tensor, v: Tensor, t: Tensor) -> Tensor:
    # 0.85 makes the square's area close to the disc's, so area alone does not separate the two.
    return torch.maximum(u.abs(), v.abs()) <= 0.85


def _triangle(u: Tensor, v: Tensor, t: Tensor) -> Tensor:
    # Image rows grow downwards, so the apex (v = -1) points up and the base is the row v = 0.6.
    return (v <= 0.6) & (math.sqrt(3.0) * u.abs() - v <= 1.0)


def _cross(u: Tensor, v: Tensor, t: Tensor) -> Tensor:
    arm, long = 0.3, 1.0
    return ((u.abs() <= arm) & (v.abs() <= long)) | ((v.abs() <= arm) & (u.abs() <= long))


def _l_shape(u: Tensor, v: Tensor, t: Tensor) -> Tensor:
    inside = (u.abs() <= 1.0) & (v.abs() <= 1.0)
    return inside & ((u <= -0.35) | (v >= 0.35))


def _stripes(coord: Tensor, period: Tensor, phase: Tensor) -> Tensor:
    return torch.sin(2 * math.pi * (coord / period + phase)) > 0


def _texture_patch(u: Tensor, v: Tensor) -> Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 1.0


def _hstripes(u: Tensor, v: Tensor, t: Tensor) -> Tensor:
    return _texture_patch(u, v) & _stripes(v, t[:, 0], t[:, 1])


def _vstripes(u: Tensor, v: Tensor, t: Tensor) -> Tensor:
    return _texture_patch(u, v) & _stripes(u, t[:, 0], t[:, 1])


def _dstripes(u: Tensor, v: Tensor, t: Tensor) -> Tensor:
    # Either diagonal, so the class is "diagonal", not one specific angle a single filter could catch.
    sign = torch.where(t[:, 2] < 0.5, -1.0, 1.0)
    return _texture_patch(u, v) & _stripes((u + sign * v) / math.sqrt(2.0), t[:, 0], t[:, 1])


def _checker(u: Tensor, v: Tensor, t: Tensor) -> Tensor:
    # Cells of a checkerboard at the stripes' period would be 1-2 px, i.e. noise; use 1.5x the period.
    period = 1.5 * t[:, 0]
    a = torch.sin(2 * math.pi * (u / period + t[:, 1]))
    b = torch.sin(2 * math.pi * (v / period + t[:, 1]))
    return _texture_patch(u, v) & (a * b > 0)


# (name, mask function). A mask function gets the pixel coordinates (u, v) in the shape's frame (unit = its
# radius) and texture parameters t [N, 3, 1, 1] (period in radius units, phase, variant) and returns the
# object's pixels. Every class keeps its orientation up to a small jitter: a rotated horizontal stripe
# pattern would be another class, and fixed orientations keep the task within a small ViT's reach in the
# default run's few hundred steps.
_SHAPES: tuple[tuple[str, Callable[[Tensor, Tensor, Tensor], Tensor]], ...] = (
    ("disc", _disc),
    ("square", _square),
    ("triangle", _triangle),
    ("cross", _cross),
    ("ring", _ring),
    ("hstripes", _hstripes),
    ("vstripes", _vstripes),
    ("dstripes", _dstripes),
    ("checker", _checker),
    ("l_shape", _l_shape),
)
SYNTHETIC_CLASSES = tuple(name for name, _ in _SHAPES)


def _image_seed(seed: int, split: str, index: int) -> int:
    # Python's hash() is salted per process; blake2b gives the same image in every process and on every rank.
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _draw_randomness(seed: int, split: str, indices: range, image_size: int) -> tuple[Tensor, Tensor]:
    """Per-image uniform parameters [N, _NUM_PARAMS] and pixel noise [N, 3, H, W], each from its own seed."""
    g = torch.Generator()
    params = torch.empty(len(indices), _NUM_PARAMS)
    noise = torch.empty(len(indices), 3, image_size, image_size)
    for row, index in enumerate(indices):
        g.manual_seed(_image_seed(seed, split, index))
        params[row] = torch.rand(_NUM_PARAMS, generator=g)
        noise[row] = torch.randn(3, image_size, image_size, generator=g)
    return params, noise


def _lerp(unit: Tensor, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * unit


def _colours(p: Tensor) -> tuple[Tensor, Tensor]:
    """Background and foreground colours [N, 3], random hue, the object always the brighter one.

    A fixed figure/ground polarity lets a small ViT learn edge detectors in a few hundred steps; with both
    polarities every detector must be learnt twice, which mostly slows training, not the task's structure.
    """
    bg = _lerp(p[:, 6:9], 0.0, 0.45)
    fg = _lerp(p[:, 9:12], 0.55, 1.0)
    return bg, fg


def render_shapes(labels: Tensor, params: Tensor, noise: Tensor, image_size: int) -> Tensor:
    """Draw one shape per image. Returns float images in [0, 1], shape [N, 3, image_size, image_size]."""
    n = labels.shape[0]
    size = image_size * _SUPERSAMPLE
    # Pixel-centre coordinates in units of the final image's pixels.
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / _SUPERSAMPLE
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")

    p = params
    radius = _lerp(p[:, 2], 0.17, 0.32) * image_size  # 5.4-10 px at 32 px
    margin = 0.6 * radius  # lets shapes touch the border but keeps most of each one in view
    cx = margin + p[:, 0] * (image_size - 2 * margin)
    cy = margin + p[:, 1] * (image_size - 2 * margin)
    angle = _lerp(p[:, 3], -0.2, 0.2)  # radians

    dx = xs - cx[:, None, None]
    dy = ys - cy[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    r = radius[:, None, None]
    u = (dx * cos + dy * sin) / r
    v = (-dx * sin + dy * cos) / r

    # Stripe period 2.5-4 px: coarser than the noise, fine enough for several stripes per object.
    period_px = _lerp(p[:, 4], 2.5, 4.0)
    tex = torch.stack([period_px / radius, p[:, 5], p[:, 13]], dim=1)[:, :, None, None]

    mask = torch.zeros(n, size, size)
    for cls, (_, fn) in enumerate(_SHAPES):
        sel = labels == cls
        if sel.any():
            mask[sel] = fn(u[sel], v[sel], tex[sel]).float()
    mask = torch.nn.functional.avg_pool2d(mask[:, None], _SUPERSAMPLE)  # [N, 1, H, W], soft edges

    bg, fg = _colours(p)
    # A smooth background gradient, so "mean colour of the border" does not locate the object either.
    grad_dir = p[:, 14] * 2 * math.pi
    half = image_size / 2
    coord = torch.arange(image_size, dtype=torch.float32) - half + 0.5
    gy, gx = torch.meshgrid(coord, coord, indexing="ij")
    ramp = (gx * torch.cos(grad_dir)[:, None, None] + gy * torch.sin(grad_dir)[:, None, None]) / half
    background = bg[:, :, None, None] + 0.15 * ramp[:, None]
    images = background + mask * (fg - bg)[:, :, None, None]
    sigma = _lerp(p[:, 12], 0.04, 0.16)[:, None, None, None]
    return (images + sigma * noise).clamp_(0.0, 1.0)


class SyntheticShapes(Dataset):
    """Procedural shape / texture classification; image ``i`` is a pure function of ``(seed, split, i)``.

    Classes differ only in spatial structure (outline, hole, corners, stripe orientation, ...); position,
    size, colours, background gradient and noise are random per image, so colour statistics alone do not
    identify a class. The split is rendered in one vectorised pass on first access (about 2 s for 20k
    images at 32x32 on 2 cores) and kept in memory as uint8; lazily, so building a bundle only to evaluate
    does not pay for the training split.
    """

    def __init__(
        self,
        size: int,
        image_size: int = 32,
        num_classes: int = 10,
        seed: int = 0,
        split: str = "train",
        mean: tuple[float, ...] = SYNTHETIC_MEAN,
        std: tuple[float, ...] = SYNTHETIC_STD,
    ) -> None:
        if not 2 <= num_classes <= len(_SHAPES):
            raise ValueError(
                f"synthetic data has 2..{len(_SHAPES)} classes ({', '.join(SYNTHETIC_CLASSES)}), got {num_classes}"
            )
        if size < 1 or image_size < 8:
            raise ValueError(f"synthetic data needs size >= 1 and image_size >= 8, got {size}, {image_size}")
        self.size, self.image_size, self.num_classes = size, image_size, num_classes
        self.seed, self.split = seed, split
        self.classes = list(SYNTHETIC_CLASSES[:num_classes])
        # Round-robin labels: exactly balanced, and the label of image i never depends on the split size.
        self.targets = torch.arange(size) % num_classes
        self._mean = torch.tensor(mean).view(3, 1, 1)
        self._std = torch.tensor(std).view(3, 1, 1)
        self._images: Tensor | None = None

    @property
    def images(self) -> Tensor:
        """All images as uint8 [N, 3, H, W], rendered on first use."""
        if self._images is None:
            self._images = self._render()
        return self._images

    def _render(self, chunk: int = 2048) -> Tensor:
        # Chunks bound the float working set (the 2x supersampled grids) to a few tens of MB.
        out = torch.empty(self.size, 3, self.image_size, self.image_size, dtype=torch.uint8)
        for start in range(0, self.size, chunk):
            idx = range(start, min(start + chunk, self.size))
            params, noise = _draw_randomness(self.seed, self.split, idx, self.image_size)
            imgs = render_shapes(self.targets[idx.start : idx.stop], params, noise, self.image_size)
            out[idx.start : idx.stop] = (imgs * 255).round_().to(torch.uint8)
        return out

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = (self.images[index].float() / 255 - self._mean) / self._std
        return image, int(self.targets[index])


# ---------------------------------------------------------------------------------------------------------
# Bundles of datasets
# ---------------------------------------------------------------------------------------------------------

SYNTHETIC_TRAIN_SIZE = 12_000
SYNTHETIC_VAL_SIZE = 2_000


@dataclass
class DataBundle:
    """Train / val datasets plus what the model and the reports need to know about them (train is None for an
    evaluation-only bundle: ``build_datasets(..., val_only=True)``)."""

    train: Dataset | None
    val: Dataset
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None = None


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
) -> DataBundle:
    """Build the train and val datasets of ``name`` (one of :data:`DATASET_NAMES`).

    ``image_size=None`` uses the dataset's natural size (32 for synthetic/CIFAR, 224 for imagefolder).
    ``train_size`` / ``val_size`` cap the splits (synthetic: set them) with a seeded random subset, for
    quick runs. ``randaugment`` is a timm RandAugment string such as ``rand-m9-mstd0.5-inc1`` or
    ``torchvision``; it applies to the training split of image datasets only. ``num_classes`` only
    applies to synthetic data (2..10). ``val_only`` builds (and needs on disk) only the validation split,
    e.g. to evaluate on a val-only copy of ImageNet. ``augment`` sets the image-folder transforms
    (:func:`image_transforms`).
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
    if name == "imagefolder":
        bundle = _imagefolder_bundle(root, image_size or 224, randaugment, val_only, augment)
    elif name in ("cifar10", "cifar100"):
        bundle = _cifar_bundle(name, root, image_size or 32, download, randaugment, val_only)
    else:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    bundle.train = None if bundle.train is None else _seeded_subset(bundle.train, train_size, seed)
    bundle.val = _seeded_subset(bundle.val, val_size, seed + 1)
    return bundle


def _synthetic_bundle(
    image_size: int | None, train_size: int | None, val_size: int | None, seed: int, num_classes: int | None
) -> DataBundle:
    size, classes = image_size or 32, num_classes or len(SYNTHETIC_CLASSES)
    # The split name is part of every image's seed, so train and val never share an image.
    train = SyntheticShapes(train_size or SYNTHETIC_TRAIN_SIZE, size, classes, seed, "train")
    val = SyntheticShapes(val_size or SYNTHETIC_VAL_SIZE, size, classes, seed, "val")
    return DataBundle(train, val, classes, size, SYNTHETIC_MEAN, SYNTHETIC_STD, list(train.classes))


def _seeded_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    n = len(dataset)  # type: ignore[arg-type]
    if size is None or size >= n:
        return dataset
    # A random (not leading) subset: ImageFolder and CIFAR files are sorted by class.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    return Subset(dataset, sorted(order.tolist()))


def _randaugment(spec: str | None, image_size: int, mean: tuple[float, ...]) -> list[Callable]:
    if not spec:
        return []
    if spec == "torchvision":
        from torchvision.transforms import RandAugment

        return [RandAugment()]
    if spec.startswith("rand"):
        from timm.data.auto_augment import rand_augment_transform

        # Same hparams as timm's training transforms: fill with the mean colour, translate up to 45%.
        hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
        return [_pillow13_safe(rand_augment_transform(spec, hparams))]
    raise ValueError(
        f"data.randaugment={spec!r} is not understood: use a timm string like 'rand-m9-mstd0.5-inc1', "
        "'torchvision', or null"
    )


def posterize_bits(img, bits_to_keep: int, **_kwargs):
    """timm's posterize, also for 0 bits: Pillow 13 refuses ``ImageOps.posterize(img, 0)``.

    timm's increasing-severity policy (``...-inc1``) asks for 0 kept bits at magnitude 10 (reached with
    ``mstd`` noise); older Pillow mapped every pixel to 0 then, so that is what 0 bits means here too.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _v: 0)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow13_safe(transform: Callable) -> Callable:
    """Swap timm's posterize op for :func:`posterize_bits` in a timm RandAugment (module-level: picklable)."""
    from timm.data import auto_augment

    for op in getattr(transform, "ops", []):
        if getattr(op, "aug_fn", None) is auto_augment.posterize:
            op.aug_fn = posterize_bits
    return transform


AUGMENT_DEFAULTS: dict[str, Any] = {
    "scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "vflip": 0.0, "color_jitter": None,
    "re_prob": 0.0, "crop_pct": 0.875, "interpolation": "bicubic",
}


def image_transforms(
    image_size: int, mean: tuple[float, ...], std: tuple[float, ...], randaugment: str | None,
    augment: dict[str, Any] | None = None,
) -> tuple[Callable, Callable]:
    """(train, eval) transforms from timm's factory; `augment` overrides :data:`AUGMENT_DEFAULTS` (ImageNet's
    recipe: random-resized crops of 8-100% of the area, horizontal flips, eval centre crop of 0.875).

    ``randaugment``: a timm string (``rand-m9-mstd0.5-inc1``), ``torchvision`` or None."""
    from timm.data.transforms_factory import transforms_imagenet_eval, transforms_imagenet_train

    unknown = set(augment or {}) - set(AUGMENT_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown data.augment keys {sorted(unknown)}: use {sorted(AUGMENT_DEFAULTS)}")
    a = {**AUGMENT_DEFAULTS, **(augment or {})}
    timm_aa = randaugment if randaugment and randaugment != "torchvision" else None
    if randaugment and not (randaugment == "torchvision" or randaugment.startswith("rand")):
        _randaugment(randaugment, image_size, mean)  # raises the clear error
    train = transforms_imagenet_train(
        image_size, scale=tuple(a["scale"]), ratio=tuple(a["ratio"]), hflip=a["hflip"], vflip=a["vflip"],
        color_jitter=a["color_jitter"], auto_augment=timm_aa, interpolation=a["interpolation"],
        mean=mean, std=std, re_prob=a["re_prob"],
    )
    if randaugment == "torchvision":  # on the PIL image, before ToTensor
        at = next(i for i, t in enumerate(train.transforms) if "ToTensor" in type(t).__name__)
        train.transforms[at:at] = _randaugment(randaugment, image_size, mean)
    for t in train.transforms:
        _pillow13_safe(t)
    interp = "bicubic" if a["interpolation"] == "random" else a["interpolation"]
    val = transforms_imagenet_eval(image_size, crop_pct=a["crop_pct"], interpolation=interp, mean=mean, std=std)
    return train, val


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
    train_tf, val_tf = image_transforms(image_size, IMAGENET_MEAN, IMAGENET_STD, randaugment, augment)
    val = ImageFolder(str(base / "val"), transform=val_tf)
    if val_only:
        return DataBundle(None, val, len(val.classes), image_size, IMAGENET_MEAN, IMAGENET_STD, val.classes)
    train = ImageFolder(str(base / "train"), transform=train_tf)
    if train.classes != val.classes:
        raise ValueError(
            f"{base / 'train'} and {base / 'val'} have different class folders "
            f"({len(train.classes)} vs {len(val.classes)}); labels would not line up"
        )
    return DataBundle(train, val, len(train.classes), image_size, IMAGENET_MEAN, IMAGENET_STD, train.classes)


def _cifar_bundle(
    name: str, root: str | None, image_size: int, download: bool, randaugment: str | None, val_only: bool = False
) -> DataBundle:
    from torchvision import datasets
    from torchvision import transforms as T

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    base = str(Path(root or f"data/{name}").expanduser())
    resize = [] if image_size == 32 else [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC)]
    # Classic CIFAR augmentation (pad-and-crop + flip) at the native 32 px, then resize for bigger models.
    train_tf = T.Compose([
        T.RandomCrop(32, padding=4),
        T.RandomHorizontalFlip(),
        *resize,
        *_randaugment(randaugment, image_size, CIFAR_MEAN),
        T.ToTensor(),
        T.Normalize(CIFAR_MEAN, CIFAR_STD),
    ])
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


# ---------------------------------------------------------------------------------------------------------
# Samplers and loaders
# ---------------------------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    # Mixed, not added: seed + epoch would give runs with seeds 0 and 1 the same orders shifted by one epoch.
    digest = hashlib.blake2b(f"sampler/{seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class EpochShuffleSampler(Sampler[int]):
    """Shuffled indices whose order is a pure function of ``(seed, epoch)``.

    The training loop calls ``set_epoch`` before each epoch (as with DistributedSampler), and can resume
    mid-epoch by skipping the first batches: the order does not depend on how many epochs ran before in
    this process or on any global RNG state.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"sample/{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global RNGs (what transforms draw from), restoring them afterwards:
    with 0 workers the samples are loaded in the training process, whose own RNG streams must not move."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class SeededSamples(Dataset):
    """A training split whose random augmentation of a sample is a pure function of ``(seed, epoch, index)``.

    Keys are ``(epoch, index)`` pairs from :class:`EpochTagged`. A worker's RNG is seeded once per process, so
    per-epoch reseeding never reaches persistent workers, and which worker loads which batch changes after a
    mid-epoch resume; seeding per sample makes both irrelevant (exact resume with any number of workers), and
    ranks, which load different indices, draw different augmentations. Plain integer keys load without seeding.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            epoch, index = key
            with _seeded_rngs(_sample_seed(self.seed, epoch, index)):
                return self.dataset[index]
        return self.dataset[key]


class EpochTagged(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` from a sampler with ``set_epoch`` (its epoch read when iteration starts)."""

    def __init__(self, base: EpochShuffleSampler | DistributedSampler) -> None:
        self.base = base

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.base.epoch
        return ((epoch, i) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


class ShardSampler(Sampler[int]):
    """In-order indices ``rank, rank + world, ...``: every sample evaluated exactly once across ranks.

    DistributedSampler pads the last shard with repeated samples, which biases accuracy slightly; the
    evaluation loop sums counts over ranks, so uneven shards are exact.
    """

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_val_loader(bundle: DataBundle, batch_size: int, num_workers: int = 0) -> DataLoader:
    """The in-order validation loader of a bundle (one process; an evaluation-only bundle is enough)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = usable_workers(num_workers)
    return DataLoader(bundle.val, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())


def usable_workers(requested: int) -> int:
    """`requested` loader workers, capped at this process's share of the CPUs it may run on.

    Recipes ask for 8-12 workers per GPU; on a 2-core machine that only oversubscribes the cores (and torch warns
    every epoch). Under torchrun the share is the CPUs divided by the processes on this node."""
    if requested <= 0:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return min(requested, per_process)


def build_loaders(
    bundle: DataBundle,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool = True,
    pin_memory: bool | None = None,
    eval_batch_size: int | None = None,
) -> tuple[DataLoader, DataLoader, EpochShuffleSampler | DistributedSampler]:
    """Train and val loaders, plus the train sampler (call ``sampler.set_epoch(epoch)`` every epoch).

    ``batch_size`` is per process. Under ``distributed=True`` the train split is sharded with
    DistributedSampler(shuffle=True, seed=seed) and the val split with :class:`ShardSampler`
    (torch.distributed must be initialised). Train order is a pure function of (seed, epoch) either way, and the
    random augmentation of each sample a pure function of (seed, epoch, index) (:class:`SeededSamples`).
    ``num_workers`` is capped at this process's share of the CPUs (:func:`usable_workers`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    n_train, n_val = len(bundle.train), len(bundle.val)  # type: ignore[arg-type]
    if distributed:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        train_sampler: EpochShuffleSampler | DistributedSampler = DistributedSampler(
            bundle.train, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
        )
        val_sampler: Sampler[int] = ShardSampler(n_val, rank, world)
    else:
        train_sampler = EpochShuffleSampler(n_train, seed)
        val_sampler = range(n_val)  # type: ignore[assignment]
    if drop_last and len(train_sampler) < batch_size:
        raise ValueError(
            f"the training split has {len(train_sampler)} samples per process, fewer than one batch of "
            f"{batch_size}: lower data.batch_size or use more data"
        )
    num_workers = usable_workers(num_workers)
    if num_workers > 0:
        # Render procedural data once here, so worker processes share it instead of each rendering a copy.
        for ds in (bundle.train, bundle.val):
            if isinstance(ds, SyntheticShapes):
                _ = ds.images
    common = {"num_workers": num_workers, "pin_memory": pin_memory, "persistent_workers": num_workers > 0}
    # Augmentations are seeded per sample (SeededSamples); the generator only fixes the workers' base seeds.
    train = DataLoader(
        SeededSamples(bundle.train, seed), batch_size=batch_size, sampler=EpochTagged(train_sampler),
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed), **common,
    )
    val = DataLoader(bundle.val, batch_size=eval_batch_size or batch_size, sampler=val_sampler, **common)
    return train, val, train_sampler


class _SkipSampler(Sampler[int]):
    """The indices of `base` after the first `skip`: the rest of an epoch, same order, nothing loaded to get there."""

    def __init__(self, base: Sampler[int], skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)  # type: ignore[arg-type]


def skip_batches(loader: DataLoader, batches: int) -> DataLoader:
    """A loader over the same epoch as `loader` that starts after `batches` batches (exact mid-epoch resume).

    The sampler must already be set to the epoch (`set_epoch`); the skipped samples are never read from disk.
    """
    if batches <= 0:
        return loader
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=_SkipSampler(loader.sampler, batches * loader.batch_size),
        drop_last=loader.drop_last, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
        collate_fn=loader.collate_fn, generator=loader.generator,
    )
