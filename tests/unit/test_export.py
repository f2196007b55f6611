"""Export -> load_sparse reproduces the masked training model; the folded state dict needs no superblock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from superblock.artifacts.format import DENSE_WEIGHTS, WEIGHTS
from superblock.export import export_checkpoint, load_folded, load_sparse, read_manifest
from superblock.export.convert import install_bsr, masked_layers, pack_tensors, unpack_tensors
from superblock.export.layout import assign_layouts
from superblock.export.writer import fold_copy
from superblock.kernels import BlockSparseLinear, BlockSparseMultiheadAttention, fuse_linear_gelu
from superblock.sparsity import sparsify
from tests.helpers.runs import logits, make_run, probe

FP32 = {"atol": 1e-4, "rtol": 1e-4}


def quiet(_: str) -> None:
    pass


def export(run, out, **kw):
    kw = {"device": "cpu", "layout": "bsr", "probe_batch": 2, "echo": quiet, **kw}
    return export_checkpoint(run, out, **kw)


def count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


# ------------------------------------------------------------------------------------------------ in memory


class Toy(nn.Module):
    """torchvision-style attention (nn.MultiheadAttention) plus an MLP whose sizes are not block multiples."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(48, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(48, 70), nn.GELU(), nn.Linear(70, 48))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x, x, x, need_weights=False)[0] + self.mlp(x)


@pytest.mark.parametrize("targets", [["mlp", "attn"], ["attn.out_proj", "mlp.2"]])
def test_pack_install_matches_masked_model(targets):
    model = Toy().eval()
    sparsify(model, sparsity=0.5, block_size=(16, 8), targets=targets, seed=0)
    x = torch.randn(2, 5, 48)
    layers = masked_layers(model)
    folded = fold_copy(model)
    assign_layouts(folded, layers, "bsr")
    tensors, bsr = pack_tensors(folded, layers)
    dense, restored = unpack_tensors(tensors, layers)
    assert set(restored) == {layer.name for layer in layers} and not set(restored) & set(dense)
    install_bsr(folded, restored, backend="torch")
    assert fuse_linear_gelu(folded) == ("mlp" in targets)
    assert isinstance(folded.attn, BlockSparseMultiheadAttention)
    torch.testing.assert_close(logits(folded, x), logits(model, x), **FP32)
    layer = next(la for la in layers if la.name == "mlp.2.weight")
    assert layer.shape == (48, 70) and layer.total_blocks == 3 * 9 and 0 < layer.density <= 0.52


# ------------------------------------------------------------------------------------------------ real models


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    root = tmp_path_factory.mktemp("vitb16")
    masked = make_run(root / "run", "vit_b_16", sparsity=0.9, block_size=32, targets=("mlp", "attn"))
    result = export(root / "run", root / "export")
    return root, masked, result


def test_vit_b16_load_sparse_equals_masked(vit_b16):
    root, masked, result = vit_b16
    manifest = result.manifest
    assert len(manifest["layers"]) == 48 and all(d["layout"] == "bsr" for d in manifest["layers"])
    assert all(abs(d["density"] - 0.1) < 0.02 for d in manifest["layers"])
    assert manifest["equivalence"]["passed"] and manifest["equivalence"]["max_rel_err"] < 1e-4
    model = load_sparse(root / "export")
    assert count(model, BlockSparseMultiheadAttention) == 12 and count(model, BlockSparseLinear) == 48
    x = probe()
    torch.testing.assert_close(logits(model, x), logits(masked, x), **FP32)


