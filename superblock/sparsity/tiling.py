"""The tile of every weight: one block size for the model, per-layer overrides, and the stored orientation.

A block size always means (output rows, input columns) of the (out, in) weight a layer computes with, whatever the
module stores: a transformers Conv1D (GPT-2) stores (in, out), so its stored tile is the transpose. Overrides give
some weights another tile, for a layer whose dimensions a tall tile does not divide or one that should stay finer:
``[{match: "*.attn.proj", block: [32, 32]}]``; a glob pattern matches a weight's full name or its module's name,
the first matching entry wins. Level overrides (`Levels`) give some weights another sparsity the same way:
``[{match: "*.mlp.up_proj", level: 0.3}]``.
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


@dataclass(frozen=True)
class Levels:
    """A sparsity for every weight unless a pattern of `overrides` names it (the first matching entry wins): for
    weights a model cannot lose as much of (a pretrained LM's MLP input projections, its first layer). Each weight
    ramps with the schedule to its own level: at step t it is at schedule(t) * level / final."""

    overrides: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, overrides: Overrides | None) -> Levels:
        """From a list of {"match": pattern, "level": sparsity}, (pattern, sparsity) pairs or {pattern: sparsity}."""
        pairs = []
        items = overrides.items() if isinstance(overrides, Mapping) else (overrides or [])
        for entry in items:
            pattern, level = _entry(entry, "level_overrides", "level", "0.3")
            if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 <= float(level) < 1.0:
                raise ValueError(
                    f"level_overrides entry {pattern!r}: level must be a sparsity in [0, 1), got {level!r}"
                )
            pairs.append((pattern, float(level)))
        return cls(tuple(pairs))

    def level(self, name: str) -> float | None:
        """The sparsity an override gives the weight `name`, or None (the model's level)."""
        return next((level for pattern, level in self.overrides if _names(pattern, name)), None)

    def unused(self, names: list[str]) -> list[str]:
        return [pattern for pattern, _ in self.overrides if not any(_names(pattern, n) for n in names)]

    def to_list(self) -> list[dict[str, Any]]:
        return [{"match": p, "level": v} for p, v in self.overrides]


def stored_block(module: nn.Module, block: BlockSize) -> BlockSize:
    """The tile of `module`'s stored weight for a tile of (out rows, in cols): transposed for a Conv1D."""
    return (block[1], block[0]) if is_conv1d(module) else (block[0], block[1])


def _entry(entry: Any, what: str = "block_overrides", key: str = "block", example: str = "[32, 32]") -> tuple[str, Any]:
    """(pattern, value) of one override entry: {match: pattern, <key>: value} or a (pattern, value) pair."""
    if isinstance(entry, Mapping) and set(entry) == {"match", key}:
        pattern, value = entry["match"], entry[key]
    elif isinstance(entry, (tuple, list)) and len(entry) == 2:
        pattern, value = entry
    else:
        raise ValueError(
            f"{what} entries are {{match: <glob pattern>, {key}: <value>}}, got {entry!r}: e.g. "
            f"{what}=[{{match: '*.attn.proj', {key}: {example}}}]"
        )
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{what} entry {entry!r}: match must be a non-empty glob pattern")
    return pattern, value


def _names(pattern: str, name: str) -> bool:
    """Whether a glob pattern names the weight `name` or its module (the convention of `targets` / `exclude`)."""
    module_name = name.rpartition(".")[0]
    return fnmatchcase(name, pattern) or bool(module_name) and fnmatchcase(module_name, pattern)
