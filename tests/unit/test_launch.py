"""The per-call host work of our kernels' eager paths: the mechanism, on the CPU. Timed claims live in
benchmarks/bsr_linear.py's host-cost table; these tests check that the work which makes a call slow happens once.

- kernels._launch.KernelLaunch goes through Triton's JIT front door once per specialization, then launches the
  compiled kernel directly (a stand-in for the JIT function counts the calls: on the CPU no kernel can be compiled;
  tests/gpu/test_launch_gpu.py runs the real kernels).
- specialization() separates what Triton specializes on (alignment, divisibility, width) and nothing else.
- the functional bsr_linear checks and plans a weight once, not on every call.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from superblock.kernels import _launch, bsr_linear, dense_to_bsr, dispatch

bsr_linear_mod = importlib.import_module("superblock.kernels.bsr_linear")  # the package exports the function

CUDA0 = torch.device("cuda", 0)


class StandInCompiled:
    """What Triton's JIT returns: a compiled kernel whose `run` is the launcher."""

    function, packed_metadata = "function", "metadata"

    def __init__(self) -> None:
        self.launches: list[tuple] = []

    def run(self, *args) -> None:
        self.launches.append(args)


class StandInJit:
    def __init__(self) -> None:
        self.jit_calls = 0
        self.compiled = StandInCompiled()

    def __getitem__(self, grid):
        def call(*args, **options):
            self.jit_calls += 1
            return self.compiled

        return call


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(_launch, "FAST", True)
    monkeypatch.setattr(_launch, "current_stream", lambda index: 1234)
    monkeypatch.setattr(_launch, "_hooks_idle", lambda: True)


def test_the_jit_front_door_is_taken_once_per_specialization(direct):
    fn = StandInJit()
    launch = _launch.KernelLaunch(fn, num_warps=4, num_stages=2)
    args = ("x", "w", 197, 64)
    for _ in range(5):
        launch((12, 3), "spec-a", args, CUDA0)
    assert fn.jit_calls == 1
    assert fn.compiled.launches == [(12, 3, 1, 1234, "function", "metadata", None, None, None, *args)] * 4
    launch((12,), "spec-b", args, CUDA0)  # another specialization: compiled (looked up) by the JIT once
    launch((12,), "spec-b", args, CUDA0)
    launch((12,), "spec-a", args, torch.device("cuda", 1))  # another device loads its own copy
    assert fn.jit_calls == 3
    assert fn.compiled.launches[-1][:3] == (12, 1, 1)


def test_the_jit_path_whenever_direct_launches_are_off(direct, monkeypatch):
    fn = StandInJit()
    launch = _launch.KernelLaunch(fn, 4, 2)
    launch((1,), "s", (), CUDA0)
    monkeypatch.setattr(_launch, "_hooks_idle", lambda: False)  # a profiler's launch hook must see every launch
    launch((1,), "s", (), CUDA0)
    monkeypatch.setattr(_launch, "FAST", False)  # Triton's CPU interpreter
    fresh = _launch.KernelLaunch(fn, 4, 2)
    fresh((1,), "s", (), CUDA0)
    fresh((1,), "s", (), CUDA0)
    assert fn.jit_calls == 4 and not fn.compiled.launches


def test_specialization_separates_what_triton_specializes_on():
    base = torch.zeros(64)
    aligned, offset = base[:32], base[1:33]  # 4-byte offset: not 16-byte aligned
    spec = _launch.specialization
    assert spec((aligned,), (197, 768)) == spec((base[4:36],), (3, 800))  # aligned, "other int", multiple of 16
    assert spec((aligned,), (197,)) != spec((offset,), (197,))
    assert spec((aligned,), (1,)) != spec((aligned,), (3,))
    assert spec((aligned,), (32,)) != spec((aligned,), (33,))
    assert spec((aligned,), (2**31 + 16,)) != spec((aligned,), (16,))
    assert spec((aligned,), ()) != spec((aligned.half(),), ())


