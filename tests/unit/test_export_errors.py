"""Bad input to export / load_sparse: a clear error, no code run from a file, nothing half-written."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from superblock import devices as devices_mod
from superblock.artifacts.checkpoint import CheckpointError
from superblock.artifacts.format import MANIFEST, WEIGHTS
from superblock.export import ExportError, export_checkpoint, load_sparse, read_manifest
from tests.helpers.runs import make_run


def export(run, out, **kw):
    kw = {"device": "cpu", "layout": "bsr", "probe_batch": 2, "echo": lambda _: None, **kw}
    return export_checkpoint(run, out, **kw)


def leftovers(parent) -> list[str]:
    """Anything in `parent` besides the inputs: temp dirs or partial exports."""
    return sorted(p.name for p in parent.iterdir() if p.name not in ("run", "good", "ckpt.pt", "marker"))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    make_run(root / "run")
    export(root / "run", root / "good")
    return root


@pytest.fixture
def copy_of_good(good, tmp_path):
    shutil.copytree(good / "good", tmp_path / "exp")
    return tmp_path / "exp"


class Payload:
    """Pickles to a call that creates `marker` when unpickled by a plain (unsafe) unpickler."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


# ------------------------------------------------------------------------------------------------ checkpoints


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(CheckpointError, match="no checkpoint in run directory"):
        export(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint(good, tmp_path):
    data = (good / "run" / "checkpoints" / "last.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        export(tmp_path / "ckpt.pt", tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_foreign_checkpoint(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="not a superblock checkpoint"):
        export(tmp_path / "ckpt.pt", tmp_path / "out")
    (tmp_path / "ckpt.pt").write_text("hello")
    with pytest.raises(CheckpointError):
        export(tmp_path / "ckpt.pt", tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    payload = {"format": "superblock-checkpoint", "version": 1, "model": Payload(marker)}
    torch.save(payload, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        export(tmp_path / "ckpt.pt", tmp_path / "out")
    assert not marker.exists()
    assert leftovers(tmp_path) == []
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload is real: a plain unpickler runs it
    assert marker.exists()


# ------------------------------------------------------------------------------------------------ export dirs


def test_missing_manifest(copy_of_good):
    (copy_of_good / MANIFEST).unlink()
    with pytest.raises(ExportError, match="no manifest.json"):
        load_sparse(copy_of_good)


def test_edited_manifest(copy_of_good):
    manifest = json.loads((copy_of_good / MANIFEST).read_text())
    manifest["layers"][0]["density"] = 0.5
    (copy_of_good / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="edited after export"):
        load_sparse(copy_of_good)
    (copy_of_good / MANIFEST).write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        read_manifest(copy_of_good)


def test_edited_or_swapped_weights(copy_of_good, tmp_path):
    data = bytearray((copy_of_good / WEIGHTS).read_bytes())
    data[-3] ^= 0xFF
    (copy_of_good / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256 differs"):
        load_sparse(copy_of_good)
    (copy_of_good / WEIGHTS).unlink()
    with pytest.raises(ExportError, match="missing"):
        load_sparse(copy_of_good)


def test_not_an_export_dir(tmp_path):
    with pytest.raises(ExportError, match="no manifest.json"):
        load_sparse(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ExportError, match="not a superblock-sparse manifest"):
        load_sparse(tmp_path)


# ------------------------------------------------------------------------------------------------ options


def test_existing_output_needs_overwrite(good):
    before = read_manifest(good / "good")
    with pytest.raises(ExportError, match="already exists"):
        export(good / "run", good / "good")
    export(good / "run", good / "good", overwrite=True)
    assert read_manifest(good / "good")["created"] >= before["created"]
    assert leftovers(good) == []


def test_failed_equivalence_writes_nothing(good):
    with pytest.raises(ExportError, match="does not match the training model"):
        export(good / "run", good / "strict", dtype="bf16", tolerance=1e-12)
    assert leftovers(good) == []


def test_a_failed_check_says_when_the_dtype_alone_is_the_cause(good):
    """The dense model cast to bf16 misses a tolerance as much as the export does: the message says the loss is
    bf16's, and what to do (fp32, or a tolerance to accept it)."""
    with pytest.raises(ExportError, match=r"the loss is bf16's, not the sparse export's.*tolerance=") as err:
        export(good / "run", good / "strict_dtype", dtype="bf16", tolerance=1e-12)
    assert "Try dtype=fp32 or another backend" not in str(err.value)
    assert leftovers(good) == []


def test_a_failed_check_blames_the_export_when_the_dtype_alone_is_fine(good, monkeypatch):
    """An export whose logits are off while the dense model in bf16 is within tolerance: the export is at fault."""
    import superblock.export.writer as writer

    real = writer.load_sparse

    def off_by_a_lot(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_hook(lambda _m, _i, out: out + 10.0 * out.abs().max())
        return model

    monkeypatch.setattr(writer, "load_sparse", off_by_a_lot)
    with pytest.raises(ExportError, match="Try dtype=fp32 or another backend") as err:
        export(good / "run", good / "broken", dtype="bf16")
    assert "the loss is" not in str(err.value)
    assert "(the dense model cast to bf16: " in str(err.value)  # the yardstick beside the export's error
    assert leftovers(good) == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dtype": "fp8"}, "dtype='fp8' is not one of"),
        ({"layout": "sparse"}, "layout='sparse' is not one of"),
        ({"batch_size": 0}, "must be > 0"),
        ({"tolerance": -1.0}, "tolerance must be > 0"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_options(good, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export(good / "run", good / "bad", **kwargs)
    assert not (good / "bad").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(good):
    with pytest.raises(ValueError, match="CUDA is not available"):
        export(good / "run", good / "bad", device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_sparse(good / "good", device="cuda")


def test_dtype_the_device_cannot_run(good, monkeypatch):
    def no_half(*args, **kwargs):
        raise RuntimeError("\"LayerNormKernelImpl\" not implemented for 'Half'")

    monkeypatch.setattr(devices_mod.F, "layer_norm", no_half)
    with pytest.raises(ValueError, match="dtype=fp16 cannot run on cpu"):
        export(good / "run", good / "bad", dtype="fp16")
    with pytest.raises(ValueError, match="dtype=fp16 cannot run on cpu"):
        load_sparse(good / "good", dtype="fp16")
    assert not (good / "bad").exists()


def test_use_ema_without_ema(good):
    with pytest.raises(CheckpointError, match="no EMA weights"):
        export(good / "run", good / "bad", use_ema=True)