def test_vit_b16_folded_state_dict_loads_without_superblock(vit_b16):
    root, masked, _ = vit_b16
    x = probe()
    save_file({"x": x, "logits": logits(masked, x)}, str(root / "probe.safetensors"))
    script = textwrap.dedent(
        f"""
        import sys
        import torch, torchvision
        from safetensors.torch import load_file
        model = torchvision.models.vit_b_16(num_classes=10, image_size=32).eval()
        model.load_state_dict(load_file({str(root / "export" / DENSE_WEIGHTS)!r}))
        ref = load_file({str(root / "probe.safetensors")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(ref["x"]), ref["logits"], atol=1e-4, rtol=1e-4)
        assert not [m for m in sys.modules if m.startswith("superblock")], "superblock was imported"
        print("vanilla ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing that could pull superblock in
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "vanilla ok" in out.stdout, out.stderr


def test_timm_vit_with_non_multiple_layer(tmp_path):
    """timm ViT with every Linear masked, including the 100-class head: 100 rows are not a multiple of 32."""
    masked = make_run(
        tmp_path / "run",
        "timm:vit_tiny_patch16_224",
        num_classes=100,
        sparsity=0.7,
        block_size=32,
        targets=("all_linear",),
        skip_head=False,
        model_kwargs={"depth": 2},
    )
    result = export(tmp_path / "run", tmp_path / "export")
    head = next(d for d in result.manifest["layers"] if d["name"] == "head.weight")
    assert head["layout"] == "bsr" and head["shape"] == [100, 192] and head["total_blocks"] == 4 * 6
    stored = load_file(str(tmp_path / "export" / WEIGHTS))
    assert stored["head.weight.values"].shape[1:] == (32, 32) and stored["head.weight.crow_indices"].numel() == 5
    assert "head.weight" not in stored and "head.bias" in stored
    model = load_sparse(tmp_path / "export")
    assert isinstance(model.head, BlockSparseLinear) and isinstance(model.blocks[0].attn.qkv, BlockSparseLinear)
    assert model.blocks[0].mlp.fc1.activation == "gelu"  # fused
    x = probe()
    torch.testing.assert_close(logits(model, x), logits(masked, x), **FP32)
    torch.testing.assert_close(logits(load_folded(tmp_path / "export"), x), logits(masked, x), **FP32)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """micro_vit with every projection masked, the 10-class head too (10 rows: not a multiple of the block 8)."""
    root = tmp_path_factory.mktemp("micro")
    masked = make_run(root / "run", "micro_vit", targets=("all_linear",), skip_head=False)
    return root, masked


def test_micro_vit_head_edge_tiles(micro_run):
    root, masked = micro_run
    manifest = export(root / "run", root / "export").manifest
    head = next(d for d in manifest["layers"] if d["name"] == "heads.head.weight")
    assert head["layout"] == "bsr" and head["shape"] == [10, 64] and head["total_blocks"] == 2 * 8
    x = probe()
    torch.testing.assert_close(logits(load_sparse(root / "export"), x), logits(masked, x), **FP32)


def test_file_size_shrinks_with_density(tmp_path):
    sizes = {}
    for sparsity in (0.5, 0.9):
        make_run(tmp_path / f"run{sparsity}", "micro_vit", sparsity=sparsity, block_size=8)
        m = export(tmp_path / f"run{sparsity}", tmp_path / f"exp{sparsity}").manifest
        dense, stored = m["sizes"]["masked_weights_dense_bytes"], m["sizes"]["masked_weights_stored_bytes"]
        # values of the kept blocks plus int32 crow/col indices, nothing else
        assert stored == sum(4 * (d["nnz_blocks"] * (8 * 8 + 1) + d["shape"][0] // 8 + 1) for d in m["layers"])
        assert stored == pytest.approx((1 - sparsity) * dense, rel=0.03)
        sizes[sparsity] = m["files"]["weights"]["bytes"]
        assert sizes[sparsity] < m["files"]["dense"]["bytes"]
    assert sizes[0.9] < 0.6 * sizes[0.5]


def test_a_weight_that_keeps_every_tile_is_stored_dense(tmp_path):
    """A level-0 override (SmolLM2's first two layers stay dense): nothing for a block-sparse kernel to skip, so even
    layout=bsr stores it dense (BSR would only add indices and a slower product); the other weights stay BSR."""
    first = "encoder.layers.encoder_layer_0."
    masked = make_run(tmp_path / "run", "micro_vit", level_overrides=[{"match": first + "*", "level": 0.0}])
    layers = export(tmp_path / "run", tmp_path / "export").manifest["layers"]  # layout=bsr
    kept_all = [d for d in layers if d["name"].startswith(first)]
    assert len(kept_all) == 4 and all(d["density"] == 1.0 and d["layout"] == "dense" for d in kept_all)
    assert all("keeps every tile" in d["reason"] for d in kept_all)
    assert all(d["layout"] == "bsr" for d in layers if not d["name"].startswith(first))
    model = load_sparse(tmp_path / "export")
    assert not isinstance(model.encoder.layers.encoder_layer_0.mlp[0], BlockSparseLinear)
    assert isinstance(model.encoder.layers.encoder_layer_1.mlp[0], BlockSparseLinear)
    x = probe()
    torch.testing.assert_close(logits(model, x), logits(masked, x), **FP32)


def test_bf16_export_within_tolerance(micro_run):
    root, masked = micro_run
    manifest = export(root / "run", root / "export_bf16", dtype="bf16").manifest
    eq = manifest["equivalence"]
    assert manifest["dtype"] == "bf16" and eq["passed"] and eq["max_rel_err"] <= eq["tolerance"]
    assert 0.0 < eq["dtype_only"]["max_rel_err"] <= eq["tolerance"]  # the dense model cast to bf16, beside it
    model = load_sparse(root / "export_bf16")
    assert model.heads.head.values.dtype == torch.bfloat16
    x = probe()
    ref = logits(masked, x)
    assert (logits(model, x, torch.bfloat16) - ref).abs().max() <= eq["tolerance"] * ref.abs().max()


def test_layout_auto_measures_and_dense_says_why(micro_run, capsys):
    root, masked = micro_run
    manifest = export(root / "run", root / "export_auto", layout="auto", batch_size=2).manifest
    n = len(manifest["layers"])
    assert f"layout: {n}/{n} layers (100%)" in capsys.readouterr().err  # the measuring shows its progress
    for d in manifest["layers"]:
        tokens = 1 if d["name"] == "heads.head.weight" else 65  # the head sees the class token only
        (row,) = d["timing"]["per_batch"]
        assert row["batch"] == 2 and row["tokens"] == 2 * tokens and row["bsr_ms"] > 0 and row["dense_ms"] > 0
        assert d["timing"]["runtime"] == "eager" and row["kernel"] in ("torch", "dense")
        assert (d["layout"] == "dense") == bool(d["reason"])
    assert manifest["layout_policy"] == {
        "mode": "auto",
        "device": "cpu",
        "batch_sizes": [2],
        "runtime": "eager",
        "backend": "auto",
    }
    x = probe()
    torch.testing.assert_close(logits(load_sparse(root / "export_auto"), x), logits(masked, x), **FP32)
    forced = export(root / "run", root / "export_dense", layout="dense").manifest
    assert all(d["layout"] == "dense" and "layout=dense" in d["reason"] for d in forced["layers"])
    assert count(load_sparse(root / "export_dense"), BlockSparseLinear) == 0


def test_layout_auto_across_batch_sizes(micro_run):
    """Every named batch size is timed per layer (in the runtime asked for) and recorded in the manifest; a layer
    is BSR only if it is nowhere slower than dense, and the reason names the batch size when it is."""
    root, masked = micro_run
    manifest = export(
        root / "run", root / "export_multi", layout="auto", batch_sizes=[1, 4, 8], runtime="compile"
    ).manifest
    assert manifest["layout_policy"]["batch_sizes"] == [1, 4, 8] and manifest["layout_policy"]["runtime"] == "compile"
    for d in manifest["layers"]:
        rows = d["timing"]["per_batch"]
        assert [r["batch"] for r in rows] == [1, 4, 8] and d["timing"]["runtime"] == "compile"
        assert d["timing"]["timed"] == "eager"  # compile is timed as eager launches; cudagraph on CUDA as GPU time
        tokens = rows[0]["tokens"]
        assert [r["tokens"] for r in rows] == [tokens, 4 * tokens, 8 * tokens]
        slower = [r for r in rows if r["kernel"] != "dense" and r["bsr_ms"] > 1.02 * r["dense_ms"]]
        if d["layout"] == "bsr":
            assert not slower and d["reason"] is None
        else:
            assert "batch" in d["reason"]
    x = probe()
    torch.testing.assert_close(logits(load_sparse(root / "export_multi"), x), logits(masked, x), **FP32)


def test_layout_verdict_rule():
    from superblock.export.layout import _verdict

    def timing(*rows):
        keys = ("batch", "tokens", "dense_ms", "bsr_ms", "kernel")
        return {"per_batch": [dict(zip(keys, r, strict=True)) for r in rows]}

    faster_big = timing((1, 197, 0.010, 0.011, "dense"), (256, 50432, 0.30, 0.12, "triton"))
    assert _verdict(faster_big, 0.02, "x") is None  # batch 1 runs the dense kernel itself: a tie
    slower_small = timing((1, 197, 0.010, 0.013, "triton"), (256, 50432, 0.30, 0.12, "triton"))
    assert "batch 1 (197 tokens)" in _verdict(slower_small, 0.02, "x")
    no_gain = timing((1, 197, 0.010, 0.010, "dense"), (8, 1576, 0.020, 0.0201, "triton"))
    assert "not faster than dense at any" in _verdict(no_gain, 0.02, "x")


def test_manifest_records_source_and_files(micro_run):
    root, _ = micro_run
    if not (root / "export").exists():
        export(root / "run", root / "export")
    manifest = read_manifest(root / "export")
    assert manifest["model_spec"]["name"] == "micro_vit"
    assert manifest["source"]["metrics"] == {"val_top1": 12.5} and manifest["source"]["step"] == 10
    assert manifest["source"]["config"]["data"]["name"] == "synthetic"
    assert manifest["torch_version"] == torch.__version__
    assert set(manifest["files"]) == {"weights", "dense"} and len(manifest["files"]["weights"]["sha256"]) == 64
    on_disk = json.loads((root / "export" / "manifest.json").read_text())
    assert on_disk == manifest


def test_dense_run_exports_plain(tmp_path):
    masked = make_run(tmp_path / "run", sparsity=None)
    manifest = export(tmp_path / "run", tmp_path / "export").manifest
    assert manifest["layers"] == [] and manifest["source"]["sparsity_spec"] is None
    x = probe()
    torch.testing.assert_close(logits(load_sparse(tmp_path / "export"), x), logits(masked, x), **FP32)
