"""torch.ops.superblock.bsr_linear and BlockSparseLinear under torch.library.opcheck, torch.compile and torch.export
(CPU: dense and torch backends; the triton backend is covered on the GPU in tests/gpu/test_kernels_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from superblock.kernels import BlockSparseLinear, BlockSparseMultiheadAttention, _runners, bsr_linear, dense_to_bsr, ops
from tests.helpers.kernels import random_block_sparse, reference, rel_err

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


def _layer(out_f=64, in_f=48, block=(16, 16), backend="auto", activation=None, bias=True, seed=0):
    w = random_block_sparse(out_f, in_f, block, 0.4, seed=seed)
    b = torch.randn(out_f) if bias else None
    return BlockSparseLinear.from_dense(w, b, block, activation=activation, backend=backend), w, b


def _op_args(x, values, crow, col, bias, activation, backend, out_f):
    return (x, values, crow, col, None, bias, out_f, activation, backend, "ieee", [])


# ---------------------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("backend", ["dense", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation,with_bias", [("none", False), ("gelu", True)])
def test_opcheck(backend, dtype, activation, with_bias):
    w = random_block_sparse(64, 40, (16, 8), 0.5, dtype)
    values, crow, col = dense_to_bsr(w, (16, 8))
    bias = torch.randn(64).to(dtype) if with_bias else None
    for x in (torch.randn(3, 7, 40).to(dtype), torch.randn(5, 40).to(dtype)):
        args = _op_args(x, values, crow, col, bias, activation, backend, 64)
        torch.library.opcheck(torch.ops.superblock.bsr_linear.default, args)
        y = torch.ops.superblock.bsr_linear(*args)
        act = None if activation == "none" else activation
        assert y.shape == (*x.shape[:-1], 64) and y.dtype == dtype and y.is_contiguous()
        assert rel_err(y, reference(x, w, bias, act)) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_triton_op_fake_impl_and_config_check():
    """superblock::bsr_linear_triton traces on fake CUDA tensors (no GPU needed: nothing launches) and refuses the
    configurations it does not launch (TMA, the decode kernel)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert ops.tiled_config([64, 2, 4, 2, 0]) and ops.tiled_config([64, 1, 4, 2, 0, 0])
    assert not ops.tiled_config([64, 1, 4, 2, 1]) and not ops.tiled_config([16, 1, 4, 1, 0, 4])
    with FakeTensorMode():
        x = torch.empty(2, 9, 70, device="cuda", dtype=torch.bfloat16)
        values = torch.empty(6, 32, 16, device="cuda", dtype=torch.bfloat16)
        crow, col = torch.empty(5, dtype=torch.int32, device="cuda"), torch.empty(6, dtype=torch.int32, device="cuda")
        y = torch.ops.superblock.bsr_linear_triton(
            x, values, crow, col, None, None, 100, "gelu", "ieee", [64, 1, 4, 2, 0]
        )
        assert y.shape == (2, 9, 100) and y.dtype == torch.bfloat16 and y.device.type == "cuda"
        with pytest.raises(ValueError, match="tiled kernel without TMA"):
            torch.ops.superblock.bsr_linear_triton(
                x, values, crow, col, None, None, 100, "none", "ieee", [64, 1, 4, 2, 1]
            )


_TRITON_OP_SCRIPT = """
import torch
from superblock.kernels import _runners, dense_to_bsr
from tests.helpers.kernels import random_block_sparse, reference, rel_err
w = random_block_sparse(96, 80, (16, 16), 0.4)
values, crow, col = dense_to_bsr(w, 16)
x, b = torch.randn(2, 5, 80), torch.randn(96)
for group in (1, 2):
    c, k, g = _runners.layout_for(crow, col, group)
    y = torch.ops.superblock.bsr_linear_triton(x, values, c, k, g, b, 96, "gelu", "ieee", [16, group, 4, 1, 0])
    err = rel_err(y, reference(x, w, b, "gelu"))
    assert y.shape == (2, 5, 96) and err < 1e-5, (group, err)
print("triton op ok")
"""


def test_triton_op_runs_the_kernel_in_the_interpreter():
    """The triton_op's eager body launches the real tiled kernel (here through Triton's CPU interpreter)."""
    from tests.helpers.kernels import run_in_interpreter

    run_in_interpreter(_TRITON_OP_SCRIPT, expect="triton op ok", timeout=300)


def test_fake_impl_shapes_and_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = random_block_sparse(100, 70, (32, 16), 0.5)
    values, crow, col = dense_to_bsr(w, (32, 16))
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(2, 9, 70))
        fv, fc, fcol = (mode.from_tensor(t) for t in (values, crow, col))
        y = torch.ops.superblock.bsr_linear(
            fx, fv, fc, fcol, None, None, 100, "gelu", "triton", "ieee", [64, 1, 4, 2, 0]
        )
        assert y.shape == (2, 9, 100) and y.dtype == torch.float32
        with pytest.raises(RuntimeError, match="backend"):
            torch.ops.superblock.bsr_linear(fx, fv, fc, fcol, None, None, 100, "none", "cusparse", "ieee", [])


