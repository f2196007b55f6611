"""DataBundle: a dataset's train / val splits plus what models and reports need to know about them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

TASKS = ("image_classification", "causal_lm", "sequence_classification")


@dataclass
class DataBundle:
    """Train / val datasets plus what the model and the reports need to know about them (train is None for an
    evaluation-only bundle: ``build_datasets(..., val_only=True)``).

    Text bundles (``task`` ``causal_lm`` or ``sequence_classification``) have ``image_size`` 0 and empty
    mean / std, and say what a language model needs: ``vocab_size``, ``seq_len``, the ``pad_id`` / ``eos_id``
    tokens and ``corpus``, a JSON-able description of the text read (source, Python version, sha256, tokens).
    A causal-LM bundle's ``num_classes`` is the vocabulary size (every token is a class of the next-token loss).
    ``transforms`` (image folders) is the sentence saying which augmentation recipe was chosen and why.
    """

    train: Dataset | None
    val: Dataset
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] | None = None
    task: str = "image_classification"
    vocab_size: int | None = None
    seq_len: int | None = None
    pad_id: int | None = None
    eos_id: int | None = None
    corpus: dict[str, Any] | None = None
    transforms: str | None = None  # image folders: which augmentation recipe was chosen, and why
