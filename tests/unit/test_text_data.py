"""superblock.data text layer: tokenizers, causal-LM windows, corpora (local and stdlib), loaders, LM metrics."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from superblock.data import (
    BYTE_EOS,
    ByteTokenizer,
    DataBundle,
    TokenWindows,
    build_datasets,
    build_loaders,
    load_corpus,
    perplexity,
    perplexity_per_byte,
    skip_batches,
    stdlib_corpus,
    text_bundle,
)
from superblock.data.corpus import split_of, stdlib_root


def _write(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return root


def _ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_utf8_and_drops_eos() -> None:
    tok = ByteTokenizer()
    text = "naïve café — 日本語 🙂\n\tend"
    ids = tok.encode(text)
    assert ids.dtype == np.uint16 and ids.tolist() == _ids(text) and len(ids) > len(text)  # multi-byte characters
    assert tok.decode(ids) == text
    assert tok.decode([*_ids("ab"), BYTE_EOS, *_ids("c")]) == "abc"
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (257, 256, 256)


# ---------------------------------------------------------------------------------------------- causal-LM windows


def test_windows_are_shifted_inputs_and_cover_every_transition_once(tmp_path) -> None:
    root = _write(tmp_path, {"train.txt": "abcdefghij", "val.txt": "0123456"})
    bundle = text_bundle(str(root), seq_len=3)
    assert (bundle.task, bundle.num_classes, bundle.vocab_size, bundle.seq_len) == ("causal_lm", 257, 257, 3)
    assert (bundle.image_size, bundle.mean, bundle.std, bundle.eos_id) == (0, (), (), 256)
    # Stream: a..j, EOS (11 tokens) -> (11 - 1) // 3 = 3 windows, each sharing its last token with the next one.
    samples = [bundle.train[i] for i in range(len(bundle.train))]
    assert [(x.tolist(), y.tolist()) for x, y in samples] == [
        (_ids("abc"), _ids("bcd")),
        (_ids("def"), _ids("efg")),
        (_ids("ghi"), _ids("hij")),
    ]
    assert all(x.dtype == torch.int64 and y.dtype == torch.int64 for x, y in samples)
    # Val: 0..6, EOS (8 tokens) -> (8 - 1) // 3 = 2 windows; the tail too short for a window (6 -> EOS) is dropped.
    assert [y.tolist() for _, y in (bundle.val[0], bundle.val[1])] == [_ids("123"), _ids("456")]
    assert len(bundle.val) == 2


def test_documents_are_separated_by_eos_and_size_caps_are_evenly_spaced(tmp_path) -> None:
    root = _write(tmp_path, {"train/b.txt": "cd", "train/a.txt": "ab", "train/sub/c.txt": "ef", "val/v.txt": "xyz"})
    bundle = text_bundle(str(root), seq_len=2)
    assert bundle.train.tokens.tolist() == [*_ids("ab"), 256, *_ids("cd"), 256, *_ids("ef"), 256]  # sorted files
    assert bundle.corpus["layout"] == "split_folders" and bundle.corpus["files"] == {"train": 3, "val": 1}
    # 9 tokens -> 4 windows at 0, 2, 4, 6: [a b], [EOS c], [d EOS], [e f]; keeping 2 keeps windows 0 and 2.
    capped = TokenWindows(bundle.train.tokens, seq_len=2, size=2)
    assert [x.tolist() for x, _ in (capped[0], capped[1])] == [_ids("ab"), [ord("d"), 256]]
    assert len(text_bundle(str(root), seq_len=2, train_size=3).train) == 3


# ---------------------------------------------------------------------------------------------- corpora


def test_split_by_file_is_deterministic_and_disjoint(tmp_path) -> None:
    root = _write(tmp_path, {f"docs/{i:02d}.txt": f"document {i}\n" * 3 for i in range(60)})
    first, again = load_corpus(str(root)), load_corpus(str(root))
    assert first.train.names == again.train.names and first.val.names == again.val.names
    assert not set(first.train.names) & set(first.val.names)
    assert sorted(first.train.names + first.val.names) == [f"docs/{i:02d}.txt" for i in range(60)]
    assert first.val.names and all(split_of(n) == "val" for n in first.val.names)
    assert first.info["sha256"] == again.info["sha256"]
    # A file keeps its split when others are added.
    _write(tmp_path, {"docs/new.txt": "more text\n"})
    grown = load_corpus(str(root))
    assert set(first.val.names) <= set(grown.val.names) and set(first.train.names) <= set(grown.train.names)


def test_stdlib_corpus_is_deterministic_fast_and_within_budget() -> None:
    start = time.perf_counter()
    corpus = stdlib_corpus(max_bytes=300_000)
    elapsed = time.perf_counter() - start
    again = stdlib_corpus(max_bytes=300_000)
    assert elapsed < 5.0, f"building the default corpus took {elapsed:.1f} s"
    assert corpus.info["sha256"] == again.info["sha256"] and corpus.train.names == again.train.names
    assert corpus.info["source"] == "stdlib" and corpus.info["python"].count(".") == 2
    assert not set(corpus.train.names) & set(corpus.val.names)
    assert all(not n.startswith(("site-packages", "test/")) for n in corpus.train.names + corpus.val.names)
    assert corpus.info["bytes"]["train"] <= 270_000 and corpus.info["bytes"]["val"] <= 30_000
    assert corpus.info["bytes"]["train"] > 250_000 and corpus.info["bytes"]["val"] > 10_000
    assert corpus.train.names == sorted(corpus.train.names)  # a fixed file order
    assert corpus.train.docs[0] == (stdlib_root() / corpus.train.names[0]).read_text("utf-8")
    assert stdlib_corpus(max_bytes=100_000).info["sha256"] != corpus.info["sha256"]


def test_a_fixed_validation_budget_keeps_the_validation_text_when_the_training_text_grows(tmp_path) -> None:
    """data.val_max_bytes: runs that read 300 KB and 600 KB of the stdlib are scored on the same validation text
    (300 KB's own 10%), and the larger one trains on more."""
    small, large = stdlib_corpus(300_000), stdlib_corpus(600_000, val_max_bytes=30_000)
    assert large.val.docs == small.val.docs and large.val.names == small.val.names
    assert 1.9 * small.train.nbytes < large.train.nbytes <= 570_000
    assert large.info["val_max_bytes"] == 30_000 and "val_max_bytes" not in small.info
    assert stdlib_corpus(600_000).val.nbytes > 50_000  # without it, val grows with max_bytes
    with pytest.raises(ValueError, match="must be below data.max_bytes"):
        stdlib_corpus(100_000, val_max_bytes=100_000)
    root = _write(tmp_path / "tree", {"train/a.txt": "x" * 500 + "\n", "val/b.txt": ("line\n" * 100)})
    capped = load_corpus(str(root), val_max_bytes=50)  # a train / val layout: val alone is capped
    assert capped.val.nbytes == 50 and capped.train.nbytes == 501 and capped.info["val_max_bytes"] == 50
    with pytest.raises(ValueError, match="val_max_bytes must be >= 1"):
        text_bundle(str(root), seq_len=2, val_max_bytes=0)


def test_default_text_bundle_through_build_datasets() -> None:
    bundle = build_datasets("text", seq_len=64, max_bytes=100_000, train_size=50, image_size=224, augment={})
    assert isinstance(bundle, DataBundle) and bundle.task == "causal_lm" and len(bundle.train) == 50
    assert bundle.corpus["tokenizer"] == "bytes" and bundle.corpus["tokens"]["val"] > 64
    x, y = bundle.val[len(bundle.val) - 1]
    assert x.shape == y.shape == (64,) and torch.equal(x[1:], y[:-1])
    assert build_datasets("text", seq_len=64, max_bytes=100_000, val_only=True).train is None
    images = build_datasets("synthetic", train_size=8, val_size=8)  # image bundles keep the old defaults
    assert (images.task, images.vocab_size, images.seq_len, images.corpus) == ("image_classification", None, None, None)


# ---------------------------------------------------------------------------------------------- tokenizer dirs


def _tiny_tokenizer_dir(path: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["[UNK]", "[PAD]", "[EOS]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    fast.save_pretrained(str(path))
    return path


def test_local_tokenizer_directory(tmp_path) -> None:
    tok_dir = _tiny_tokenizer_dir(tmp_path / "tok")
    root = _write(
        tmp_path / "corpus",
        {"train/1.txt": "the cat sat on the mat", "train/2.txt": "a dog", "val/1.txt": "the dog sat on a cat zebra"},
    )
    bundle = text_bundle(str(root), seq_len=3, tokenizer=str(tok_dir))
    assert (bundle.vocab_size, bundle.num_classes, bundle.eos_id, bundle.pad_id) == (10, 10, 2, 1)
    # the cat sat on the mat [EOS] a dog [EOS]
    assert bundle.train.tokens.tolist() == [3, 4, 5, 6, 3, 7, 2, 8, 9, 2]
    x, y = bundle.train[1]
    assert (x.tolist(), y.tolist()) == ([6, 3, 7], [3, 7, 2])
    assert bundle.val.tokens.tolist() == [3, 9, 5, 6, 8, 4, 0, 2]  # unknown word -> [UNK]
    assert bundle.corpus["tokenizer"] == str(tok_dir) and bundle.corpus["tokenizer_class"]
    # bytes of text per label: windows' labels "dog sat on" (10 bytes) and "a cat [UNK]" (special: "a cat", 5)
    assert bundle.val.bytes_per_label == pytest.approx(15 / 6)
    classes = _write(
        tmp_path / "classes",
        {
            "train/a/1.txt": "the cat",
            "train/b/1.txt": "a dog sat on the mat",
            "val/a/1.txt": "cat",
            "val/b/1.txt": "dog",
        },
    )
    labelled = text_bundle(str(classes), seq_len=4, tokenizer=str(tok_dir))
    rows = [(x.tolist(), y) for x, y in (labelled.train[0], labelled.train[1])]
    assert rows == [([3, 4, 1, 1], 0), ([8, 9, 5, 6], 1)]  # padded with [PAD] = 1; truncated to 4 tokens


# ---------------------------------------------------------------------------------------------- classification


def test_class_folders_give_padded_labelled_sequences(tmp_path) -> None:
    root = _write(
        tmp_path,
        {
            "train/neg/1.txt": "bad",
            "train/neg/2.txt": "awful film",
            "train/pos/1.txt": "good",
            "val/neg/1.txt": "meh",
            "val/pos/1.txt": "great great great",
        },
    )
    bundle = text_bundle(str(root), seq_len=6)
    assert (bundle.task, bundle.num_classes, bundle.classes) == ("sequence_classification", 2, ["neg", "pos"])
    # Interleaved by class: neg/1, pos/1, neg/2.
    rows = [(x.tolist(), label) for x, label in (bundle.train[i] for i in range(len(bundle.train)))]
    assert rows == [([*_ids("bad"), 256, 256, 256], 0), (_ids("good") + [256, 256], 1), (_ids("awful "), 0)]
    assert bundle.val[1][0].tolist() == _ids("great ")  # truncated to seq_len
    lm = text_bundle(str(root), seq_len=2, task="causal_lm")  # the same tree read as plain text
    assert lm.task == "causal_lm" and lm.classes is None


# ---------------------------------------------------------------------------------------------- metrics


def test_perplexity_of_uniform_logits_is_the_vocabulary_size() -> None:
    vocab = 257
    logits, labels = torch.zeros(4, 16, vocab), torch.randint(0, vocab, (4, 16))
    nll = F.cross_entropy(logits.view(-1, vocab), labels.view(-1))
    assert perplexity(nll.item()) == pytest.approx(vocab, rel=1e-5)
    assert perplexity(0.0) == 1.0 and perplexity(1e6) == math.inf and math.isnan(perplexity(math.nan))


def test_perplexity_per_byte_spreads_a_tokens_loss_over_the_bytes_it_spells(tmp_path) -> None:
    # a token of 4 bytes at loss ln(16) is 2 nats... per byte: ln(16) / 4 = ln(2)
    assert perplexity_per_byte(math.log(16.0), 4.0) == pytest.approx(2.0)
    assert perplexity_per_byte(1.5, 1.0) == pytest.approx(perplexity(1.5))
    with pytest.raises(ValueError, match="bytes_per_token"):
        perplexity_per_byte(1.0, 0.0)
    # bytes: one byte per label, none for the end-of-document id; "é" is two bytes, so two labels
    root = _write(tmp_path, {"train.txt": "abc" * 20, "val.txt": "é" + "x" * 10})  # 12 bytes + end of document
    bundle = text_bundle(str(root), seq_len=4)
    labels = torch.cat([bundle.val[i][1] for i in range(len(bundle.val))])
    assert labels.numel() == 12 and labels[-1] == BYTE_EOS
    assert bundle.val.bytes_per_label == pytest.approx(11 / 12)


# ---------------------------------------------------------------------------------------------- loaders


def _small_bundle(tmp_path: Path) -> DataBundle:
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(80))
    root = _write(tmp_path, {"train.txt": text, "val.txt": text[:300]})
    return text_bundle(str(root), seq_len=16)


def test_loader_with_workers_matches_in_process_loading_and_resumes(tmp_path) -> None:
    bundle = _small_bundle(tmp_path)

    def epoch(workers: int, skip: int = 0) -> list[torch.Tensor]:
        train, _, sampler = build_loaders(bundle, batch_size=8, num_workers=workers, seed=4, pin_memory=False)
        sampler.set_epoch(3)
        return [torch.cat([x, y]) for x, y in skip_batches(train, skip)]

    serial, parallel = epoch(0), epoch(2)
    assert len(serial) == len(bundle.train) // 8 and len(serial) > 4
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(epoch(2, skip=3), serial[3:], strict=True))
    _, val, _ = build_loaders(bundle, batch_size=8, pin_memory=False)
    assert sum(len(x) for x, _ in val) == len(bundle.val)


def test_distributed_loader_shards_text(tmp_path) -> None:
    bundle = _small_bundle(tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train, val, sampler = build_loaders(bundle, batch_size=4, seed=1, distributed=True, pin_memory=False)
        sampler.set_epoch(0)
        assert len(train) == len(bundle.train) // 4 and next(iter(train))[0].shape == (4, 16)
        assert sum(len(x) for x, _ in val) == len(bundle.val)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- errors


def test_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        text_bundle(str(tmp_path / "missing"))
    empty = _write(tmp_path / "empty", {"train/a.txt": "", "val/b.txt": ""})
    with pytest.raises(ValueError, match="train split .* is empty: only empty files"):
        text_bundle(str(empty))
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        text_bundle(str(tmp_path / "none"))
    short = _write(tmp_path / "short", {"train.txt": "x" * 100, "val.txt": "tiny"})
    with pytest.raises(ValueError, match="val split has 5 tokens, fewer than one window of data.seq_len"):
        text_bundle(str(short), seq_len=8)
    with pytest.raises(ValueError, match="missing .*val.txt"):
        text_bundle(str(_write(tmp_path / "half", {"train.txt": "abc"})))
    with pytest.raises(ValueError, match="not a directory.*nothing is downloaded"):
        text_bundle(str(short), tokenizer=str(tmp_path / "no-tokenizer"))
    with pytest.raises(ValueError, match="has no classes"):
        text_bundle(None, task="sequence_classification")
    with pytest.raises(ValueError, match="data.task must be one of"):
        text_bundle(str(short), task="translation")
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        text_bundle(str(short), seq_len=0)
