"""Datasets, transforms and loaders.

``synthetic`` is a procedural, learnable image-classification task (no files, no downloads) so the default
run and every test work on a fresh laptop; ``imagefolder`` and ``cifar10``/``cifar100`` are the real ones.
``text`` is language data: local .txt files or, by default, the Python standard library's own source (real text on
every machine, no download), as causal-LM windows or labelled sequences.

Modules: ``bundle`` (DataBundle), ``synthetic`` (procedural shapes), ``transforms`` (image transforms and
normalisation constants), ``folders`` (ImageFolder and CIFAR on disk), ``datasets`` (build_datasets),
``loaders`` (samplers, loaders, mid-epoch resume), ``corpus`` (text sources), ``tokenizer`` (bytes or a local
tokenizer directory), ``text`` (text datasets and bundle), ``metrics`` (perplexity, token-weighted loss). Every
public name is importable from ``superblock.data``.
"""

from superblock.data.bundle import TASKS, DataBundle
from superblock.data.corpus import DEFAULT_MAX_BYTES, Corpus, TextSplit, load_corpus, stdlib_corpus
from superblock.data.datasets import DATASET_NAMES, build_datasets
from superblock.data.loaders import (
    EpochShuffleSampler,
    EpochTagged,
    SeededSamples,
    ShardSampler,
    build_loaders,
    build_val_loader,
    calibration_loader,
    skip_batches,
    usable_workers,
)
from superblock.data.metrics import IGNORE_INDEX, perplexity, perplexity_per_byte
from superblock.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    SYNTHETIC_TRAIN_SIZE,
    SYNTHETIC_VAL_SIZE,
    SyntheticShapes,
    render_shapes,
)
from superblock.data.text import TEXT_TASKS, TextClassification, TokenWindows, text_bundle, token_stream
from superblock.data.tokenizer import BYTE_EOS, BYTE_VOCAB, ByteTokenizer, HFTokenizer, load_tokenizer
from superblock.data.transforms import (
    AUGMENT_DEFAULTS,
    AUGMENT_RECIPES,
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_IMAGE_MAX,
    image_transforms,
    posterize_bits,
    resolve_augment,
)

__all__ = [
    "AUGMENT_DEFAULTS",
    "AUGMENT_RECIPES",
    "BYTE_EOS",
    "BYTE_VOCAB",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASET_NAMES",
    "DEFAULT_MAX_BYTES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SMALL_IMAGE_MAX",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_MEAN",
    "SYNTHETIC_STD",
    "SYNTHETIC_TRAIN_SIZE",
    "SYNTHETIC_VAL_SIZE",
    "TASKS",
    "TEXT_TASKS",
    "ByteTokenizer",
    "Corpus",
    "DataBundle",
    "EpochShuffleSampler",
    "EpochTagged",
    "HFTokenizer",
    "SeededSamples",
    "ShardSampler",
    "SyntheticShapes",
    "TextClassification",
    "TextSplit",
    "TokenWindows",
    "build_datasets",
    "build_loaders",
    "build_val_loader",
    "calibration_loader",
    "image_transforms",
    "load_corpus",
    "load_tokenizer",
    "perplexity",
    "perplexity_per_byte",
    "posterize_bits",
    "resolve_augment",
    "render_shapes",
    "skip_batches",
    "stdlib_corpus",
    "text_bundle",
    "token_stream",
    "usable_workers",
]
