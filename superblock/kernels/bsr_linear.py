"""Block-sparse linear layer y = act(x @ W^T + b) with W stored as BSR.

Backends:
  triton  our Triton kernel (CUDA; bf16/fp16, fp32 in IEEE precision or opt-in tf32 / tf32x3)
  torch   torch's BSR kernels (`F.linear` with a sparse BSR weight); on CPU (MKL) fp16/bf16 go through fp32
          and non-square blocks through the dense path
  dense   the dense weight rebuilt once (cached) and F.linear: the reference, any device
  auto    CUDA: the fastest of the three, measured once per (device, shape, block, density, dtype, tokens)
          and cached in memory and on disk (see superblock.kernels.tuning); CPU: torch's BSR path (MKL)
          for fp32/fp64 with square blocks, else dense.

Under torch.compile / torch.export every backend is the custom operator torch.ops.superblock.bsr_linear
(kernels/ops.py), traced as one node. In eager code this function checks a weight once and keeps its plan (the
choice, the tensors it runs on and, for triton, the launch bound to the weight: _runners.bind_triton), so a call
after the first checks x, looks the plan up and launches; BlockSparseLinear keeps the same plans per layer.

The kernels are for inference: no backward. With autograd recording and a tensor that requires grad,
`auto` uses the dense path (differentiable); `triton` raises.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from superblock.kernels import _runners, _triton_bsr, dispatch, ops
from superblock.kernels import tuning as _tuning
from superblock.kernels._runners import bsr_to_dense, check_bsr, triton_block_ok  # noqa: F401 - public names
from superblock.kernels.dispatch import BACKENDS, Plan

ACTIVATIONS = (None, "gelu")
FP32_PRECISIONS = _triton_bsr.PRECISIONS  # the kernels own the list (each is a code path in them)

_settings = {"fp32_precision": "ieee"}


def set_fp32_precision(precision: str) -> None:
    """Module-wide precision of fp32 products in the triton backend.

    "ieee" (default): true fp32 (FMA units). "tf32": tensor cores, 10-bit mantissa inputs (opt-in, like
    torch.backends.cuda.matmul.allow_tf32). "tf32x3": three tf32 products per block (split hi/lo operands),
    close to fp32 accuracy on tensor cores.
    """
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32 precision must be one of {FP32_PRECISIONS}, got {precision!r}")
    _settings["fp32_precision"] = precision


def get_fp32_precision() -> str:
    return _settings["fp32_precision"]


# ----------------------------------------------------------------------------------------------------------
# validation


def _validate(x, values, crow, col, shape, bias, activation, backend) -> tuple[int, int, int, int]:
    out_f, in_f, bh, bw = _validate_weight(values, crow, col, shape, activation, backend)
    _validate_input(x, values, crow, col, bias, out_f, in_f)
    return out_f, in_f, bh, bw


def _validate_weight(values, crow, col, shape, activation, backend) -> tuple[int, int, int, int]:
    """The checks that depend only on the weight (and the call's options): made once per weight in eager code."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return _runners.check_bsr(values, crow, col, shape)


def _validate_input(x, values, crow, col, bias, out_f: int, in_f: int) -> None:
    """The checks of a call's x and bias against its (already checked) weight: a few comparisons."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x must be [..., {in_f}] (in_features), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if values.dtype != x.dtype:
        raise ValueError(f"values dtype {values.dtype} does not match x dtype {x.dtype}")
    device = values.device
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (out_f,):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be [{out_f}] (out_features), got {got}")
        if bias.dtype != x.dtype:
            raise ValueError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
        if bias.device != device:
            raise ValueError(f"all tensors must be on one device, got {sorted({str(device), str(bias.device)})}")
    if x.device != device:
        raise ValueError(f"all tensors must be on one device, got {sorted({str(device), str(x.device)})}")


# ----------------------------------------------------------------------------------------------------------
# derived forms of a weight for the functional API in eager code (modules precompute their own), keyed weakly
# on the values tensor and dropped when it dies or is modified in place. Never consulted inside a trace.


class _WeightCache:
    """Derived forms of one BSR weight, dropped when the values tensor dies or is modified in place."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def get(self, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, name, build):
        sig = (values._version, crow.data_ptr(), col.data_ptr(), crow._version, col._version)
        key = id(values)
        entry = self._entries.get(key)  # the hit needs no lock: reading a dict is atomic, and the checks below hold
        if entry is None or entry[0]() is not values or entry[1] != sig:
            with self._lock:
                entry = self._entries.get(key)
                if entry is None or entry[0]() is not values or entry[1] != sig:
                    ref = weakref.ref(values, lambda _r, k=key: self._drop(k, _r))
                    entry = (ref, sig, {})
                    self._entries[key] = entry
        store = entry[2]
        found = store.get(name)
        if found is None:
            found = store[name] = build()
        return found

    def _drop(self, key: int, ref) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_cache = _WeightCache()


def clear_caches() -> None:
    """Forget the plans the functional bsr_linear keeps per weight (choices, grouped layouts, dense copies, bound
    launches)."""
    _cache.clear()


def _traced(x: torch.Tensor) -> bool:
    """Inside torch.compile / torch.export, or on fake / functional tensors: no caches, no host syncs."""
    return type(x) is not torch.Tensor or torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------------------
# public entry point


def bsr_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    shape: Sequence[int],
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
    *,
    allow_tf32: bool | None = None,
    fp32_precision: str | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x @ W^T + bias) for a block-sparse W of logical `shape` = (out, in).

    W is BSR over the zero-padded (ceil(out/bh)*bh, ceil(in/bw)*bw) matrix: `values` [nnz, bh, bw],
    `crow_indices` [ceil(out/bh)+1], `col_indices` [nnz] (int32 or int64). x is [..., in]; the result is
    [..., out] in x's dtype. `activation` is None or "gelu" (exact erf GELU, nn.GELU()). fp32 inputs are
    multiplied in true fp32 unless `allow_tf32=True`, `fp32_precision="tf32"|"tf32x3"` or
    set_fp32_precision(...) says otherwise (triton backend; torch/dense follow torch's own matmul settings).
    `config` pins the triton launch configuration (keys BLOCK_M, G, num_warps, num_stages, TMA; SPLIT >= 1 for the
    decode kernel: few tokens, SPLIT programs per block row).
    `out` ([..., out], x's dtype, contiguous, or [M, out] feature-major: `torch.empty(out, M).t()`, as x may be too)
    receives the result (the triton kernel writes it directly; thin tiles read a feature-major x in long runs).
    Padding entries of `values` (beyond out/in) must be finite; from_dense writes zeros there.

    Under torch.compile / torch.export `auto` is not measured: CUDA runs the triton kernel's default (G=1)
    configuration, CPU the CPU rule; for tuned choices there use BlockSparseLinear, prepared before compiling.
    """
    if fp32_precision is None:
        fp32_precision = "tf32" if allow_tf32 else _settings["fp32_precision"]
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    grads = x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
    needs_grad = torch.is_grad_enabled() and grads
    traced = _traced(x)
    if not (traced or needs_grad):  # eager: x checked on every call, the weight once with its plan (_eager_plan)
        out_f, in_f = _runners.normalize_shape(shape)
        _validate_input(x, values, crow_indices, col_indices, bias, out_f, in_f)
        plan = _eager_plan(x, values, crow_indices, col_indices, (out_f, in_f), bias, activation, backend, config,
                           fp32_precision)  # fmt: skip
        if plan.call == "bound":  # the launch bound to this weight: x as given, y in its shape
            if out is not None:
                _check_out(out, x.shape[:-1], out_f, x)
            return plan.run(x, bias, out)
        if plan.call == "dense" and out is None:  # F.linear takes x as given: no reshapes on the way
            y = F.linear(x, plan.tensors, bias)
            return y if activation is None else _runners.activate(y, activation)
        return _run(plan, x, (x.reshape(-1, in_f), values, crow_indices, col_indices, (out_f, in_f), bias, activation),
                    out)  # fmt: skip
    out_f, in_f = _validate(x, values, crow_indices, col_indices, shape, bias, activation, backend)[:2]
    shape, x2d = (out_f, in_f), x.reshape(-1, in_f)
    args = (x2d, values, crow_indices, col_indices, shape, bias, activation)
    if needs_grad:  # differentiable torch ops (training, tests of gradients)
        dispatch.choose(args, backend, fp32_precision, traced=traced, needs_grad=True, config=config)
        y = _runners.run_dense(x2d, bsr_to_dense(values, crow_indices, col_indices, shape), bias, activation)
        return _finish(y, out, x, out_f)
    return _run(_traced_plan(args, backend, config, fp32_precision), x, args, out)


def _run(plan: Plan, x: torch.Tensor, args, out: torch.Tensor | None) -> torch.Tensor:
    """Execute a plan (its `call`, decided by dispatch.build_plan) other than a bound launch (bsr_linear calls
    those itself)."""
    x2d, values, _, _, (out_f, _), bias, activation = args
    call = plan.call
    if call == "dense":
        return _finish(_runners.run_dense(x2d, plan.tensors, bias, activation), out, x, out_f)
    crow, col, gidx = plan.tensors
    op_args = (values, crow, col, gidx, bias, out_f, activation or "none")
    if call == "inductor":
        y = ops.bsr_linear_triton_op(x, *op_args, plan.precision, plan.config)
        return _finish(y.reshape(-1, y.shape[-1]), out, x, out_f) if out is not None else y
    op_args = (*op_args, plan.backend, plan.precision, plan.config)
    if call == "opaque":
        y = ops.bsr_linear_op(x, *op_args)
        return _finish(y.reshape(-1, y.shape[-1]), out, x, out_f) if out is not None else y
    if out is None:
        return ops.bsr_linear_impl(x, *op_args)
    ops.bsr_linear_impl(x2d, *op_args, _check_out(out, x.shape[:-1], out_f, x))
    return out


def _eager_plan(x, values, crow, col, shape, bias, activation, backend: str, config: dict | None, precision: str):
    """What an eager call runs, kept per weight: the choice (dispatch.choose) and the tensors it runs on (int32 or
    grouped indices, the dense weight), so a call after the first costs a dict lookup. `auto` keys its choice by
    token bucket and tuning generation (a table lookup formats keys and asks the driver: ~20 us, enough to lose to
    cuBLAS at a few thousand tokens); a pinned config keys by its values. x is as the caller gave it ([..., in]):
    it is flattened only when a plan is built."""
    device = x.device
    if config is not None:
        which = ("config", *_config_key(config))
    elif backend in ("auto", "triton") and device.type == "cuda":
        m = x.numel() // shape[1] if shape[1] else 0
        which = ("bucket", _tuning.token_bucket(m), _tuning.get_tuning_target(), _tuning.generation())
    else:
        which = ("rule",)
    # inference mode is part of the key: tensors built under it (the dense copy, int32 indices) are inference tensors
    key = ("plan", shape, backend, which, x.dtype, device, precision, bias is not None, activation,
           torch.is_inference_mode_enabled())  # fmt: skip

    def build() -> Plan:
        _validate_weight(values, crow, col, shape, activation, backend)
        args = (x.reshape(-1, shape[1]), values, crow, col, shape, bias, activation)
        return _plan_of(args, dispatch.choose(args, backend, precision, config=config))

    return _cache.get(values, crow, col, key, build)


def _config_key(config: dict) -> tuple:
    """A pinned config as part of a plan's key: its items as given (a dict's items are cheaper to hash than its
    parsed list; two spellings of one config only build one more plan), the parsed list where an item is not
    hashable."""
    items = tuple(config.items())
    try:
        hash(items)
    except TypeError:
        return tuple(_runners.config_to_list(config))
    return items


def _traced_plan(args, backend: str, config: dict | None, precision: str) -> Plan:
    """Inside a trace: the static choice (no measurement, no host sync) and tensors computed in the graph."""
    return _plan_of(args, dispatch.choose(args, backend, precision, traced=True, config=config), True)


def _plan_of(args, choice: dispatch.Choice, traced: bool = False) -> Plan:
    """dispatch.build_plan for the functional op: derived tensors are built here (eager: the plan is kept per weight
    by _eager_plan) or, inside a trace, not at all."""
    x2d, values, crow, col, shape, bias, activation = args
    weight = dispatch.Weight(
        values, crow, col, tuple(shape), bias is not None, activation, lambda t: t,
        lambda: bsr_to_dense(values, crow, col, shape),
    )  # fmt: skip

    def derive(name, build, n):
        return None if traced else build()

    return dispatch.build_plan(choice, x2d.device, traced, weight, derive)


def _finish(y2d: torch.Tensor, out: torch.Tensor | None, x: torch.Tensor, out_f: int) -> torch.Tensor:
    """A [M, out] result as the caller asked for it: copied into `out`, or shaped like x."""
    if out is not None:
        _check_out(out, x.shape[:-1], out_f, x).copy_(y2d.reshape(-1, out_f))
        return out
    return y2d.reshape(*x.shape[:-1], out_f)


def _check_out(out: torch.Tensor, lead, out_f: int, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.shape != (*lead, out_f):
        raise ValueError(f"out must have shape {(*lead, out_f)}")
    writable = out.is_contiguous() or (out.dim() == 2 and _triton_bsr.feature_major(out))
    if out.dtype != x.dtype or out.device != x.device or not writable:
        raise ValueError("out must be contiguous (or a [M, out] transposed view: feature-major), with x's dtype and "
                         "device")  # fmt: skip
    return out.view(-1, out_f)


def block_density(values: torch.Tensor, shape: Sequence[int]) -> float:
    """Fraction of the padded weight's blocks that are stored."""
    out_f, in_f = _runners.normalize_shape(shape)
    bh, bw = values.shape[1:]
    return values.shape[0] / (math.ceil(out_f / bh) * math.ceil(in_f / bw))
