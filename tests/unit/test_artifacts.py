"""superblock.artifacts: what a path is (resolve, without loading it) and rebuilding a model from a saved spec."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from superblock.artifacts.checkpoint import CheckpointError, load_checkpoint
from superblock.artifacts.resolve import ArtifactError, resolve, resolve_checkpoint
from superblock.artifacts.spec import build_from_spec
from superblock.export import export_checkpoint
from superblock.sparsity import get_controller
from tests.helpers.runs import logits, make_run, probe


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """One path of every kind (and a few that are none), built as superblock and its users write them."""
    root = tmp_path_factory.mktemp("artifacts")
    make_run(root / "run")
    export_checkpoint(root / "run", root / "export", device="cpu", layout="bsr", probe_batch=2, echo=lambda _: None)
    shutil.copy(root / "run" / "checkpoints" / "last.pt", root / "loose.pt")
    torch.save({"w": torch.ones(2)}, root / "state_dict.pt")
    save_file({"w": torch.ones(2)}, str(root / "weights.safetensors"))
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(root / "hf" / "model.safetensors"))
    (root / "garbage.pt").write_bytes(b"not a zip archive")
    (root / "notes.txt").write_text("hello")
    (root / "empty_run" / "checkpoints").mkdir(parents=True)
    return root


def test_resolve_tells_every_kind_apart(paths):
    run = resolve(paths / "run")
    assert (run.kind, run.checkpoint, run.run_dir) == ("run", paths / "run" / "checkpoints" / "last.pt", paths / "run")
    ckpt = resolve(paths / "run" / "checkpoints" / "last.pt")
    assert (ckpt.kind, ckpt.checkpoint, ckpt.run_dir) == ("checkpoint", ckpt.path, paths / "run")
    assert resolve(paths / "loose.pt").kind == "checkpoint" and resolve(paths / "loose.pt").run_dir is None
    assert resolve(paths / "export").kind == "export"
    assert resolve(paths / "state_dict.pt").kind == "weights"
    assert resolve(paths / "weights.safetensors").kind == "weights"
    assert resolve(paths / "hf").kind == "hf"  # config.json + model.safetensors, no checkpoints/: not an export
    assert resolve(paths / "garbage.pt").kind == "weights"  # its loader says what is wrong with it
    empty = resolve(paths / "empty_run")
    assert (empty.kind, empty.checkpoint) == ("run", None)


def test_resolve_errors_are_actionable(paths):
    with pytest.raises(ArtifactError, match="missing does not exist"):
        resolve(paths / "missing")
    with pytest.raises(ArtifactError, match="none of: a run directory"):
        resolve(paths / "notes.txt")
    with pytest.raises(CheckpointError, match="does not exist: pass a run directory or a checkpoint file"):
        resolve_checkpoint(paths / "missing")
    with pytest.raises(CheckpointError, match="is an export directory"):
        resolve_checkpoint(paths / "export")
    with pytest.raises(CheckpointError, match="no checkpoint in run directory"):
        resolve_checkpoint(paths / "empty_run")
    assert resolve_checkpoint(paths / "state_dict.pt").checkpoint == paths / "state_dict.pt"


def test_resolve_never_unpickles(paths, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("resolve unpickled a file")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    kinds = [resolve(paths / name).kind for name in ("run", "run/checkpoints/last.pt", "state_dict.pt", "garbage.pt")]
    assert kinds == ["run", "checkpoint", "weights", "weights"]


@pytest.mark.parametrize("sparsity", [0.75, None])
def test_build_from_spec_takes_the_state_saved_with_the_spec(tmp_path, sparsity):
    model = make_run(tmp_path / "run", sparsity=sparsity)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    rebuilt = build_from_spec(state["model_spec"], state["sparsity_spec"])
    assert (get_controller(rebuilt) is not None) == (sparsity is not None)
    rebuilt.load_state_dict(state["model"])  # strict: every key of the saved model, nothing more
    x = probe()
    torch.testing.assert_close(logits(rebuilt.eval(), x), logits(model, x), rtol=0, atol=0)


def test_build_from_spec_never_reads_the_pretrained_file(tmp_path):
    make_run(tmp_path / "run", sparsity=None)
    spec = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model_spec"]
    model = build_from_spec({**spec, "pretrained": str(tmp_path / "gone.safetensors")})  # a read would raise
    reference = build_from_spec(spec)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}
