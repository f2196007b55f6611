"""Block-sparse linear layer y = act(x @ W^T + b) with W stored as BSR.

Backends:
  triton  our Triton kernel (CUDA; bf16/fp16, fp32 in IEEE precision or opt-in tf32 / tf32x3)
  torch   torch's BSR kernels (`F.linear` with a sparse BSR weight); on CPU (MKL) fp16/bf16 go through fp32
          and non-square blocks through the dense path
  dense   the dense weight rebuilt once (cached) and F.linear: the reference, any device
  auto    CUDA: the fastest of the three, measured once per (device, shape, block, density, dtype, tokens)
          and cached in memory and on disk (see superblock.kernels.tuning); CPU: torch's BSR path (MKL)
          for fp32/fp64 with square blocks, else dense.

The kernels are for inference: no backward. With autograd recording and a tensor that requires grad,
`auto` uses the dense path (differentiable); `triton` raises.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from superblock.kernels import _triton_bsr
from superblock.kernels import tuning as _tuning

BACKENDS = ("auto", "triton", "torch", "dense")
ACTIVATIONS = (None, "gelu")
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

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


def _normalize_shape(shape: Sequence[int]) -> tuple[int, int]:
    try:
        out_f, in_f = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (out_features, in_features), got {shape!r}") from None
    if out_f <= 0 or in_f <= 0:
        raise ValueError(f"shape must be positive, got {shape!r}")
    return out_f, in_f


def _validate(x, values, crow, col, shape, bias, activation, backend) -> tuple[int, int, int, int]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    out_f, in_f = _normalize_shape(shape)
    for name, t in (("x", x), ("values", values), ("crow_indices", crow), ("col_indices", col)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if values.dim() != 3:
        raise ValueError(f"values must be [nnz_blocks, bh, bw], got shape {tuple(values.shape)}")
    nnz, bh, bw = (int(s) for s in values.shape)
    if bh <= 0 or bw <= 0:
        raise ValueError(f"block size must be positive, got {(bh, bw)}")
    n_rows = -(-out_f // bh)
    if crow.dim() != 1 or crow.numel() != n_rows + 1:
        raise ValueError(
            f"crow_indices must have ceil(out/bh)+1 = {n_rows + 1} entries for shape {(out_f, in_f)} and "
            f"block {(bh, bw)}, got shape {tuple(crow.shape)}"
        )
    if col.dim() != 1 or col.numel() != nnz:
        raise ValueError(f"col_indices must have one entry per block ({nnz}), got shape {tuple(col.shape)}")
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_f:
        raise ValueError(f"x must be [..., {in_f}] (in_features), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    if values.dtype != x.dtype:
        raise ValueError(f"values dtype {values.dtype} does not match x dtype {x.dtype}")
    devices = {x.device, values.device, crow.device, col.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (out_f,):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be [{out_f}] (out_features), got {got}")
        if bias.dtype != x.dtype:
            raise ValueError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
        devices.add(bias.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    return out_f, in_f, bh, bw


# ----------------------------------------------------------------------------------------------------------
# per-weight caches (dense copy, torch BSR tensor, grouped layouts), keyed weakly on the values tensor


class _WeightCache:
    """Derived forms of one BSR weight, dropped when the values tensor dies or is modified in place."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}
        self._lock = threading.Lock()

    def get(self, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, name: str, build):
        sig = (values._version, crow.data_ptr(), col.data_ptr(), crow._version, col._version)
        key = id(values)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0]() is not values or entry[1] != sig:
                ref = weakref.ref(values, lambda _r, k=key: self._drop(k, _r))
                entry = (ref, sig, {})
                self._entries[key] = entry
            store = entry[2]
        if name not in store:
            store[name] = build()
        return store[name]

    def _drop(self, key: int, ref) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:
                del self._entries[key]

    def discard(self, values: torch.Tensor, name) -> None:
        with self._lock:
            entry = self._entries.get(id(values))
            if entry is not None and entry[0]() is values:
                entry[2].pop(name, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_cache = _WeightCache()


def clear_caches() -> None:
    """Forget cached dense weights, torch BSR tensors, grouped layouts and per-call plans."""
    _cache.clear()
    _plans.clear()


def bsr_to_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The dense (out, in) weight of a BSR weight (no host sync)."""
    out_f, in_f = _normalize_shape(shape)
    nnz, bh, bw = values.shape
    n_rows, n_cols = -(-out_f // bh), -(-in_f // bw)
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(n_rows, device=values.device), counts, output_size=nnz)
    blocks = values.new_zeros(n_rows * n_cols, bh, bw)
    blocks.index_copy_(0, rows * n_cols + col.to(torch.int64), values)
    dense = blocks.view(n_rows, n_cols, bh, bw).permute(0, 2, 1, 3).reshape(n_rows * bh, n_cols * bw)
    return dense[:out_f, :in_f].contiguous()


def _dense_weight(values, crow, col, shape):
    # one per inference_mode state: a weight made inside it cannot be saved for backward outside it
    key = ("dense", tuple(shape), torch.is_inference_mode_enabled())
    return _cache.get(values, crow, col, key, lambda: bsr_to_dense(values, crow, col, shape))


def _torch_bsr_weight(values, crow, col, shape, compute_dtype):
    bh, bw = values.shape[1:]
    size = (-(-shape[0] // bh) * bh, -(-shape[1] // bw) * bw)

    def build():
        v = values if compute_dtype == values.dtype else values.to(compute_dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "BSR support is in beta state"
            return torch.sparse_bsr_tensor(
                crow.to(torch.int64),
                col.to(torch.int64),
                v,
                size=size,
                dtype=compute_dtype,
                device=values.device,
                check_invariants=False,
            )

    # F.linear refuses a sparse weight made outside inference_mode inside it (and the cached tensor would be
    # one): keep one per mode
    return _cache.get(values, crow, col, ("bsr", compute_dtype, torch.is_inference_mode_enabled()), build)


def _grouped(values, crow, col, group):
    return _cache.get(values, crow, col, ("group", group), lambda: _triton_bsr.grouped_layout(crow, col, group))


def _index32(values, crow, col):
    def build():
        return crow.to(torch.int32), col.to(torch.int32)

    if crow.dtype == torch.int32 and col.dtype == torch.int32:
        return crow, col
    return _cache.get(values, crow, col, "idx32", build)


def triton_block_ok(bh: int, bw: int) -> bool:
    """tl.arange / tl.dot need power-of-two tile sides of at least 16."""
    return all(b >= 16 and b & (b - 1) == 0 for b in (int(bh), int(bw)))


# ----------------------------------------------------------------------------------------------------------
# backends (all take x2d [M, in] and return [M, out])


def _epilogue(y: torch.Tensor, bias, activation) -> torch.Tensor:
    if bias is not None:
        y = y + bias
    if activation == "gelu":
        y = F.gelu(y)
    return y


def _run_dense(x2d, values, crow, col, shape, bias, activation):
    y = F.linear(x2d, _dense_weight(values, crow, col, shape), bias)
    return F.gelu(y) if activation == "gelu" else y


def _run_torch(x2d, values, crow, col, shape, bias, activation):
    out_f, in_f = shape
    compute = x2d.dtype
    if x2d.device.type == "cpu":
        if values.shape[1] != values.shape[2]:
            return _run_dense(x2d, values, crow, col, shape, bias, activation)  # MKL: square blocks only
        if compute not in (torch.float32, torch.float64):
            compute = torch.float32  # torch's CPU BSR matmul (MKL) has no fp16/bf16 kernels
    w = _torch_bsr_weight(values, crow, col, shape, compute)
    xin = x2d if compute == x2d.dtype else x2d.to(compute)
    k_pad = w.shape[1] - in_f
    if k_pad:
        xin = F.pad(xin, (0, k_pad))
    y = F.linear(xin, w)
    if y.shape[1] != out_f:
        y = y[:, :out_f]
    if compute != x2d.dtype:
        y = y.to(x2d.dtype)
    return _epilogue(y, bias, activation)


def _run_triton(x2d, values, crow, col, shape, bias, activation, precision, config, y=None):
    if not _triton_bsr.HAS_TRITON:
        raise ValueError("backend='triton' needs the triton package")
    if x2d.device.type != "cuda" and not _triton_bsr.INTERPRET:
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {x2d.device}")
    if x2d.dtype not in _TRITON_DTYPES:
        raise ValueError(f"backend='triton' supports {_TRITON_DTYPES}, got {x2d.dtype}")
    if not triton_block_ok(*values.shape[1:]):
        raise ValueError(
            f"backend='triton' needs block sides that are powers of two >= 16, got {tuple(values.shape[1:])}"
        )
    out_f, in_f = shape
    if x2d.stride(-1) != 1 or (x2d.shape[0] > 1 and x2d.stride(0) < in_f):
        x2d = x2d.contiguous()
    values = values if values.is_contiguous() else values.contiguous()
    if y is None:
        y = torch.empty(x2d.shape[0], out_f, device=x2d.device, dtype=x2d.dtype)
    if x2d.shape[0] == 0:
        return y
    bh, bw = values.shape[1:]
    group = int(config.get("G", 1))
    if group > 1:
        gcrow, gcol, gidx = _grouped(values, crow, col, group)
    else:
        (gcrow, gcol), gidx = _index32(values, crow, col), None
    if config.get("TMA") and (group > 1 or not _triton_bsr.tma_ok(x2d, y, values)):
        config = {**config, "TMA": False}
    return _triton_bsr.launch(x2d, values, gcrow, gcol, gidx, bias, y, out_f, in_f, activation, precision, config)


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
    `config` pins the triton launch configuration (keys BLOCK_M, G, num_warps, num_stages, TMA).
    `out` ([..., out], x's dtype, contiguous) receives the result (the triton kernel writes it directly).
    Padding entries of `values` (beyond out/in) must be finite; from_dense writes zeros there.
    """
    if fp32_precision is None:
        fp32_precision = "tf32" if allow_tf32 else _settings["fp32_precision"]
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
    )
    M = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    # Hot path: the same weight is called again and again (a module's forward), so the validated arguments
    # and the backend choice are remembered per (weight tensors, token bucket, dtype, options).
    pkey = None
    if config is None and not needs_grad and isinstance(values, torch.Tensor) and isinstance(x, torch.Tensor):
        pkey = (
            id(values), values._version, id(crow_indices), id(col_indices), id(bias), tuple(shape), x.shape[-1],
            x.dtype, x.device, activation, backend, fp32_precision, _tuning.token_bucket(M), _tuning._target["value"],
        )  # fmt: skip
        plan = _plans.get(pkey)
        if plan is not None and plan[0] == (values, crow_indices, col_indices, bias):
            return _execute(x, values, crow_indices, col_indices, plan[1], bias, activation, plan[2], plan[3],
                            fp32_precision, out)  # fmt: skip

    out_f, in_f, bh, bw = _validate(x, values, crow_indices, col_indices, shape, bias, activation, backend)
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    shape = (out_f, in_f)
    x2d = x.reshape(-1, in_f)
    args = (x2d, values, crow_indices, col_indices, shape, bias, activation)

    if backend == "auto":
        if needs_grad:
            backend = "dense"
        elif x.device.type != "cuda":  # MKL's BSR matmul: fp32/fp64, square blocks
            backend = "torch" if x.dtype in (torch.float32, torch.float64) and bh == bw else "dense"
        else:
            choice = _tuning.choose(args, fp32_precision)
            backend = choice["backend"]
            if backend == "triton":
                config = choice["config"]
            if choice.get("measured", True) is False:
                pkey = None  # a stand-in choice (nothing could be measured): ask again next call
    elif backend == "triton" and needs_grad:
        raise ValueError("backend='triton' is inference only (no backward); use backend='dense' to train")
    if backend == "triton" and config is None:
        config = _tuning.default_config(
            x2d.shape[0], out_f, in_f, bh, bw, x.dtype, fp32_precision, values.shape[0], bias is not None, activation
        )  # fmt: skip
    if pkey is not None:
        if len(_plans) > 4096:
            _plans.clear()
        _plans[pkey] = (_Refs(values, crow_indices, col_indices, bias), shape, backend, config)
    return _execute(x, values, crow_indices, col_indices, shape, bias, activation, backend, config, fp32_precision, out)


