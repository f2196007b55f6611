"""Text datasets: causal-LM windows of one token stream, and padded sequences with a class label.

A corpus (:mod:`superblock.data.corpus`) is tokenized once, when the bundle is built, and held in memory as a
numpy array (uint16 for vocabularies up to 65536): samples are slices of it, so loader workers share it and a
sample costs no tokenization. Nothing here is random: train order comes from the sampler alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from superblock.data.bundle import DataBundle
from superblock.data.corpus import Corpus, TextSplit, load_corpus
from superblock.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, token_dtype

TEXT_TASKS = ("causal_lm", "sequence_classification")
DEFAULT_SEQ_LEN = 128


class TokenWindows(Dataset):
    """Next-token samples ``(input_ids, labels)``, both int64 of length ``seq_len``, from one token stream.

    Window ``i`` is ``tokens[s : s + seq_len + 1]`` with ``s = i * seq_len``: inputs are its first ``seq_len``
    tokens, labels the last ``seq_len`` (the inputs shifted by one). Consecutive windows share only their boundary
    token, so inputs never overlap and every next-token pair of the stream is a label exactly once (the mean loss
    over all windows is the stream's own per-token loss). ``size`` keeps that many windows, evenly spaced over the
    stream (the same ones for every seed, so validation perplexities of different runs compare).
    ``bytes_per_label`` (set for the validation split, see :func:`bytes_per_label`): UTF-8 bytes of text per label
    token, which turns a per-token loss into a per-byte perplexity.
    """

    random_augmentation = False  # build_loaders skips per-sample RNG seeding: a sample is a pure slice
    bytes_per_label: float | None = None

    def __init__(self, tokens: np.ndarray, seq_len: int, size: int | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
        self.tokens, self.seq_len = tokens, seq_len
        count = max(0, (len(tokens) - 1) // seq_len)
        self.starts = _evenly_spaced(count, size) * seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[index])
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


class TextClassification(Dataset):
    """``(input_ids, label)``: each document's ids truncated to ``seq_len`` and padded with ``pad_id`` on the right
    (attention mask: ``input_ids != pad_id``)."""

    random_augmentation = False

    def __init__(self, ids: np.ndarray, labels: np.ndarray) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.ids[index].astype(np.int64)), int(self.labels[index])


def _evenly_spaced(count: int, size: int | None) -> np.ndarray:
    if size is None or size >= count:
        return np.arange(count, dtype=np.int64)
    return np.arange(size, dtype=np.int64) * count // size  # strictly increasing when size < count


def token_stream(docs: list[str], tokenizer: ByteTokenizer | HFTokenizer) -> np.ndarray:
    """All documents' ids in order, each followed by the end-of-document id, as one array."""
    if tokenizer.eos_id is None:
        raise ValueError(f"the tokenizer {tokenizer.name} has no eos (or sep) token to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    parts = [piece for ids in tokenizer.encode_documents(docs) for piece in (ids.astype(dtype, copy=False), eos)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def bytes_per_label(windows: TokenWindows, tokenizer: ByteTokenizer | HFTokenizer) -> float | None:
    """Mean UTF-8 bytes of text per label token over `windows` (each window's labels decoded as one piece, special
    tokens spelling none); None for windows whose labels spell no text."""
    n = windows.seq_len
    total = sum(tokenizer.text_bytes(windows.tokens[s + 1 : s + n + 1]) for s in windows.starts.tolist())
    labels = len(windows) * n
    return total / labels if total > 0 and labels > 0 else None


def _windows(
    split: TextSplit, name: str, tokenizer: ByteTokenizer | HFTokenizer, seq_len: int, size: int | None
) -> TokenWindows:
    tokens = token_stream(split.docs, tokenizer)
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the {name} split has {len(tokens)} tokens, fewer than one window of data.seq_len + 1 = {seq_len + 1}: "
            f"lower data.seq_len or add text (data.max_bytes)"
        )
    return TokenWindows(tokens, seq_len, size)


def _classified(
    split: TextSplit, tokenizer: ByteTokenizer | HFTokenizer, seq_len: int, size: int | None
) -> TextClassification:
    encoded = tokenizer.encode_documents(split.docs, max_length=seq_len, special_tokens=True)
    ids = np.full((len(encoded), seq_len), tokenizer.pad_id, dtype=token_dtype(tokenizer.vocab_size))
    for row, seq in zip(ids, encoded, strict=True):
        row[: len(seq)] = seq[:seq_len]
    keep = _evenly_spaced(len(encoded), size)
    return TextClassification(ids[keep], np.asarray(split.labels, dtype=np.int64)[keep])


def _describe(
    corpus: Corpus, tokenizer: ByteTokenizer | HFTokenizer, datasets: dict[str, Dataset | None], seq_len: int
) -> dict[str, Any]:
    """The bundle's ``corpus``: what was read (corpus.info), how it was tokenized, and a sha256 of the tokens."""
    info = dict(corpus.info)
    info["tokenizer"] = tokenizer.name
    if isinstance(tokenizer, HFTokenizer):
        info["tokenizer_class"] = type(tokenizer.tokenizer).__name__
    info["vocab_size"] = tokenizer.vocab_size
    info["seq_len"] = seq_len
    digest, tokens, samples = hashlib.sha256(), {}, {}
    for name, ds in datasets.items():
        if ds is None:
            continue
        array = ds.tokens if isinstance(ds, TokenWindows) else ds.ids  # type: ignore[attr-defined]
        digest.update(np.ascontiguousarray(array).tobytes())
        tokens[name], samples[name] = int(array.size), len(ds)  # type: ignore[arg-type]
    info.update(tokens=tokens, samples=samples, tokens_sha256=digest.hexdigest())
    return info


def text_bundle(
    root: str | Path | None = None,
    seq_len: int | None = None,
    tokenizer: str | Path | None = None,
    max_bytes: int | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    task: str | None = None,
    val_only: bool = False,
    val_max_bytes: int | None = None,
) -> DataBundle:
    """The text bundle: ``root=None`` reads the stdlib corpus, else a local tree (:func:`load_corpus`);
    ``tokenizer=None`` encodes UTF-8 bytes, else it names a local tokenizer directory. ``task`` is ``causal_lm``,
    ``sequence_classification`` or ``None`` (class folders under ``root`` make it classification). ``train_size``
    / ``val_size`` keep that many samples, evenly spaced; ``val_max_bytes`` caps the validation text on its own (the
    same validation text whatever ``max_bytes`` the training text gets)."""
    if task is not None and task not in TEXT_TASKS:
        raise ValueError(f"data.task must be one of {', '.join(TEXT_TASKS)} (or null), got {task!r}")
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    for label, value in (("max_bytes", max_bytes), ("val_max_bytes", val_max_bytes)):
        if value is not None and value < 1:
            raise ValueError(f"data.{label} must be >= 1 (or null), got {value}")
    tok = load_tokenizer(tokenizer)
    corpus = load_corpus(root, max_bytes, task, val_only, val_max_bytes)
    if corpus.classes is not None:
        val: Dataset = _classified(corpus.val, tok, seq_len, val_size)
        train = None if corpus.train is None else _classified(corpus.train, tok, seq_len, train_size)
        task, num_classes = "sequence_classification", len(corpus.classes)
    else:
        val = _windows(corpus.val, "val", tok, seq_len, val_size)
        val.bytes_per_label = bytes_per_label(val, tok)
        train = None if corpus.train is None else _windows(corpus.train, "train", tok, seq_len, train_size)
        task, num_classes = "causal_lm", tok.vocab_size
    return DataBundle(
        train,
        val,
        num_classes,
        0,
        (),
        (),
        classes=corpus.classes,
        task=task,
        vocab_size=tok.vocab_size,
        seq_len=seq_len,
        pad_id=tok.pad_id,
        eos_id=tok.eos_id,
        corpus=_describe(corpus, tok, {"train": train, "val": val}, seq_len),
    )