@torch.no_grad()
def test_a_bound_launch_keys_on_what_changes_between_calls(direct, monkeypatch):
    """A weight's bound launch (Launch.bind) works out the weight's part of the specialization once; a call keys
    on x, y and the bias: a new alignment or a new class of M or of a stride compiles (looks up) once more, a repeat
    does not, and every launch gets the arguments the JIT path would."""
    from superblock.kernels import _triton_bsr

    monkeypatch.setattr(_triton_bsr, "INTERPRET", False)
    w = torch.randn(128, 96) * (torch.rand(2, 6) < 0.5).repeat_interleave(64, 0).repeat_interleave(16, 1)
    values, crow, col = (t if t.dtype.is_floating_point else t.int() for t in dense_to_bsr(w, (64, 16)))
    cfg = {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False}
    launch = _triton_bsr.Launch(values, crow, False, 128, 96, None, "ieee", cfg)

    class OnCuda0(_launch.KernelLaunch):  # CPU tensors, launched as if on a GPU (only there are kernels kept)
        def __call__(self, grid, spec, args, device):
            return super().__call__(grid, spec, args, CUDA0)

    fn = StandInJit()
    launch._tiled = OnCuda0(fn, 4, 2)
    call, flat = launch.bind(values, crow, col, None)
    buf = torch.randn(40 * 100 + 4)
    y = torch.empty(40, 128)
    x = buf[: 40 * 96].view(40, 96)
    for _ in range(3):
        call(x, None, y)
    assert fn.jit_calls == 1 and len(fn.compiled.launches) == 2
    assert fn.compiled.launches[-1][9:] == launch.tiled_args(x, values, crow, col, None, y, y)
    call(buf[1 : 1 + 40 * 96].view(40, 96), None, y)  # x no longer 16-byte aligned
    call(x[:1], None, y[:1])  # M = 1
    call(x[:32], None, y[:32])  # M a multiple of 16
    call(buf[: 40 * 100].view(40, 100)[:, :96], None, y)  # x's row stride 100: another class than 96
    assert fn.jit_calls == 5
    call(x, None, y)
    call(x[:1], None, y[:1])
    assert fn.jit_calls == 5
    # flat: x and y of any rank, contiguous, as they are (no 2-D view); the same kernels and arguments as the 2-D
    # call on views of them
    x3, y3 = x.view(4, 10, 96), torch.empty(4, 10, 128)
    assert flat(x3, 40, None, y3) is y3 and fn.jit_calls == 5
    flat_args = fn.compiled.launches[-1][9:]
    call(x3.view(40, 96), None, y3.view(40, 128))
    assert fn.jit_calls == 5
    same = [a == b if not isinstance(a, torch.Tensor) else a.data_ptr() == b.data_ptr() and a.dtype == b.dtype
            for a, b in zip(flat_args, fn.compiled.launches[-1][9:], strict=True)]  # fmt: skip
    assert all(same), flat_args
    assert flat_args[0] is x3 and flat_args[6] is y3


@torch.no_grad()
@pytest.mark.parametrize("backend", ["dense", "torch", "auto"])
def test_a_weight_is_checked_and_planned_once(backend, monkeypatch):
    w = torch.randn(64, 96) * (torch.rand(4, 6) < 0.5).repeat_interleave(16, 0).repeat_interleave(16, 1)
    values, crow, col = dense_to_bsr(w, 16)
    x = torch.randn(5, 96)
    counts = {"checks": 0, "choices": 0}

    def counting(name, real):
        def wrapper(*a, **k):
            counts[name] += 1
            return real(*a, **k)

        return wrapper

    monkeypatch.setattr(bsr_linear_mod, "_validate_weight", counting("checks", bsr_linear_mod._validate_weight))
    monkeypatch.setattr(dispatch, "choose", counting("choices", dispatch.choose))
    ref = x @ w.t()
    for _ in range(10):
        torch.testing.assert_close(bsr_linear(x, values, crow, col, w.shape, backend=backend), ref)
    assert counts == {"checks": 1, "choices": 1}
    values.mul_(2)  # an in-place edit: the weight's plan (a dense copy for "dense") is stale
    torch.testing.assert_close(bsr_linear(x, values, crow, col, w.shape, backend=backend), 2 * ref)
    assert counts == {"checks": 2, "choices": 2}
    with pytest.raises(ValueError, match="x must be"):  # the input is still checked on every call
        bsr_linear(torch.randn(5, 95), values, crow, col, w.shape, backend=backend)