_plans: dict[tuple, tuple] = {}


class _Refs:
    """Weak references to the tensors a plan was validated for; == checks they are still those objects."""

    __slots__ = ("refs",)

    def __init__(self, *tensors):
        self.refs = tuple(None if t is None else weakref.ref(t) for t in tensors)

    def __eq__(self, tensors) -> bool:
        return all(
            (r is None and t is None) or (r is not None and r() is t) for r, t in zip(self.refs, tensors, strict=True)
        )

    __hash__ = None


def _execute(x, values, crow, col, shape, bias, activation, backend, config, precision, out):
    out_f, in_f = shape
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_f)
    if out is not None:
        y2d = _check_out(out, lead, out_f, x)
        if backend == "triton":
            _run_triton(x2d, values, crow, col, shape, bias, activation, precision, config, y2d)
        else:
            run = _run_dense if backend == "dense" else _run_torch
            y2d.copy_(run(x2d, values, crow, col, shape, bias, activation))
        return out
    if backend == "triton":
        y = _run_triton(x2d, values, crow, col, shape, bias, activation, precision, config)
    elif backend == "dense":
        y = _run_dense(x2d, values, crow, col, shape, bias, activation)
    else:
        y = _run_torch(x2d, values, crow, col, shape, bias, activation)
    return y.reshape(*lead, out_f)


def _check_out(out: torch.Tensor, lead, out_f: int, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.shape != (*lead, out_f):
        raise ValueError(f"out must have shape {(*lead, out_f)}")
    if out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError("out must be contiguous, with x's dtype and device")
    return out.view(-1, out_f)


def block_density(values: torch.Tensor, shape: Sequence[int]) -> float:
    """Fraction of the padded weight's blocks that are stored."""
    out_f, in_f = _normalize_shape(shape)
    bh, bw = values.shape[1:]
    return values.shape[0] / (math.ceil(out_f / bh) * math.ceil(in_f / bw))
