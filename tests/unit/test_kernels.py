"""CPU tests of superblock.kernels: backends against a float64 masked-dense reference, modules, tuning cache."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from superblock.kernels import (
    BlockSparseLinear,
    BlockSparseMultiheadAttention,
    bsr_linear,
    bsr_to_dense,
    dense_to_bsr,
    fuse_linear_gelu,
    load_tuning,
    tuning_table,
)
from superblock.kernels import tuning as tuning_mod
from tests.helpers.kernels import random_block_sparse, reference, rel_err, run_in_interpreter

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}


CASES = [  # (out, in, block)
    (64, 96, (16, 16)),
    (96, 64, (32, 32)),
    (100, 70, (16, 32)),  # neither dim a block multiple, rectangular block
    (72, 130, (32, 16)),
    (128, 128, (64, 64)),
]


@pytest.mark.parametrize("backend", ["dense", "torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,block", CASES)
def test_backends_match_reference(backend, dtype, out_f, in_f, block):
    w = random_block_sparse(out_f, in_f, block, 0.4, dtype)
    values, crow, col = dense_to_bsr(w, block)
    x = torch.randn(2, 5, in_f).to(dtype)
    bias = torch.randn(out_f).to(dtype)
    for b, act in [(None, None), (bias, None), (bias, "gelu"), (None, "gelu")]:
        y = bsr_linear(x, values, crow, col, (out_f, in_f), b, act, backend=backend)
        assert y.shape == (2, 5, out_f) and y.dtype == dtype
        assert rel_err(y, reference(x, w, b, act)) < TOL[dtype]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_dtypes_and_leading_dims(index_dtype):
    w = random_block_sparse(48, 40, (16, 8), 0.5)
    values, crow, col = dense_to_bsr(w, (16, 8), index_dtype=index_dtype)
    for shape in [(40,), (3, 40), (2, 3, 4, 40), (0, 40)]:
        x = torch.randn(*shape)
        for backend in ("dense", "torch"):
            y = bsr_linear(x, values, crow, col, (48, 40), backend=backend)
            assert y.shape == (*shape[:-1], 48)
            if x.numel():
                assert rel_err(y, reference(x, w)) < 1e-5


def test_float64_dense_and_torch():
    w = random_block_sparse(40, 50, (8, 8), 0.3, torch.float64)
    values, crow, col = dense_to_bsr(w, 8)
    x = torch.randn(7, 50, dtype=torch.float64)
    for backend in ("dense", "torch", "auto"):
        assert rel_err(bsr_linear(x, values, crow, col, (40, 50), backend=backend), reference(x, w)) < 1e-12


def test_bsr_round_trip_and_layout():
    w = random_block_sparse(70, 45, (16, 32), 0.5)
    values, crow, col = dense_to_bsr(w, (16, 32))
    assert values.shape[1:] == (16, 32) and crow.shape == (6,) and col.shape == (values.shape[0],)
    assert crow.dtype == torch.int32 and int(crow[-1]) == values.shape[0]
    assert torch.equal(bsr_to_dense(values, crow, col, (70, 45)), w)
    # same layout as torch's own BSR conversion on the padded matrix
    ref = F.pad(w, (0, 64 - 45, 0, 80 - 70)).to_sparse_bsr((16, 32))
    assert torch.equal(ref.crow_indices().int(), crow) and torch.equal(ref.col_indices().int(), col)
    assert torch.equal(ref.values(), values)


@pytest.mark.parametrize("backend", ["torch", "dense", "auto"])
def test_no_grad_and_inference_mode_in_any_order(backend):
    mod = BlockSparseLinear.from_dense(random_block_sparse(64, 64, (16, 16), 0.5), torch.randn(64), 16, backend=backend)
    x = torch.randn(4, 64)
    ref = reference(x, mod.to_dense_weight(), mod.bias)
    with torch.no_grad():
        assert rel_err(mod(x), ref) < 1e-5
    with torch.inference_mode():
        assert rel_err(mod(x), ref) < 1e-5
    with torch.no_grad():
        assert rel_err(mod(x), ref) < 1e-5
    if backend != "torch":  # (torch's CPU BSR matmul has no backward)
        xg = x.clone().requires_grad_()
        mod(xg).sum().backward()  # after inference_mode calls, training still works (dense path)
        assert xg.grad is not None


def test_dense_cache_follows_in_place_updates():
    w = random_block_sparse(32, 32, (16, 16), 0.6)
    values, crow, col = dense_to_bsr(w, 16)
    x = torch.randn(4, 32)
    y1 = bsr_linear(x, values, crow, col, (32, 32), backend="dense")
    values.mul_(2)
    y2 = bsr_linear(x, values, crow, col, (32, 32), backend="dense")
    torch.testing.assert_close(y2, 2 * y1)


def test_module_from_dense_matches_linear():
    lin = nn.Linear(70, 100)
    with torch.no_grad():
        lin.weight.copy_(random_block_sparse(100, 70, (32, 16), 0.3))
    mod = BlockSparseLinear.from_dense(lin, block_size=(32, 16))
    assert mod.block_size == (32, 16) and 0 < mod.density < 0.6
    assert torch.equal(mod.to_dense_weight(), lin.weight.detach())
    x = torch.randn(3, 9, 70)
    with torch.no_grad():
        ref = reference(x, lin.weight, lin.bias)
        assert rel_err(mod(x), ref) < 1e-5
        assert rel_err(BlockSparseLinear.from_dense(lin.weight, lin.bias, 16, backend="dense")(x), ref) < 1e-5
    assert "density" in repr(mod)


def test_module_state_dict_resizes_buffers():
    src = BlockSparseLinear.from_dense(random_block_sparse(64, 64, (16, 16), 0.5), torch.randn(64), 16)
    dst = BlockSparseLinear(64, 64, 16)  # nnz 0
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.to_dense_weight(), src.to_dense_weight())
    x = torch.randn(5, 64)
    torch.testing.assert_close(dst(x), src(x))
    half = src.to(torch.bfloat16)
    assert half.values.dtype == torch.bfloat16 and half.crow_indices.dtype == torch.int32


def test_module_training_uses_differentiable_path():
    mod = BlockSparseLinear.from_dense(random_block_sparse(32, 32, (16, 16), 0.5), torch.randn(32), 16)
    x = torch.randn(4, 32, requires_grad=True)
    mod(x).sum().backward()
    torch.testing.assert_close(x.grad, mod.to_dense_weight().sum(0).expand(4, 32))
    with pytest.raises(ValueError, match="inference"):
        bsr_linear(x, mod.values, mod.crow_indices, mod.col_indices, (32, 32), backend="triton")


def _sparse_mlp_pair(dense_fc1: nn.Linear, dense_fc2: nn.Linear, block):
    for lin in (dense_fc1, dense_fc2):
        with torch.no_grad():
            lin.weight.copy_(random_block_sparse(*lin.weight.shape, block, 0.4))
    return BlockSparseLinear.from_dense(dense_fc1, block_size=block), BlockSparseLinear.from_dense(
        dense_fc2, block_size=block
    )


def test_fuse_gelu_torchvision_mlpblock():
    from torchvision.models.vision_transformer import MLPBlock

    mlp = MLPBlock(48, 96, 0.0).eval()
    x = torch.randn(2, 5, 48)
    mlp[0], mlp[3] = _sparse_mlp_pair(mlp[0], mlp[3], (16, 16))
    with torch.no_grad():
        ref = mlp(x)
        assert fuse_linear_gelu(mlp) == 1
        assert mlp[0].activation == "gelu" and isinstance(mlp[1], nn.Identity)
        torch.testing.assert_close(mlp(x), ref)
        assert fuse_linear_gelu(mlp) == 0  # idempotent


def test_fuse_gelu_timm_mlp():
    timm_mlp = pytest.importorskip("timm.layers").Mlp
    mlp = timm_mlp(48, 96, drop=0.0).eval()
    mlp.fc1, mlp.fc2 = _sparse_mlp_pair(mlp.fc1, mlp.fc2, (16, 16))
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        ref = mlp(x)
        assert fuse_linear_gelu(mlp) == 1
        assert mlp.fc1.activation == "gelu" and isinstance(mlp.act, nn.Identity)
        torch.testing.assert_close(mlp(x), ref)


def test_fuse_gelu_leaves_tanh_gelu_and_dense_linears():
    seq = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    assert fuse_linear_gelu(seq) == 0
    seq[0] = BlockSparseLinear.from_dense(nn.Linear(8, 8), block_size=4)
    seq[1] = nn.GELU(approximate="tanh")
    assert fuse_linear_gelu(seq) == 0


def _sparse_mha(embed=64, heads=4, batch_first=True, block=16):
    mha = nn.MultiheadAttention(embed, heads, batch_first=batch_first).eval()
    with torch.no_grad():
        scale = embed**-0.5  # moderate logits: the softmax would amplify rounding differences
        mha.in_proj_weight.copy_(scale * random_block_sparse(3 * embed, embed, (block, block), 0.5))
        mha.out_proj.weight.copy_(scale * random_block_sparse(embed, embed, (block, block), 0.5, seed=1))
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha, BlockSparseMultiheadAttention.from_mha(mha, block)


@pytest.mark.parametrize("batch_first", [True, False])
def test_sparse_mha_matches_torch(batch_first):
    mha, smha = _sparse_mha(batch_first=batch_first)
    x = torch.randn(3, 7, 64) if batch_first else torch.randn(7, 3, 64)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, -2:] = True
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": kpm}):
            ref, _ = mha(x, x, x, need_weights=False, **kwargs)
            out, w = smha(x, x, x, need_weights=False, **kwargs)
            assert w is None
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        y = torch.randn_like(x)  # cross-attention path
        torch.testing.assert_close(smha(x, y, y)[0], mha(x, y, y, need_weights=False)[0], atol=1e-5, rtol=1e-4)


def test_sparse_mha_in_torchvision_encoder_block():
    from torchvision.models.vision_transformer import EncoderBlock

    blk = EncoderBlock(4, 64, 128, 0.0, 0.0).eval()
    mha, _ = _sparse_mha()
    blk.self_attention.load_state_dict(mha.state_dict())
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = blk(x)
        blk.self_attention = BlockSparseMultiheadAttention.from_mha(blk.self_attention, 16)
        torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- bad inputs


def _valid():
    w = random_block_sparse(64, 48, (16, 16), 0.5)
    values, crow, col = dense_to_bsr(w, 16)
    return torch.randn(4, 48), values, crow, col, (64, 48)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: {**a, "values": a["values"][0]}, "values must be"),
        (lambda a: {**a, "values": a["values"].reshape(-1, 8, 32)}, "crow_indices must have"),
        (lambda a: {**a, "col_indices": a["col_indices"][:-1]}, "col_indices must have"),
        (lambda a: {**a, "crow_indices": a["crow_indices"].float()}, "int32 or int64"),
        (lambda a: {**a, "x": a["x"].double()}, "does not match"),
        (lambda a: {**a, "x": a["x"][:, :40]}, "in_features"),
        (lambda a: {**a, "x": a["x"].int()}, "floating point"),
        (lambda a: {**a, "bias": torch.randn(63)}, "bias must be"),
        (lambda a: {**a, "bias": torch.randn(64, dtype=torch.float64)}, "bias dtype"),
        (lambda a: {**a, "activation": "relu"}, "activation"),
        (lambda a: {**a, "backend": "cusparse"}, "backend"),
        (lambda a: {**a, "shape": (64,)}, "shape"),
        (lambda a: {**a, "shape": (64, 0)}, "positive"),
        (lambda a: {**a, "fp32_precision": "fp16"}, "fp32_precision"),
    ],
)
def test_bad_inputs_raise_value_error(mutate, match):
    x, values, crow, col, shape = _valid()
    args = {"x": x, "values": values, "crow_indices": crow, "col_indices": col, "shape": shape}
    with pytest.raises(ValueError, match=match):
        bsr_linear(**mutate(args))


def test_triton_backend_on_cpu_tensors_raises():
    x, values, crow, col, shape = _valid()
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs triton on CPU tensors")
    with pytest.raises(ValueError, match="triton"):
        bsr_linear(x, values, crow, col, shape, backend="triton")


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseLinear.from_dense(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseLinear(8, 8, (4, 0))
    with pytest.raises(ValueError, match="activation"):
        BlockSparseLinear(8, 8, 4, activation="relu")
    with pytest.raises(ValueError, match="nn.Linear"):
        BlockSparseLinear.from_dense([[1.0]], block_size=4)
    with pytest.raises(ValueError, match="2-D"):
        dense_to_bsr(torch.randn(4, 4, 4), 2)


# ------------------------------------------------------------------------------------------------- tuning


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERBLOCK_CACHE_DIR", str(tmp_path))
    tuning_mod.clear_tuning()
    yield tmp_path
    tuning_mod.clear_tuning()


def test_tuning_cache_written_and_read(cache_dir):
    key = tuning_mod.problem_key(50432, 3072, 768, 64, 64, 58, torch.bfloat16, "ieee", True, "gelu")
    assert key == "3072x768|b64x64|d10|bfloat16|bias1|gelu|m65536"
    entry = {"backend": "triton", "config": tuning_mod.candidate_configs(50432, 64, 64, torch.bfloat16)[0]}
    tuning_mod.record("GPU X|torch-1|triton-1", key, entry)
    on_disk = json.loads((cache_dir / "tuning.json").read_text())
    assert on_disk["format"] == "superblock-tuning" and on_disk["scopes"]["GPU X|torch-1|triton-1"][key] == entry
    tuning_mod.clear_tuning()  # a fresh process reads the disk
    assert tuning_mod.lookup("GPU X|torch-1|triton-1", key) == entry
    table = tuning_table()
    tuning_mod.clear_tuning()
    (cache_dir / "tuning.json").unlink()
    assert tuning_mod.lookup("GPU X|torch-1|triton-1", key) is None
    load_tuning(table, persist=True)  # e.g. from an export manifest
    assert tuning_mod.lookup("GPU X|torch-1|triton-1", key) == entry
    assert (cache_dir / "tuning.json").exists()


def test_tuning_target():
    from superblock.kernels import get_tuning_target, set_tuning_target

    key = tuning_mod.problem_key(197, 768, 768, 64, 64, 14, torch.bfloat16, "ieee", False, None)
    assert tuning_mod.problem_key(197, 768, 768, 64, 64, 14, torch.bfloat16, "ieee", False, None, "graph") == (
        key + "|graph"
    )
    xt = tuning_mod.problem_key(197, 768, 768, 64, 64, 14, torch.bfloat16, "ieee", False, None, "graph", True)
    assert xt == key + "|graph|xT"  # a feature-major x is measured on its own; token-major keys are unchanged
    assert get_tuning_target() == "eager"
    set_tuning_target("graph")
    try:
        assert get_tuning_target() == "graph"
    finally:
        set_tuning_target("eager")
    with pytest.raises(ValueError, match="tuning target"):
        set_tuning_target("fast")


def test_tuning_bad_tables(cache_dir):
    with pytest.raises(ValueError, match="superblock-tuning"):
        load_tuning({"scopes": {}})
    with pytest.raises(ValueError, match="version"):
        load_tuning({"format": "superblock-tuning", "version": 99, "scopes": {}})
    with pytest.raises(ValueError, match="bad choice"):
        load_tuning({"format": "superblock-tuning", "version": 1, "scopes": {"s": {"k": {"backend": "x"}}}})
    (cache_dir / "tuning.json").write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring tuning cache"):
        assert tuning_mod.lookup("s", "k") is None


def test_token_buckets_and_candidates():
    assert [tuning_mod.token_bucket(m) for m in (1, 197, 256, 257, 50432)] == [16, 256, 256, 512, 65536]
    for dtype in (torch.bfloat16, torch.float32):
        for block in ((16, 16), (32, 64), (128, 128)):
            for m in (197, 50432):
                cands = tuning_mod.candidate_configs(m, *block, dtype)
                assert cands and all(c["G"] * block[0] <= 256 for c in cands)


# ----------------------------------------------------------------------------------- Triton interpreter


_INTERP_SCRIPT = textwrap.dedent(
    """
    import torch, sys
    from tests.helpers.kernels import random_block_sparse, reference, rel_err
    from superblock.kernels import bsr_linear, dense_to_bsr
    torch.manual_seed(0)
    cases = [((96, 64), (32, 32), {"BLOCK_M": 32, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False}),
             ((100, 70), (16, 32), {"BLOCK_M": 16, "G": 2, "num_warps": 4, "num_stages": 2, "TMA": False}),
             ((72, 130), (32, 16), {"BLOCK_M": 32, "G": 4, "num_warps": 4, "num_stages": 2, "TMA": False}),
             ((128, 96), (32, 32), {"BLOCK_M": 32, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": True})]
    for (out_f, in_f), block, cfg in cases:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            w = random_block_sparse(out_f, in_f, block, 0.4, dtype)
            values, crow, col = dense_to_bsr(w, block)
            x, b = torch.randn(3, 13, in_f).to(dtype), torch.randn(out_f).to(dtype)
            for bias, act in ((None, None), (b, "gelu")):
                y = bsr_linear(x, values, crow, col, (out_f, in_f), bias, act, backend="triton", config=cfg)
                err = rel_err(y, reference(x, w, bias, act))
                assert err < tol, (out_f, in_f, block, cfg, dtype, act, err)
    print("interpreter ok")
    """
)


@pytest.mark.slow
def test_triton_kernel_in_interpreter():
    run_in_interpreter(_INTERP_SCRIPT, expect="interpreter ok")


def test_one_bsr_check_for_the_functional_op_the_module_and_stored_files():
    """check_bsr: the same refusals from bsr_linear, BlockSparseLinear.from_bsr and (with contents) a loaded file."""
    from superblock.kernels import check_bsr

    w = random_block_sparse(48, 40, (16, 8), 0.5)
    values, crow, col = dense_to_bsr(w, (16, 8))
    assert check_bsr(values, crow, col, (48, 40), contents=True) == (48, 40, 16, 8)
    x = torch.randn(3, 40)
    for bad, match in (((values, crow.float(), col), "int32 or int64"), ((values, crow[:-1], col), "crow_indices")):
        with pytest.raises(ValueError, match=match):
            bsr_linear(x, *bad, (48, 40))
        with pytest.raises(ValueError, match=match):
            BlockSparseLinear.from_bsr(*bad, (48, 40))
    stepped = crow.clone()
    stepped[1] = stepped[-1] + 1  # a row pointer past the end: only a read of the indices sees it
    check_bsr(values, stepped, col, (48, 40))
    with pytest.raises(ValueError, match="step back"):
        check_bsr(values, stepped, col, (48, 40), contents=True)


def test_choice_counts_tell_how_many_layers_run_each_backend_per_bucket():
    """choice_counts: per token bucket, the layers per backend (a Triton choice by its kernel)."""
    from superblock.kernels import BlockSparseLinear, choice_counts, dispatch

    square = BlockSparseLinear.from_dense(torch.nn.Linear(64, 64), block_size=32)  # fp32, square: torch's BSR on CPU
    thin = BlockSparseLinear.from_dense(torch.nn.Linear(64, 64), block_size=(32, 16))  # thin tiles: dense on CPU
    model = torch.nn.Sequential(square, thin, torch.nn.ReLU())
    for layer in (square, thin):
        layer.prepare([1, 100])
    config = tuning_mod.candidate_configs(1, 32, 16, torch.bfloat16)[0]
    thin.dispatch[16] = {"backend": "triton", "config": config, "precision": "ieee"}
    kernel = "triton:" + dispatch.kernel_variant(config)
    assert choice_counts(model) == {16: {"torch": 1, kernel: 1}, 128: {"dense": 1, "torch": 1}}
    assert choice_counts(torch.nn.Linear(4, 4)) == {}