def test_triton_config_round_trip():
    cfg = {"BLOCK_M": 128, "G": 2, "num_warps": 4, "num_stages": 3, "TMA": True}
    assert _runners.config_to_list(cfg) == [128, 2, 4, 3, 1]
    assert _runners.config_from_list([128, 2, 4, 3, 1]) == cfg
    with pytest.raises(ValueError, match="triton config"):
        _runners.config_from_list([128, 2])


def test_config_lists_parse_inside_a_trace_without_guarding_on_the_memo():
    """Inside torch.compile a config list is parsed afresh: a look-up in the eager memo made dynamo guard on the memo
    ("not ___dict_contains(...)"), and code running during the same trace filled it, so the frame failed its own
    guard on the GPU ("Guard failed on the same frame it was created")."""

    def uses_a_config(x):
        return x * _runners.config_from_list((64, 1, 4, 3, 0))["BLOCK_M"]

    _runners._configs.pop((64, 1, 4, 3, 0), None)
    explained = torch._dynamo.explain(uses_a_config)(torch.ones(2))
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert not [g for g in explained.out_guards if "_configs" in str(g)]
    assert torch.equal(
        torch.compile(uses_a_config, backend="eager", fullgraph=True)(torch.ones(2)), torch.full((2,), 64.0)
    )
    assert _runners.config_from_list([64, 1, 4, 3, 0]) is _runners.config_from_list((64, 1, 4, 3, 0))  # eager: memo


