"""Launching a compiled Triton kernel without Triton's JIT front door on every call.

`fn[grid](*args, **options)` binds every argument, works out its specialization (pointer alignment, integer
divisibility), builds a cache key, finds the compiled kernel and builds launch metadata: tens of microseconds of
Python per call, more than our kernels run at ViT-B sizes (docs/benchmarks.md). A `KernelLaunch` pays that once per
specialization: the caller says what the kernel is specialized on (`spec`: the constexprs and `specialization()`
of the runtime arguments), and every later call with the same spec goes straight to the compiled kernel's
launcher. The first call of a spec, the CPU interpreter and a registered launch hook (profilers) take the JIT path.
"""

from __future__ import annotations

import os
import warnings

import torch

try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - triton without knobs (< 3.3) or no triton: always the JIT path
    _knobs = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FAST = _knobs is not None and not INTERPRET
_INT32 = 2**31


def specialization(tensors: tuple, ints: tuple) -> tuple:
    """What Triton specializes a kernel on for these runtime arguments, as a hashable key: each tensor's dtype and
    16-byte alignment; each integer as 1, another multiple of 16, any other int32, or wider. A superset of Triton's
    rule, so two calls with equal keys run the same compiled kernel."""
    return (
        tuple([(t.dtype, t.data_ptr() & 15 == 0) for t in tensors]),
        tuple([(0 if v == 1 else 1 if v & 15 == 0 else 2) if -_INT32 <= v < _INT32 else 3 for v in ints]),
    )


def current_stream(index: int) -> int:
    """The raw CUDA stream of device `index` that torch is using now (what Triton's JIT front door launches on)."""
    return torch._C._cuda_getCurrentRawStream(index)


def _hooks_idle() -> bool:
    rt = _knobs.runtime
    return not getattr(rt.launch_enter_hook, "calls", rt.launch_enter_hook) and not getattr(
        rt.launch_exit_hook, "calls", rt.launch_exit_hook
    )


def _turn_off(err: Exception) -> None:
    """Stop launching directly (this Triton's compiled-kernel launcher differs from the one this was written for):
    every launch takes the JIT front door again, correct and slower."""
    global FAST
    FAST = False
    warnings.warn(
        f"superblock: direct Triton launches turned off ({err}); launches take Triton's JIT path", stacklevel=3
    )


class KernelLaunch:
    """One Triton kernel at one (num_warps, num_stages): its compiled kernels by specialization, launched directly."""

    __slots__ = ("fn", "options", "kernels")
    jit_calls = 0  # launches, all kernels, that went through the JIT front door (tests check it stops growing)

    def __init__(self, fn, num_warps: int, num_stages: int) -> None:
        self.fn = fn
        self.options = {"num_warps": int(num_warps), "num_stages": int(num_stages)}
        self.kernels: dict[tuple, tuple] = {}

    def __call__(self, grid: tuple[int, ...], spec: tuple, args: tuple, device: torch.device) -> None:
        """fn[grid](*args, **options); `args` are all of fn's parameters in order, constexprs included."""
        key = (device.index, spec)  # a compiled kernel is loaded on one device
        bound = self.kernels.get(key)
        if bound is not None and FAST and _hooks_idle():
            run, function, packed = bound
            g1 = grid[1] if len(grid) > 1 else 1
            try:
                run(grid[0], g1, 1, current_stream(device.index), function, packed, None, None, None, *args)
                return
            except TypeError as err:  # a Triton whose launcher takes other arguments (it parses them before launching)
                _turn_off(err)
        KernelLaunch.jit_calls += 1
        compiled = self.fn[grid](*args, **self.options)
        if FAST and device.type == "cuda" and compiled is not None:
            compiled = compiled.result() if hasattr(compiled, "result") else compiled
            self.kernels[key] = (compiled.run, compiled.function, compiled.packed_metadata)
