"""What a path is, told without loading it: the one place that tells a run directory, a training checkpoint, a
sparse export, a plain weights file and a transformers model directory apart.

Deciding must stay cheap and safe: it reads directory listings and, for a file, at most the first bytes of the
pickle inside a torch.save archive (`checkpoint.has_format_tag`); nothing is unpickled, so no code from a file can
run and no weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from superblock.artifacts.checkpoint import CheckpointError, has_format_tag
from superblock.artifacts.format import MANIFEST, WEIGHTS
from superblock.rundir import RunDir

KINDS = ("run", "checkpoint", "export", "weights", "hf")
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")
_DESCRIPTIONS = {
    "run": "a run directory",
    "checkpoint": "a training checkpoint",
    "export": "an export directory",
    "weights": "a plain weights file",
    "hf": "a transformers model directory (config.json, no checkpoints/)",
}


class ArtifactError(ValueError):
    """A path that does not exist, or that is none of the kinds superblock reads."""


@dataclass(frozen=True)
class Artifact:
    """A path and what it is (`kind`, one of KINDS), with the paths that matter for that kind."""

    kind: str
    path: Path
    checkpoint: Path | None = None  # run: its checkpoints/last.pt (None before the first save); checkpoint: the file
    run_dir: Path | None = None  # run: the directory; checkpoint: the run directory it was saved in, if any

    def describe(self) -> str:
        """What the path is, in words for a message."""
        return _DESCRIPTIONS[self.kind]


def resolve(path: str | Path) -> Artifact:
    """Say what `path` is without loading it; ArtifactError when it does not exist or is none of KINDS."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return _directory(p)
    if p.is_file():
        return _file(p)
    raise ArtifactError(f"{path} does not exist")


def _directory(path: Path) -> Artifact:
    if (path / MANIFEST).is_file():
        return Artifact("export", path)
    run = RunDir(path)
    last = next((c for c in (run.last, path / run.last.name) if c.is_file()), None)
    if last is not None or run.best.is_file():
        return Artifact("run", path, last, path)
    if (path / "config.json").is_file():
        return Artifact("hf", path)
    if (path / WEIGHTS).is_file():
        return Artifact("export", path)  # one that lost its manifest: reading it says so
    # Anything else is read as a run directory; one with no checkpoint yet is reported by whoever needs one.
    return Artifact("run", path, None, path)


def _file(path: Path) -> Artifact:
    if has_format_tag(path):
        return Artifact("checkpoint", path, path, _run_dir_of(path))
    if path.suffix in WEIGHT_SUFFIXES:
        return Artifact("weights", path)
    raise ArtifactError(
        f"{path} is none of: a run directory, a training checkpoint, an export directory, a weights file "
        f"({' / '.join(WEIGHT_SUFFIXES)}), a transformers model directory"
    )


def _run_dir_of(checkpoint: Path) -> Path | None:
    run = RunDir.of_checkpoint(checkpoint)
    if run is not None:
        return run.path
    parent = checkpoint.parent
    return parent if RunDir(parent).config.exists() else None


def resolve_checkpoint(path: str | Path) -> Artifact:
    """`resolve(path)` for a caller that loads a training checkpoint: its `checkpoint` is the file to load.
    CheckpointError for a missing path, a run without a checkpoint, or an export / transformers directory. Any
    other file is returned as is: loading it says what is wrong (truncated, foreign, unsafe)."""
    try:
        artifact = resolve(path)
    except ArtifactError as err:
        raise CheckpointError(f"{err}: pass a run directory or a checkpoint file") from None
    if artifact.kind in ("export", "hf"):
        raise CheckpointError(f"{path} is {artifact.describe()}: pass a run directory or a checkpoint file")
    if artifact.kind == "run" and artifact.checkpoint is None:
        run = RunDir(artifact.path)
        expected = run.last.relative_to(run.path).as_posix()
        raise CheckpointError(f"no checkpoint in run directory {artifact.path} (expected {expected})")
    return artifact if artifact.checkpoint is not None else replace(artifact, checkpoint=artifact.path)


def is_export_dir(path: str | Path) -> bool:
    """Whether `path` is a sparse export directory (its manifest.json, or the weights of one that lost it)."""
    p = Path(path)
    return p.is_dir() and resolve(p).kind == "export"