@torch.no_grad()
def test_a_bound_plan_gets_the_modules_bias_as_it_is_now(monkeypatch):
    """The module's bound path reads its bias buffer directly (nn.Module's attribute fallback costs ~1 us a call):
    the launch still gets the bias the module has at the time of the call, after an in-place edit, a new tensor
    assigned, or None."""
    from superblock.kernels import BlockSparseLinear, _runners

    seen = []

    def stand_in_bind(*args, **kwargs):
        return lambda x, bias, out=None: seen.append(bias) or torch.zeros(*x.shape[:-1], 64)

    monkeypatch.setattr(_runners, "bindable", lambda device: True)
    monkeypatch.setattr(_runners, "bind_triton", stand_in_bind)
    w = torch.randn(64, 96) * (torch.rand(4, 6) < 0.5).repeat_interleave(16, 0).repeat_interleave(16, 1)
    values, crow, col = dense_to_bsr(w, 16)
    mod = BlockSparseLinear.from_bsr(values, crow, col, w.shape, torch.randn(64), backend="triton")
    cfg = {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False}
    mod.set_choice(16, {"backend": "triton", "config": cfg})
    x = torch.randn(2, 5, 96)
    mod(x)
    assert mod._plans[10].call == "bound" and seen[-1] is mod.bias
    mod.bias.add_(1.0)
    mod(x)
    assert seen[-1] is mod.bias
    mod.bias = torch.ones(64)
    mod(x)
    assert seen[-1] is mod.bias and bool((seen[-1] == 1).all())
    mod.bias = None
    mod(x)
    assert seen[-1] is None


def test_a_launcher_that_takes_other_arguments_turns_direct_launches_off(direct, monkeypatch):
    """A Triton whose compiled-kernel launcher has another signature: one warning, then the JIT path for good."""
    fn = StandInJit()

    def other_signature(*args):
        raise TypeError("function takes exactly 20 arguments")

    fn.compiled.run = other_signature
    launch = _launch.KernelLaunch(fn, 4, 2)
    launch((1,), "s", (), CUDA0)
    with pytest.warns(UserWarning, match="direct Triton launches turned off"):
        launch((1,), "s", (), CUDA0)
    assert _launch.FAST is False and fn.jit_calls == 2  # the failed direct launch was made through the JIT
    launch((1,), "s", (), CUDA0)
    assert fn.jit_calls == 3


@torch.no_grad()
def test_a_kept_dense_plan_runs_f_linear_on_x_as_given():
    """A call after the first of a dense plan is the checks, one look-up and F.linear on x as the caller gave it: no
    reshape or view of x or y (each costs microseconds of host time on a GPU host, where F.linear alone is ~20 us)."""
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    w = torch.randn(64, 96) * (torch.rand(4, 6) < 0.5).repeat_interleave(16, 0).repeat_interleave(16, 1)
    values, crow, col = dense_to_bsr(w, 16)
    x = torch.randn(2, 5, 96)
    bsr_linear(x, values, crow, col, w.shape, backend="dense")  # builds and keeps the plan
    with Record() as rec:
        y = bsr_linear(x, values, crow, col, w.shape, backend="dense")
    torch.testing.assert_close(y, x @ w.t())
    ops = [n for n in rec.names if not n.startswith("__get__") and n not in ("__get__",)]
    assert "linear" in ops
    assert not {"reshape", "view", "contiguous", "flatten"} & set(ops), ops


@pytest.mark.parametrize("layout", ["token", "feature"])
def test_per_call_descriptors_skip_the_constructor_checks_but_match_it(layout, monkeypatch):
    """x and y get a TMA descriptor on every call; tma_ok already checked what the descriptor's constructor would, so
    the per-call ones skip its checks and must hold what the constructor would have made of the same matrix."""
    tma = pytest.importorskip("triton.tools.tensor_descriptor")
    from superblock.kernels import _triton_bsr

    if _triton_bsr._DESCRIPTOR_DEFAULTS is None:
        pytest.skip("this Triton's TensorDescriptor is not the dataclass the shortcut is written for")
    x = torch.randn(48, 64) if layout == "token" else torch.randn(64, 48).t()
    checks = []
    monkeypatch.setattr(tma.TensorDescriptor, "__post_init__", lambda self: checks.append(self))
    desc, transposed = _triton_bsr._descriptor(x, 16, 32)
    assert not checks and isinstance(desc, tma.TensorDescriptor)
    monkeypatch.undo()
    base = x.t() if transposed else x
    box = [32, 16] if transposed else [16, 32]
    expected = tma.TensorDescriptor(base, list(base.shape), list(base.stride()), box)  # the checked constructor
    assert transposed == (layout == "feature") and desc.base.data_ptr() == base.data_ptr()
    for field in ("shape", "strides", "block_shape", "padding"):
        assert getattr(desc, field) == getattr(expected, field), field
