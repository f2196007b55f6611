"""Text sources: a local tree of .txt files, or the Python standard library's own source files.

The default corpus (``root=None``) is real text present wherever Python is, with nothing to download: the
stdlib's ``*.py`` files in sorted order, each assigned to train or val by a hash of its path, read up to a byte
budget. Every machine with the same Python build reads the same bytes; ``Corpus.info`` records the Python
version and a sha256 of what was read, so a run says which corpus it used.

Local layouts (``root``): ``train.txt`` + ``val.txt``; ``train/**/*.txt`` + ``val/**/*.txt``; for sequence
classification ``{train,val}/<class>/*.txt``; or any other tree of ``*.txt``, split by file like the stdlib.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from superblock.seeding import stable_seed

DEFAULT_MAX_BYTES = 2_000_000
VAL_PERCENT = 10  # share of the files (and of the byte budget) that go to val in a split-by-file corpus
# Folders some distributions ship apart from the core stdlib (test suites, Tk, IDLE, venv, 2to3) or that are not
# stdlib at all (installed packages): leaving them out keeps the default corpus the same wherever Python is.
STDLIB_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "venv",
        "distutils",
        "lib-dynload",
    }
)
LAYOUTS = "<root>/{train,val}.txt, <root>/{train,val}/**/*.txt, <root>/{train,val}/<class>/*.txt or <root>/**/*.txt"


@dataclass
class TextSplit:
    """The documents of one split (one per file), the files' relative paths, and class labels when classified."""

    docs: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    labels: list[int] | None = None
    nbytes: int = 0


@dataclass
class Corpus:
    train: TextSplit | None  # None for a val-only corpus
    val: TextSplit
    classes: list[str] | None
    info: dict[str, Any]


def split_of(name: str, val_percent: int = VAL_PERCENT) -> str:
    """'train' or 'val' for a file, by a stable hash of its relative path: adding or removing other files never
    moves it to the other split, and train and val never share a file."""
    return "val" if stable_seed("text-split", name) % 100 < val_percent else "train"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(base: Path | None = None) -> list[str]:
    """The stdlib's ``*.py`` files (relative posix paths, sorted), without STDLIB_SKIP_DIRS and the
    build-specific ``_sysconfigdata*`` module."""
    base = base or stdlib_root()
    found = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP_DIRS and not d.startswith("config-")]
        rel = Path(folder).relative_to(base)
        found += [(rel / f).as_posix() for f in files if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    return sorted(found)


def _read(base: Path, names: list[str], budget: int | None, digest: Any, tag: str) -> TextSplit:
    """Whole files in the given order until `budget` bytes; the last one is cut at a line end to fit."""
    split = TextSplit()
    for name in names:
        data = (base / name).read_bytes()
        full = budget is not None and split.nbytes + len(data) >= budget
        if full:
            data = data[: budget - split.nbytes]  # type: ignore[operator]
            data = data[: data.rfind(b"\n") + 1] or data  # a whole last line, unless the file is one line
        digest.update(f"{tag}\0{name}\0{len(data)}\0".encode())
        digest.update(data)
        split.docs.append(data.decode("utf-8", errors="replace"))
        split.names.append(name)
        split.nbytes += len(data)
        if full:
            break
    return split


def _split_by_file(
    base: Path, names: list[str], max_bytes: int | None, source: str, val_max_bytes: int | None = None
) -> Corpus:
    """A corpus from one file list: each file to train or val by :func:`split_of`, each split its share of the
    byte budget (so a small budget still gives both splits text); `val_max_bytes` sets val's share instead."""
    if not names:
        raise ValueError(f"no text files under {base} (expected {LAYOUTS})")
    digest = hashlib.sha256()
    val_budget = val_max_bytes
    if val_budget is None and max_bytes is not None:
        val_budget = max(1, max_bytes * VAL_PERCENT // 100)
    if max_bytes is not None and val_budget is not None and val_budget >= max_bytes:
        raise ValueError(f"data.val_max_bytes ({val_budget}) must be below data.max_bytes ({max_bytes}): both "
                         "splits come out of max_bytes")  # fmt: skip
    train_budget = None if max_bytes is None else max(1, max_bytes - (val_budget or 0))
    train = _read(base, [n for n in names if split_of(n) == "train"], train_budget, digest, "train")
    val = _read(base, [n for n in names if split_of(n) == "val"], val_budget, digest, "val")
    return Corpus(train, val, None, _info(source, base, "split_by_file", train, val, max_bytes, digest, val_max_bytes))


def _info(
    source: str,
    base: Path,
    layout: str,
    train: TextSplit | None,
    val: TextSplit,
    max_bytes: int | None,
    digest: Any,
    val_max_bytes: int | None = None,
) -> dict[str, Any]:
    info: dict[str, Any] = {"source": source, "root": str(base), "layout": layout}
    if source == "stdlib":
        info["python"] = platform.python_version()
        info["python_implementation"] = platform.python_implementation()
    splits = {"train": train, "val": val}
    info["files"] = {k: len(s.names) for k, s in splits.items() if s is not None}
    info["bytes"] = {k: s.nbytes for k, s in splits.items() if s is not None}
    info["max_bytes"] = max_bytes
    if val_max_bytes is not None:  # only when set: the record of a corpus read without it stays as it was
        info["val_max_bytes"] = val_max_bytes
    info["sha256"] = digest.hexdigest()
    return info


def stdlib_corpus(max_bytes: int | None = None, val_max_bytes: int | None = None) -> Corpus:
    """The default corpus: the stdlib's own source, ``max_bytes`` in all (default :data:`DEFAULT_MAX_BYTES`), of
    which ``val_max_bytes`` (default 10%) is validation text: fixing it keeps the validation text when max_bytes
    grows (the first val_max_bytes of the validation files, in the same order)."""
    return _split_by_file(stdlib_root(), stdlib_files(), max_bytes or DEFAULT_MAX_BYTES, "stdlib", val_max_bytes)


def _txt_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.txt") if p.is_file())


def _class_folders(folder: Path) -> list[str]:
    """Class names when `folder` holds .txt files only inside >= 2 sub-folders (else [])."""
    if any(p.is_file() for p in folder.glob("*.txt")):
        return []
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.rglob("*.txt")))
    return classes if len(classes) >= 2 else []


