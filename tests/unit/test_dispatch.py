"""kernels.dispatch: one rule decides the backend for the functional op and for BlockSparseLinear."""

import pytest
import torch

from superblock.kernels import BlockSparseLinear, bsr_linear, dispatch
from superblock.kernels.dispatch import Choice, Plan
from superblock.kernels.modules import dense_to_bsr


def _weight(dtype=torch.float32, block=(16, 16)):
    w = torch.randn(64, 48, dtype=dtype)
    w[:16] = 0  # an empty block row
    w[:, 32:] = 0
    return w, dense_to_bsr(w, block)


def _args(x, bsr, w, bias=None):
    values, crow, col = bsr
    return (x.reshape(-1, x.shape[-1]), values, crow, col, tuple(w.shape), bias, None)


@pytest.mark.parametrize(
    ("dtype", "block", "expected"),
    [(torch.float32, (16, 16), "torch"), (torch.bfloat16, (16, 16), "dense"), (torch.float32, (16, 32), "dense")],
)
def test_cpu_rule_is_the_same_for_the_function_and_the_module(dtype, block, expected):
    w, bsr = _weight(dtype, block)
    x = torch.randn(5, 48, dtype=dtype)
    assert dispatch.choose(_args(x, bsr, w), "auto", "ieee").backend == expected
    assert dispatch.cpu_backend(dtype, block) == expected
    mod = BlockSparseLinear.from_bsr(*bsr, w.shape)
    with torch.no_grad():
        mod(x)
    assert [c.backend for c in mod.choices().values()] == [expected]
    torch.testing.assert_close(mod(x), bsr_linear(x, *bsr, w.shape), rtol=2e-2, atol=2e-2)


def test_gradients_pick_dense_and_triton_refuses_them():
    w, bsr = _weight()
    x = torch.randn(3, 48)
    assert dispatch.choose(_args(x, bsr, w), "auto", "ieee", needs_grad=True).backend == "dense"
    with pytest.raises(ValueError, match="inference only"):
        dispatch.choose(_args(x, bsr, w), "triton", "ieee", needs_grad=True)


def test_explicit_triton_on_cpu_says_why_it_cannot_run():
    w, bsr = _weight()
    with pytest.raises(ValueError, match="needs CUDA"):
        dispatch.choose(_args(torch.randn(3, 48), bsr, w), "triton", "ieee")


def test_choice_round_trips_and_rejects_unknown_backends():
    c = Choice("triton", {"BLOCK_M": 64, "G": 1, "num_warps": 4, "num_stages": 2}, "tf32", measured=False)
    assert Choice.from_dict(c.as_dict()) == c
    assert Choice.from_dict({"backend": "dense", "config": {"BLOCK_M": 1}}).config is None
    with pytest.raises(ValueError, match="backend"):
        Choice("cutlass")


def test_module_public_dispatch_methods_pin_forget_and_retarget():
    w, bsr = _weight()
    mod = BlockSparseLinear.from_bsr(*bsr, w.shape)
    x = torch.randn(7, 48)
    with torch.no_grad():
        mod(x)
        (bucket,) = mod.choices()
        assert mod.choices()[bucket].backend == "torch"
        mod.set_choice(bucket, Choice("dense"))
        y = mod(x)
        assert isinstance(mod._plans[7], Plan) and mod._plans[7].backend == "dense"
        torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)
        mod.set_choice(bucket, None)
        assert mod.choices() == {}
        mod(x)
        mod.set_tuning_target("graph")  # a new target: earlier choices were made for another one
        assert mod.choices() == {} and mod.tuning_target == "graph"
    with pytest.raises(ValueError, match="tuning target"):
        mod.set_tuning_target("fastest")


