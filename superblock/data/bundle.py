"""DataBundle: a dataset's train / val splits plus what models and reports need to know about them."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset


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