def _read_classes(folder: Path, classes: list[str], budget: int | None, digest: Any, tag: str) -> TextSplit:
    """Files of every class, interleaved (one of each class in turn) so a byte budget keeps the classes balanced."""
    per_class = [[f"{c}/{n}" for n in _txt_files(folder / c)] for c in classes]
    order = _interleave(per_class)
    split = _read(folder, [name for name, _ in order], budget, digest, tag)
    split.labels = [label for _, label in order[: len(split.names)]]
    return split


def _interleave(lists: list[list[str]]) -> list[tuple[str, int]]:
    longest = max((len(x) for x in lists), default=0)
    return [(lst[i], label) for i in range(longest) for label, lst in enumerate(lists) if i < len(lst)]


def _split_folders(
    base: Path, max_bytes: int | None, task: str | None, val_only: bool, val_max_bytes: int | None = None
) -> Corpus:
    """``<root>/train`` and ``<root>/val`` folders: causal-LM text, or classes when ``task`` asks for them (or,
    with ``task=None``, when ``val`` holds only class folders)."""
    dirs = {s: base / s for s in (("val",) if val_only else ("train", "val"))}
    for d in dirs.values():
        if not d.is_dir():
            raise ValueError(f"missing {d} (expected {LAYOUTS})")
    classes = _class_folders(dirs["val"])
    if task == "sequence_classification" and not classes:
        raise ValueError(f"sequence classification needs class folders {dirs['val']}/<class>/*.txt (two or more)")
    digest = hashlib.sha256()
    if task == "causal_lm" or not classes:
        splits = {s: _read(d, _txt_files(d), _budget(s, max_bytes, val_max_bytes), digest, s) for s, d in dirs.items()}
        layout, classes_out = "split_folders", None
    else:
        if not val_only and _class_folders(dirs["train"]) != classes:
            raise ValueError(
                f"{dirs['train']} and {dirs['val']} have different class folders; labels would not line up"
            )
        splits = {
            s: _read_classes(d, classes, _budget(s, max_bytes, val_max_bytes), digest, s) for s, d in dirs.items()
        }
        layout, classes_out = "class_folders", classes
    train = splits.get("train")
    info = _info("local", base, layout, train, splits["val"], max_bytes, digest, val_max_bytes)
    return Corpus(train, splits["val"], classes_out, info)


