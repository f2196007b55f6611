"""Datasets, transforms and loaders.

``synthetic`` is a procedural, learnable image-classification task (no files, no downloads) so the default
run and every test work on a fresh laptop; ``imagefolder`` and ``cifar10``/``cifar100`` are the real ones.

Modules: ``bundle`` (DataBundle), ``synthetic`` (procedural shapes), ``transforms`` (image transforms and
normalisation constants), ``folders`` (ImageFolder and CIFAR on disk), ``datasets`` (build_datasets),
``loaders`` (samplers, loaders, mid-epoch resume). Every public name is importable from ``superblock.data``.
"""

from superblock.data.bundle import DataBundle
from superblock.data.datasets import DATASET_NAMES, build_datasets
from superblock.data.loaders import (
    EpochShuffleSampler,
    EpochTagged,
    SeededSamples,
    ShardSampler,
    build_loaders,
    build_val_loader,
    skip_batches,
    usable_workers,
)
from superblock.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    SYNTHETIC_TRAIN_SIZE,
    SYNTHETIC_VAL_SIZE,
    SyntheticShapes,
    render_shapes,
)
from superblock.data.transforms import (
    AUGMENT_DEFAULTS,
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_transforms,
    posterize_bits,
)

__all__ = [
    "AUGMENT_DEFAULTS",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_MEAN",
    "SYNTHETIC_STD",
    "SYNTHETIC_TRAIN_SIZE",
    "SYNTHETIC_VAL_SIZE",
    "DataBundle",
    "EpochShuffleSampler",
    "EpochTagged",
    "SeededSamples",
    "ShardSampler",
    "SyntheticShapes",
    "build_datasets",
    "build_loaders",
    "build_val_loader",
    "image_transforms",
    "posterize_bits",
    "render_shapes",
    "skip_batches",
    "usable_workers",
]