def test_one_stand_in_rule_where_nothing_may_be_measured(monkeypatch):
    """tuning.stand_in owns what `auto` runs unmeasured on a GPU; dispatch's traced rule and the tuner's
    no-measurement fallback both return it (a GPU is faked by letting Triton 'run here')."""
    from superblock.kernels import _runners
    from superblock.kernels import tuning as tuning_mod

    w, bsr = _weight(torch.bfloat16, (16, 16))
    x = torch.randn(300, 48, dtype=torch.bfloat16)
    monkeypatch.setattr(_runners, "triton_usable", lambda x, values: True)
    entry = tuning_mod.stand_in(x, bsr[0], "ieee")
    assert entry == {"backend": "triton", "config": tuning_mod.candidate_configs(300, 16, 16, x.dtype)[0],
                     "measured": False}  # fmt: skip
    monkeypatch.setattr(tuning_mod, "_can_measure", lambda x2d: False)
    monkeypatch.setattr(tuning_mod, "lookup", lambda scope, key: None)
    assert tuning_mod.measured_choice(_args(x, bsr, w), "ieee") == entry
    monkeypatch.setattr(_runners, "triton_usable", lambda x, values: False)
    assert tuning_mod.stand_in(x, bsr[0], "ieee") == {"backend": "dense", "measured": False}
    assert tuning_mod.measured_choice(_args(x, bsr, w), "ieee") == {"backend": "dense", "measured": False}


def test_the_kernel_table():
    base = {"BLOCK_M": 128, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False}
    assert dispatch.kernel_variant(base) == "tiled"
    assert dispatch.kernel_variant({**base, "TMA": True}) == "tma"
    assert dispatch.kernel_variant({**base, "TMA": True}, "silu_mul") == "tiled"  # gated pairs: no TMA
    assert dispatch.kernel_variant({**base, "TMA": True, "G": 2}) == "tiled"
    assert dispatch.kernel_variant({**base, "KB": 4}) == "packed"
    assert dispatch.kernel_variant({**base, "SPLIT": 8}) == "decode"


@pytest.mark.parametrize(
    ("backend", "config", "device", "traced", "call"),
    [
        ("dense", None, "cpu", False, "dense"),
        ("dense", None, "cpu", True, "dense"),
        ("torch", None, "cpu", False, "impl"),
        ("torch", None, "cpu", True, "opaque"),
        ("triton", {"BLOCK_M": 64, "G": 1, "num_warps": 4, "num_stages": 2}, "cuda", True, "inductor"),
        ("triton", {"BLOCK_M": 64, "G": 2, "num_warps": 4, "num_stages": 2}, "cuda", True, "inductor"),
        ("triton", {"BLOCK_M": 64, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": True}, "cuda", True, "opaque"),
        ("triton", {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2, "SPLIT": 4}, "cuda", True, "opaque"),
    ],
)
def test_one_plan_builder_routes_the_module_and_the_functional_op(backend, config, device, traced, call):
    """dispatch.build_plan decides how a choice is called; BlockSparseLinear and bsr_linear both use it (the module
    with buffer names, the functional op with tensors), so they route every choice the same way."""
    from superblock.kernels import ops

    if call == "inductor" and not ops.HAS_TRITON_OP:
        pytest.skip("no torch.library.triton_op here")
    w, bsr = _weight()
    mod = BlockSparseLinear.from_bsr(*bsr, w.shape)
    choice = Choice(backend, config, "ieee")
    dev = torch.device(device)
    built = []
    for weight, derive in (
        (dispatch.Weight(bsr[0], "crow_indices", "col_indices", tuple(w.shape), False, None, mod._buffers.__getitem__,
                         mod.to_dense_weight), lambda name, build, n: mod._derived(name, build, traced, n)),
        (dispatch.Weight(bsr[0], bsr[1], bsr[2], tuple(w.shape), False, None, lambda t: t,
                         lambda: dispatch._runners.bsr_to_dense(*bsr, w.shape)), lambda name, build, n: None if traced
         else build()),
    ):  # fmt: skip
        plan = dispatch.build_plan(choice, dev, traced, weight, derive)
        assert plan.call == call and plan.backend == backend
        built.append(plan)
    if backend == "triton":
        assert built[0].config == built[1].config and built[0].kernel == built[1].kernel
        if traced and config.get("G", 1) > 1:  # the grouped layout cannot be built inside a trace
            assert built[0].config[1] == 1
