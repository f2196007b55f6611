"""Tokenizers for text data: UTF-8 bytes (no files, no dependencies) or a local Hugging Face tokenizer directory.

Both turn a list of documents into one id array per document (numpy, the narrowest dtype that holds the vocabulary)
and say what a language model needs: ``vocab_size``, ``eos_id`` (the document separator of a causal-LM stream)
and ``pad_id``. Nothing is ever downloaded and no tokenizer code from a directory is executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

BYTE_VOCAB = 257  # 256 byte values + one end-of-document token
BYTE_EOS = 256
LM_EXTRA_HINT = "pip install -e '.[lm]'"


def token_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 when every id fits (half the memory of int32 for the cached token stream), else int32."""
    return np.uint16 if vocab_size <= 2**16 else np.int32


class TextTokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int | None
    pad_id: int

    def encode_documents(
        self, docs: list[str], max_length: int | None = None, special_tokens: bool = False
    ) -> list[np.ndarray]: ...

    def decode(self, ids: Any) -> str: ...

    def text_bytes(self, ids: Any) -> int: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus id 256 for end of document (also the pad id: it never occurs in text)."""

    name = "bytes"
    vocab_size = BYTE_VOCAB
    eos_id: int | None = BYTE_EOS
    pad_id = BYTE_EOS

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def encode_documents(
        self, docs: list[str], max_length: int | None = None, special_tokens: bool = False
    ) -> list[np.ndarray]:
        """One uint16 id array per document, truncated to ``max_length`` (bytes have no special tokens to add)."""
        return [self.encode(doc)[:max_length] for doc in docs]

    def decode(self, ids: Any) -> str:
        """Text of `ids`; end-of-document ids are dropped, and bytes cut mid-character become U+FFFD."""
        values = np.asarray(ids, dtype=np.int64).ravel()
        return bytes(values[values < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

    def text_bytes(self, ids: Any) -> int:
        """UTF-8 bytes of the text `ids` spell: one per byte id, none for the end-of-document id."""
        return int((np.asarray(ids, dtype=np.int64) < 256).sum())


class HFTokenizer:
    """A tokenizer saved on disk (``save_pretrained`` output or a model directory), loaded with
    ``local_files_only=True`` and ``trust_remote_code=False``.

    ``vocab_size`` is ``len(tokenizer)`` (added tokens included: they are ids the model's embedding must hold).
    The end-of-document id is the eos token, else the sep token (BERT-style vocabularies have no eos); the pad id
    is the pad token, else that end-of-document id.
    """

    def __init__(self, directory: str | Path) -> None:
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"data.tokenizer {path} is not a directory: pass a local tokenizer directory (what "
                "save_pretrained writes: tokenizer.json or vocabulary files), or null for UTF-8 bytes; "
                "nothing is downloaded"
            )
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ImportError(f"a tokenizer directory needs the transformers package: {LM_EXTRA_HINT}") from err
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"could not load a tokenizer from {path}: {err}") from err
        tok = self.tokenizer
        self.name = str(path)
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        if pad is None:
            raise ValueError(f"the tokenizer in {path} has no pad, eos or sep token: add one to its special tokens")
        self.pad_id = int(pad)

    def encode_documents(
        self, docs: list[str], max_length: int | None = None, special_tokens: bool = False
    ) -> list[np.ndarray]:
        """One id array per document. ``special_tokens`` adds the tokenizer's own (e.g. [CLS] ... [SEP]) and
        ``max_length`` truncates with the tokenizer, so a truncated sequence keeps its closing special token."""
        # verbose=False: long documents are cut into windows later, not fed whole to a model, so the
        # "sequence longer than the model's maximum" warning would be noise.
        out = self.tokenizer(
            docs,
            add_special_tokens=special_tokens,
            truncation=max_length is not None,
            max_length=max_length,
            verbose=False,
        )["input_ids"]
        dtype = token_dtype(self.vocab_size)
        return [np.asarray(ids, dtype=dtype) for ids in out]

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int64).ravel().tolist())

    def text_bytes(self, ids: Any) -> int:
        """UTF-8 bytes of the text `ids` spell, special tokens (the end-of-document id) left out; a character cut at
        either end counts as one replacement character."""
        ids = np.asarray(ids, dtype=np.int64).ravel().tolist()
        return len(self.tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))


def load_tokenizer(spec: str | Path | None) -> ByteTokenizer | HFTokenizer:
    """``None`` or ``"bytes"``: the byte-level tokenizer; anything else: a local tokenizer directory."""
    if spec is None or str(spec) == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)
