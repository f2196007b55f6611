"""The tile of every weight: one block size for the model, per-layer overrides, and the stored orientation.

A block size always means (output rows, input columns) of the (out, in) weight a layer computes with, whatever the
module stores: a transformers Conv1D (GPT-2) stores (in, out), so its stored tile is the transpose. Overrides give
some weights another tile, for a layer whose dimensions a tall tile does not divide or one that should stay finer:
``[{match: "*.attn.proj", block: [32, 32]}]``; a glob pattern matches a weight's full name or its module's name,
the first matching entry wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from superblock.sparsity.blocks import BlockSize, normalize_block_size
from superblock.sparsity.targets import is_conv1d

Overrides = Sequence[Any] | Mapping[str, Any]


@dataclass(frozen=True)
class Tiling:
    """`block` for every weight unless a pattern of `overrides` names it; all sizes as (out rows, in cols)."""

    block: BlockSize
    overrides: tuple[tuple[str, BlockSize], ...] = ()

    @classmethod
    def of(cls, block_size: Any, overrides: Overrides | None = None) -> Tiling:
        """From a block size (int or pair) and overrides: a list of {"match": pattern, "block": size} (the form
        a YAML config or a Hydra override writes), (pattern, size) pairs, or a {pattern: size} mapping.
        ValueError names a malformed entry."""
        pairs = []
        items = overrides.items() if isinstance(overrides, Mapping) else (overrides or [])
        for entry in items:
            pattern, size = _entry(entry)
            try:
                pairs.append((pattern, normalize_block_size(size)))
            except ValueError as err:
                raise ValueError(f"block_overrides entry {pattern!r}: {err}") from None
        return cls(normalize_block_size(block_size), tuple(pairs))

    def tile(self, name: str) -> BlockSize:
        """The (out rows, in cols) tile of the weight `name` ("<module name>.<parameter>")."""
        return next((block for pattern, block in self.overrides if _names(pattern, name)), self.block)

    def stored(self, name: str, module: nn.Module) -> BlockSize:
        """The tile of the weight as `module` stores it (a Conv1D's is the transpose)."""
        return stored_block(module, self.tile(name))

    def unused(self, names: list[str]) -> list[str]:
        """Override patterns that name none of `names` (a typo would otherwise change nothing, silently)."""
        return [pattern for pattern, _ in self.overrides if not any(_names(pattern, n) for n in names)]

    def to_list(self) -> list[dict[str, Any]]:
        """The overrides as a config writes them (JSON-able, in order)."""
        return [{"match": p, "block": list(b)} for p, b in self.overrides]


def stored_block(module: nn.Module, block: BlockSize) -> BlockSize:
    """The tile of `module`'s stored weight for a tile of (out rows, in cols): transposed for a Conv1D."""
    return (block[1], block[0]) if is_conv1d(module) else (block[0], block[1])


def _entry(entry: Any) -> tuple[str, Any]:
    """(pattern, block size) of one override entry."""
    if isinstance(entry, Mapping) and set(entry) == {"match", "block"}:
        pattern, size = entry["match"], entry["block"]
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
        pattern, size = entry
    else:
        raise ValueError(
            f"block_overrides entries are {{match: <glob pattern>, block: <size>}}, got {entry!r}: e.g. "
            "block_overrides=[{match: '*.attn.proj', block: [32, 32]}]"
        )
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"block_overrides entry {entry!r}: match must be a non-empty glob pattern")
    return pattern, size


def _names(pattern: str, name: str) -> bool:
    """Whether a glob pattern names the weight `name` or its module (the convention of `targets` / `exclude`)."""
    module_name = name.rpartition(".")[0]
    return fnmatchcase(name, pattern) or bool(module_name) and fnmatchcase(module_name, pattern)
