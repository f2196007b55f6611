"""The sparse checkpoint format: a directory with safetensors weights and a checksummed JSON manifest.

```
<export dir>/
  model.safetensors              masked weights as BSR (<name>.values/.crow_indices/.col_indices), the rest dense
  dense_state_dict.safetensors   folded dense state dict: loads into the plain torchvision/timm model
  manifest.json                  format, model_spec, per-layer layout, source run, equivalence, sha256 of both files
```

Manifest keys added for transformers models (absent in older exports, read as their defaults): a layer's
`transposed` (the model stores that weight as (in, out), a GPT-2 Conv1D; `shape` / `block` describe the stored
(out, in) BSR weight), `tied` ({key: key it shares its tensor with}: stored once, put back at load) and
`sample_input` ({"shape", "vocab_size"}: what the probe and timings fed, token ids when vocab_size is set).

Nothing in the directory is a pickle, so loading it can never run code. The manifest carries the sha256 of each
weights file and a checksum of its own content, so an edited or mismatched file is refused instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from superblock.io import umask

FORMAT = "superblock-sparse"
VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
DENSE_WEIGHTS = "dense_state_dict.safetensors"
BSR_SUFFIXES = ("values", "crow_indices", "col_indices")
LAYOUTS = ("bsr", "dense")


class ExportError(ValueError):
    """A sparse export that cannot be written or read: missing, edited, mismatched, or not ours."""


def bsr_keys(name: str) -> tuple[str, str, str]:
    """The safetensors keys of a weight stored as BSR."""
    return tuple(f"{name}.{suffix}" for suffix in BSR_SUFFIXES)  # type: ignore[return-value]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal(manifest: dict) -> dict:
    """Return the manifest with its `checksum` (sha256 of its canonical JSON without that key)."""
    return {**manifest, "checksum": hashlib.sha256(_canonical(manifest)).hexdigest()}


def read_manifest(path: str | Path) -> dict:
    """The manifest of an export directory, checked for format, version and edits (its checksum)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory: pass an export directory written by export.py")
    file = path / MANIFEST
    if not file.is_file():
        raise ExportError(f"{path} has no {MANIFEST}: not a superblock export, or an incomplete copy of one")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{file} is not valid JSON ({err}): the export is damaged, export it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{file} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ExportError(f"{file} has format version {manifest.get('version')!r}; this superblock reads {VERSION}")
    if manifest.get("checksum") != seal(manifest)["checksum"]:
        raise ExportError(f"{file} was edited after export (checksum mismatch): export the checkpoint again")
    return manifest


def verify_file(path: str | Path, manifest: dict, key: str) -> Path:
    """Check that a weights file exists and is the one the manifest describes (`manifest['files'][key]`)."""
    entry = manifest["files"][key]
    file = Path(path) / entry["name"]
    if not file.is_file():
        raise ExportError(f"{file} is missing: the export directory is incomplete")
    if sha256_file(file) != entry["sha256"]:
        raise ExportError(
            f"{file} does not match {MANIFEST} (sha256 differs): the file was edited, truncated or comes from "
            "another export"
        )
    return file


def file_entry(path: Path) -> dict[str, Any]:
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def publish_permissions(path: Path) -> None:
    """Give a directory made by mkdtemp (0700) and its files the permissions a plain mkdir/open would have."""
    mask = umask()
    path.chmod(0o777 & ~mask)
    for f in path.iterdir():
        f.chmod(0o666 & ~mask)


def write_dir_atomically(output: Path, fill: Callable[[Path], Any], overwrite: bool = False) -> Any:
    """Call `fill(tmp_dir)` and rename the finished directory to `output`; on any error nothing is left behind.

    An existing `output` is an error unless `overwrite`; then it is replaced only after the new one is complete.
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists: pass output=<another dir> or overwrite=true")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    old = None
    try:
        result = fill(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        publish_permissions(tmp)
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not output.exists():
            os.replace(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return result
