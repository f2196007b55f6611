"""Atomic writes: whole files only, with the permissions a plain open() would give."""

import json
import os

import pytest
import torch

from superblock.artifacts.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from superblock.io import umask, write_json_atomically


def test_atomic_files_get_umask_permissions_not_mkstemp_0600(tmp_path):
    expected = 0o666 & ~umask()
    ckpt = save_checkpoint(tmp_path / "c" / "last.pt", {"model": {"w": torch.ones(2)}})
    js = write_json_atomically(tmp_path / "summary.json", {"a": 1, "p": tmp_path})
    for path in (ckpt, js):
        assert os.stat(path).st_mode & 0o777 == expected
    assert json.loads(js.read_text()) == {"a": 1, "p": str(tmp_path)}
    assert load_checkpoint(ckpt)["model"]["w"].sum() == 2
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c", "last.pt", "summary.json"]  # no temp files left


def test_garbage_is_a_checkpoint_error(tmp_path):
    (tmp_path / "x.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "x.pt")


def test_tuning_cache_is_written_atomically_with_umask_permissions(tmp_path, monkeypatch):
    from superblock.kernels import tuning

    monkeypatch.setenv("SUPERBLOCK_CACHE_DIR", str(tmp_path))
    tuning.record("scope", "key", {"backend": "dense"})
    path = tuning.cache_path()
    assert path.parent == tmp_path and (path.stat().st_mode & 0o777) == 0o666 & ~umask()
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    tuning.clear_tuning()