def _budget(split: str, max_bytes: int | None, val_max_bytes: int | None) -> int | None:
    """Bytes read of one split of a train / val layout: max_bytes each, val_max_bytes for val when set."""
    return val_max_bytes if split == "val" and val_max_bytes is not None else max_bytes


def _split_files(base: Path, max_bytes: int | None, val_only: bool, val_max_bytes: int | None = None) -> Corpus:
    digest = hashlib.sha256()
    splits = {}
    for s in ("val",) if val_only else ("train", "val"):
        if not (base / f"{s}.txt").is_file():
            raise ValueError(f"missing {base / f'{s}.txt'} (expected {LAYOUTS})")
        splits[s] = _read(base, [f"{s}.txt"], _budget(s, max_bytes, val_max_bytes), digest, s)
    train = splits.get("train")
    info = _info("local", base, "split_files", train, splits["val"], max_bytes, digest, val_max_bytes)
    return Corpus(train, splits["val"], None, info)


def local_corpus(
    root: str | Path,
    max_bytes: int | None = None,
    task: str | None = None,
    val_only: bool = False,
    val_max_bytes: int | None = None,
) -> Corpus:
    """A corpus read from ``root`` (layouts: :data:`LAYOUTS`). ``max_bytes`` caps the bytes read per split
    (the split-by-file layout: in all, as for the stdlib); ``None`` reads everything. ``val_max_bytes`` caps the
    validation split on its own."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ValueError(f"data.root {base} does not exist or is not a directory (expected {LAYOUTS})")
    if (base / "train.txt").is_file() or (base / "val.txt").is_file():
        if task == "sequence_classification":
            raise ValueError(f"{base} holds train.txt / val.txt, one text per split: no classes to classify")
        corpus = _split_files(base, max_bytes, val_only, val_max_bytes)
    elif (base / "train").is_dir() or (base / "val").is_dir():
        corpus = _split_folders(base, max_bytes, task, val_only, val_max_bytes)
    else:
        if task == "sequence_classification":
            raise ValueError(f"sequence classification needs {base}/train/<class>/*.txt and {base}/val/<class>/*.txt")
        corpus = _split_by_file(base, _txt_files(base), max_bytes, "local", val_max_bytes)
    _check_not_empty(corpus, base)
    return corpus


def _check_not_empty(corpus: Corpus, base: Path) -> None:
    for name, split in (("train", corpus.train), ("val", corpus.val)):
        if split is None or split.nbytes > 0:
            continue
        if corpus.info["layout"] == "split_by_file" and not split.names:
            total = sum(corpus.info["files"].values())
            raise ValueError(
                f"the {name} split of {base} is empty: its {total} .txt files are assigned to train or "
                f"val by a hash of their path and none went to {name}; with few files, put them in "
                f"{base}/train and {base}/val"
            )
        where = "no .txt files" if not split.names else f"only empty files ({len(split.names)})"
        raise ValueError(f"the {name} split of {base} is empty: {where} (expected {LAYOUTS})")


def load_corpus(
    root: str | Path | None,
    max_bytes: int | None = None,
    task: str | None = None,
    val_only: bool = False,
    val_max_bytes: int | None = None,
) -> Corpus:
    """``root=None``: the stdlib corpus (causal LM only); else :func:`local_corpus`."""
    if root is None or str(root) == "":
        if task == "sequence_classification":
            raise ValueError(
                "the default corpus (data.root=null) has no classes: sequence classification needs "
                "data.root=<dir with train/<class>/*.txt and val/<class>/*.txt>"
            )
        corpus = stdlib_corpus(max_bytes, val_max_bytes)
        if val_only:
            corpus.train = None
        return corpus
    return local_corpus(root, max_bytes, task, val_only, val_max_bytes)
