"""Procedural shapes: a learnable image-classification task with no files and no downloads.

Image ``i`` of a split is a pure function of ``(seed, split, i)``; ``SyntheticShapes`` renders a split in one
vectorised pass and ``_synthetic_bundle`` pairs a train and a val split into a :class:`DataBundle`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from superblock.data.bundle import DataBundle
from superblock.seeding import stable_seed

# Fixed constants, not the data's statistics (its mean is ~0.3: dark backgrounds): for models trained from
# scratch any fixed affine map works, and these keep pixels within about [-1.7, 1.7].
SYNTHETIC_MEAN = (0.5, 0.5, 0.5)
SYNTHETIC_STD = (0.3, 0.3, 0.3)

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


def _draw_randomness(seed: int, split: str, indices: range, image_size: int) -> tuple[Tensor, Tensor]:
    """Per-image uniform parameters [N, _NUM_PARAMS] and pixel noise [N, 3, H, W], each from its own seed."""
    g = torch.Generator()
    params = torch.empty(len(indices), _NUM_PARAMS)
    noise = torch.empty(len(indices), 3, image_size, image_size)
    for row, index in enumerate(indices):
        g.manual_seed(stable_seed(seed, split, index))
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


SYNTHETIC_TRAIN_SIZE = 12_000
SYNTHETIC_VAL_SIZE = 2_000


def _synthetic_bundle(
    image_size: int | None, train_size: int | None, val_size: int | None, seed: int, num_classes: int | None
) -> DataBundle:
    size, classes = image_size or 32, num_classes or len(SYNTHETIC_CLASSES)
    # The split name is part of every image's seed, so train and val never share an image.
    train = SyntheticShapes(train_size or SYNTHETIC_TRAIN_SIZE, size, classes, seed, "train")
    val = SyntheticShapes(val_size or SYNTHETIC_VAL_SIZE, size, classes, seed, "val")
    return DataBundle(train, val, classes, size, SYNTHETIC_MEAN, SYNTHETIC_STD, list(train.classes))