def test_a_launch_with_symbolic_sizes_is_built_not_kept():
    """Tracing the triton op with dynamic shapes (opcheck's aot_dispatch_dynamic) hands the launch SymInts: they
    cannot key the process-wide memo (unhashable), so that launch is built for the trace and not kept."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from superblock.kernels import _triton_bsr

    env = ShapeEnv()
    n_out = env.create_symintnode(env.create_symbol(64, ConstantSource("n_out")), hint=64)
    values, crow, col = dense_to_bsr(random_block_sparse(64, 64, (16, 16), 0.5), 16)
    config = {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2}
    kept = dict(_triton_bsr._launches)
    run = _triton_bsr.launch_for(values, crow, col, None, False, n_out, 64, None, "ieee", config)
    assert run.tiled_grid(32) == (2 * 4,) and _triton_bsr._launches == kept
    again = _triton_bsr.launch_for(values, crow, col, None, False, 64, 64, None, "ieee", config)
    assert _triton_bsr.launch_for(values, crow, col, None, False, 64, 64, None, "ieee", config) is again  # eager: kept


def test_impl_writes_out():
    w = random_block_sparse(32, 32, (16, 16), 0.5)
    values, crow, col = dense_to_bsr(w, 16)
    x = torch.randn(4, 32)
    out = torch.full((4, 32), float("nan"))
    got = ops.bsr_linear_impl(x, values, crow, col, None, None, 32, "none", "torch", "ieee", [], out)
    assert got is out and rel_err(out, reference(x, w)) < 1e-5


# ------------------------------------------------------------------------------------------- the module


@pytest.mark.parametrize("backend", ["auto", "dense", "torch"])
def test_module_dispatch_is_per_bucket_and_precomputed(backend):
    mod, w, b = _layer(backend=backend, activation="gelu")
    mod.prepare([5, 200])
    assert sorted(mod.dispatch) == [16, 256]  # token buckets
    expected = {"auto": "torch", "dense": "dense", "torch": "torch"}[backend]  # CPU auto: MKL for fp32 square
    assert {e["backend"] for e in mod.dispatch.values()} == {expected}
    assert not any(k in mod.state_dict() for k in mod._buffers if k.startswith("_"))  # derived: not saved
    with torch.no_grad():
        for n in (5, 200, 3):
            x = torch.randn(n, 48)
            assert rel_err(mod(x), reference(x, w, b, "gelu")) < 1e-5
    half = mod.to(torch.bfloat16)  # dtype changes: choices start over, derived buffers follow
    assert half.dispatch == {} and all(t.dtype != torch.float32 for t in half.buffers())
    mod.activation = None  # a new activation: new choices
    assert mod.dispatch == {} and mod._plans == {}


def test_module_reset_after_in_place_edit():
    mod, w, _ = _layer(backend="dense", bias=False)
    x = torch.randn(4, 48)
    with torch.no_grad():
        y1 = mod(x)
        mod.values.mul_(2)
        mod.reset()
        torch.testing.assert_close(mod(x), 2 * y1)


def test_module_load_state_dict_resets_choices():
    src, w, b = _layer(seed=1, backend="dense")
    dst, _, _ = _layer(seed=2, backend="dense")
    x = torch.randn(3, 48)
    with torch.no_grad():
        dst(x)
        assert dst.dispatch
        dst.load_state_dict(src.state_dict())
        assert not dst.dispatch
        assert rel_err(dst(x), reference(x, w, b)) < 1e-5


# ------------------------------------------------------------------------------------------- compile / export


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("backend", ["auto", "dense"])
def test_compiled_module_matches_eager_without_recompiles(backend):
    """CPU inductor: one graph per input shape, none after; prepared choices are looked up, never guarded on
    tensor identity (a second layer of the same kind reuses the compiled code)."""
    mod, w, b = _layer(backend=backend, activation="gelu")
    compiled = torch.compile(mod, dynamic=False, fullgraph=True)
    x1, x2 = torch.randn(2, 5, 48), torch.randn(3, 5, 48)
    with torch.no_grad():
        eager1, eager2 = mod(x1), mod(x2)  # eager first: choices made and derived tensors built
        torch.testing.assert_close(compiled(x1), eager1)
        assert _graphs() == 1
        for _ in range(3):
            compiled(torch.randn(2, 5, 48))
        assert _graphs() == 1
        torch.testing.assert_close(compiled(x2), eager2)
        assert _graphs() == 2
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(x1)
            compiled(x2)
        other = BlockSparseLinear.from_bsr(
            2 * mod.values, mod.crow_indices, mod.col_indices, mod.shape, b, activation="gelu", backend=backend
        )
        other(x1), other(x2)
        torch.testing.assert_close(torch.compile(other, dynamic=False)(x1), other(x1))
    assert _graphs() == 2  # same structure and choices, other tensors: the compiled code is reused


def test_dynamic_shapes_compile_once_per_token_bucket():
    """With dynamic shapes a graph holds for a whole token bucket of the prepared choices (guards on ranges, not on
    the token count): two buckets, two graphs, whatever the batch sizes inside them."""
    mod, w, b = _layer(backend="dense", activation="gelu")
    mod.prepare([10, 20])  # buckets 16 and 32
    compiled = torch.compile(mod, dynamic=True, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for n in (14, 12, 9, 25, 30, 17):
            x = torch.randn(n, 48)
            assert rel_err(compiled(x), reference(x, w, b, "gelu")) < 1e-5
    assert _graphs() == 2


def test_compiled_unprepared_module_traces_a_static_choice():
    mod, w, b = _layer(block=(16, 8))  # rectangular block on CPU: auto runs dense
    x = torch.randn(4, 48)
    with torch.no_grad():
        y = torch.compile(mod, backend="aot_eager", fullgraph=True)(x)
    assert rel_err(y, reference(x, w, b)) < 1e-5 and mod.dispatch == {}  # nothing decided inside the trace


def test_functional_bsr_linear_compiles():
    w = random_block_sparse(64, 48, (16, 16), 0.4)
    values, crow, col = dense_to_bsr(w, 16)
    bias = torch.randn(64)

    def f(x):
        return bsr_linear(x, values, crow, col, (64, 48), bias, "gelu")

    x = torch.randn(6, 48)
    with torch.no_grad():
        y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert rel_err(y, reference(x, w, bias, "gelu")) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_torch_export(backend):
    mod, w, b = _layer(backend=backend, activation="gelu")
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        mod(x)
    ep = torch.export.export(mod, (x,))
    code = ep.graph_module.code
    if backend == "torch":
        assert "torch.ops.superblock.bsr_linear.default" in code
    else:
        assert "aten.linear" in code
    assert "lifted_tensor" not in code  # every tensor the op reads is a parameter or buffer of the module
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), mod(x))


# ------------------------------------------------------------------------------------------- attention


def _dense_mha_pair(batch_first=True):
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    sparse = BlockSparseMultiheadAttention.from_mha(mha, 16, backend="dense").eval()
    return mha, sparse


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_with_dense_projections_takes_torch_fast_path(batch_first, monkeypatch):
    mha, smha = _dense_mha_pair(batch_first)
    calls = []
    native = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a: calls.append(1) or native(*a))
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False)[0]
        calls.clear()
        out, weights = smha(x, x, x, need_weights=False)
    assert calls == [1] and weights is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    calls.clear()
    kpm = torch.zeros(3, 7, dtype=torch.bool) if batch_first else torch.zeros(7, 3, dtype=torch.bool)
    kpm[0, -1] = True
    with torch.no_grad():  # masks: the SDPA path
        ref = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        calls.clear()
        torch.testing.assert_close(smha(x, x, x, key_padding_mask=kpm)[0], ref, atol=1e-5, rtol=1e-4)
    assert not calls


def test_attention_compiles_without_recompiles():
    mha, smha = _dense_mha_pair()
    smha.in_proj.backend = "torch"  # one sparse projection: the SDPA path with the custom op
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        ref = smha(x, x, x)[0]
        compiled = torch.compile(smha, dynamic=False, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, x, x)[0], ref, atol=1e-5, rtol=1e-4)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(x, x, x)
        torch.testing.assert_close(ref, mha(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-4)
    assert _graphs() == 1


def test_module_training_path_has_gradients():
    mod, w, b = _layer(backend="auto")
    x = torch.randn(4, 48, requires_grad=True)
    y = mod(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, 48))
    assert F.linear(x, w, b).allclose(y, atol=1e-5)
