"""The three backends of a block-sparse linear layer as plain functions, with no caches and no dispatch.

Everything a backend needs beyond x is passed in, already in the form it runs on (int32 or grouped indices for
Triton, int64 indices for torch's BSR, the dense weight for dense): callers precompute those once per weight.
Both the dispatch (bsr_linear.py, modules.py, ops.py) and the tuner (tuning.py) import this module, so neither
imports the other's privates.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from superblock.kernels import _triton_bsr

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the backends a product runs on (this module's run_triton / run_torch / run_dense); every other list of backend
# names is built from this one
KERNEL_BACKENDS = ("triton", "torch", "dense")
# a Triton launch configuration travels through the custom op as a list of ints in this order; SPLIT >= 1 selects
# the decode kernel (few tokens, SPLIT programs per block row); KB > 1 makes the tiled kernel multiply KB kept blocks
# of a block row per step (one MMA with KB * bw inputs: thin tiles such as 64 x 16). The seventh slot was XS, the
# x-stationary kernel's row chunks (that kernel left the package): it stays, always 0, so old lists keep their
# meaning. Trailing entries at their default are left off, so the five-entry lists of earlier tables and exports
# are still the tiled kernel.
# BAL (ninth, decode only): balance the decode kernel's programs by kept blocks, at most BAL blocks a program; its
# work list travels in gidx's place (G is 1 there), and where it cannot be built (a trace) the SPLIT split runs.
CONFIG_KEYS = ("BLOCK_M", "G", "num_warps", "num_stages", "TMA", "SPLIT", "XS", "KB", "BAL")
_DEFAULTS = {"TMA": 0, "SPLIT": 0, "XS": 0, "KB": 1, "BAL": 0}
_OPTIONAL = ("SPLIT", "XS", "KB", "BAL")  # dropped from a config dict when at their default
MIN_CONFIG_LEN = len(CONFIG_KEYS) - len(_OPTIONAL)


def config_to_list(config: dict) -> list[int]:
    values = [int(config.get(k, _DEFAULTS.get(k, 1))) for k in CONFIG_KEYS]
    while len(values) > MIN_CONFIG_LEN and values[-1] == _DEFAULTS[CONFIG_KEYS[len(values) - 1]]:
        values.pop()
    return values


_configs: dict[tuple, dict] = {}


def config_from_list(values: Sequence[int]) -> dict:
    """The config dict of a config list (memoized in eager code: the hot path converts the same few lists again and
    again; callers must not mutate the result). Inside a trace it is parsed afresh: a look-up in the memo would make
    torch.compile guard on the memo's contents, a guard that code running during the same trace invalidates."""
    key = tuple(values)
    if torch.compiler.is_compiling():
        return _parse_config(key)
    cfg = _configs.get(key)
    if cfg is None:
        cfg = _configs[key] = _parse_config(key)
    return cfg


def _parse_config(key: tuple) -> dict:
    if not MIN_CONFIG_LEN <= len(key) <= len(CONFIG_KEYS):
        raise ValueError(
            f"a triton config has {MIN_CONFIG_LEN} to {len(CONFIG_KEYS)} entries {CONFIG_KEYS}, got {list(key)}"
        )
    cfg = {**_DEFAULTS, **dict(zip(CONFIG_KEYS, (int(v) for v in key), strict=False))}
    if cfg["XS"]:
        raise ValueError(
            f"triton config {list(key)} has a seventh entry XS={cfg['XS']}: the x-stationary kernel (XS) is no "
            f"longer in the package (its code is in the repository's experiments/xstat); use XS=0"
        )
    if cfg["KB"] < 1 or cfg["KB"] & (cfg["KB"] - 1):
        raise ValueError(f"triton config {list(key)}: KB (blocks per step) must be a power of two >= 1")
    if cfg["BAL"] < 0 or (cfg["BAL"] and cfg["SPLIT"] < 1):
        raise ValueError(f"triton config {list(key)}: BAL (kept blocks per balanced decode program) needs SPLIT >= 1")
    cfg["TMA"] = bool(cfg["TMA"])
    for k in _OPTIONAL:
        if cfg[k] == _DEFAULTS[k]:
            del cfg[k]
    return cfg


def normalize_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(out_features, in_features) of a weight's shape, or a ValueError."""
    if type(shape) in (tuple, torch.Size) and len(shape) == 2:  # the common forms, checked in a few operations
        out_f, in_f = shape
        if type(out_f) is int and type(in_f) is int and out_f > 0 and in_f > 0:
            return out_f, in_f
    try:
        out_f, in_f = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (out_features, in_features), got {shape!r}") from None
    if out_f <= 0 or in_f <= 0:
        raise ValueError(f"shape must be positive, got {shape!r}")
    return out_f, in_f


def check_bsr(values, crow, col, shape: Sequence[int], *, contents: bool = False) -> tuple[int, int, int, int]:
    """(out, in, bh, bw) of a BSR weight (values [nnz, bh, bw], crow [ceil(out/bh)+1], col [nnz], int32/int64 indices,
    one device), or a ValueError that says what does not fit. The one check of a BSR triplet: the functional op,
    BlockSparseLinear.from_bsr and export's loader use it. `contents=True` also reads the indices (a host sync;
    loading from a file): row pointers from 0 to nnz that never step back, columns inside the block grid."""
    out_f, in_f = normalize_shape(shape)
    for name, t in (("values", values), ("crow_indices", crow), ("col_indices", col)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if values.dim() != 3:
        raise ValueError(f"values must be [nnz_blocks, bh, bw], got shape {tuple(values.shape)}")
    nnz, bh, bw = (int(s) for s in values.shape)
    if bh <= 0 or bw <= 0:
        raise ValueError(f"block size must be positive, got {(bh, bw)}")
    n_rows, n_cols = -(-out_f // bh), -(-in_f // bw)
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
    if len({values.device, crow.device, col.device}) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(t.device) for t in (values, crow, col))}")
    if contents:
        ok = int(crow[0]) == 0 and int(crow[-1]) == nnz and bool((crow.diff() >= 0).all())
        if ok and nnz:
            ok = int(col.min()) >= 0 and int(col.max()) < n_cols
        if not ok:
            raise ValueError(f"BSR indices point outside the {n_rows} x {n_cols} block grid or step back")
    return out_f, in_f, bh, bw


def triton_block_ok(bh: int, bw: int) -> bool:
    """tl.arange / tl.dot need power-of-two tile sides of at least 16."""
    return all(b >= 16 and b & (b - 1) == 0 for b in (int(bh), int(bw)))


def triton_usable(x: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether backend='triton' can run these tensors here (CUDA or the interpreter, dtype, block shape)."""
    return (
        _triton_bsr.HAS_TRITON
        and (x.device.type == "cuda" or _triton_bsr.INTERPRET)
        and x.dtype in TRITON_DTYPES
        and triton_block_ok(*values.shape[1:])
    )


def bsr_to_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The dense (out, in) weight of a BSR weight (no host sync; differentiable in `values`)."""
    out_f, in_f = (int(s) for s in shape)
    nnz, bh, bw = values.shape
    n_rows, n_cols = -(-out_f // bh), -(-in_f // bw)
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(n_rows, device=values.device), counts, output_size=nnz)
    blocks = values.new_zeros(n_rows * n_cols, bh, bw)
    blocks = blocks.index_copy(0, rows * n_cols + col.to(torch.int64), values)
    dense = blocks.view(n_rows, n_cols, bh, bw).permute(0, 2, 1, 3).reshape(n_rows * bh, n_cols * bw)
    return dense[:out_f, :in_f].contiguous()


def index32(crow: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if crow.dtype == torch.int32 and col.dtype == torch.int32:
        return crow, col
    return crow.to(torch.int32), col.to(torch.int32)


def layout_for(
    crow: torch.Tensor, col: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(crow, col, gidx) the Triton kernel walks for G block rows per program (G > 1 syncs: host-built union)."""
    if group > 1:
        return _triton_bsr.grouped_layout(crow, col, group)
    return (*index32(crow, col), None)


def out_width(out_f: int, activation: str | None) -> int:
    """Columns of y for a weight of `out_f` rows: "silu_mul" (a gated MLP's [gate; up]) halves them."""
    return out_f // 2 if activation == "silu_mul" else out_f


def activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The activation of a pre-activation y = x @ W^T + b (for "silu_mul", [gate | up] -> silu(gate) * up)."""
    if activation == "gelu":
        return F.gelu(y)
    if activation == "silu_mul":
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return y


def epilogue(y: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    if bias is not None:
        y = y + bias
    return activate(y, activation)


def run_dense(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None):
    return activate(F.linear(x2d, weight, bias), activation)


def torch_bsr_weight(values, crow, col, shape, compute_dtype):
    """torch's sparse BSR tensor over the padded weight (a cheap view-like construction, no copies of values
    unless the compute dtype differs)."""
    bh, bw = values.shape[1:]
    size = (-(-shape[0] // bh) * bh, -(-shape[1] // bw) * bw)
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


def run_torch(x2d, values, crow, col, shape, bias, activation):
    """torch's BSR kernels (F.linear with a sparse weight); on CPU (MKL) fp16/bf16 go through fp32 and
    non-square blocks through the dense path."""
    out_f, in_f = shape
    compute = x2d.dtype
    if x2d.device.type == "cpu":
        if values.shape[1] != values.shape[2]:
            return run_dense(x2d, bsr_to_dense(values, crow, col, shape), bias, activation)  # MKL: square only
        if compute not in (torch.float32, torch.float64):
            compute = torch.float32  # torch's CPU BSR matmul (MKL) has no fp16/bf16 kernels
    w = torch_bsr_weight(values, crow, col, shape, compute)
    xin = x2d if compute == x2d.dtype else x2d.to(compute)
    k_pad = w.shape[1] - in_f
    if k_pad:
        xin = F.pad(xin, (0, k_pad))
    y = F.linear(xin, w)
    if y.shape[1] != out_f:
        y = y[:, :out_f]
    if compute != x2d.dtype:
        y = y.to(x2d.dtype)
    return epilogue(y, bias, activation).contiguous()


def check_triton(x2d: torch.Tensor, values: torch.Tensor) -> None:
    _check_triton_here(x2d.device, x2d.dtype, values)


def _check_triton_here(device: torch.device, dtype: torch.dtype, values: torch.Tensor) -> None:
    if not _triton_bsr.HAS_TRITON:
        raise ValueError("backend='triton' needs the triton package")
    if device.type != "cuda" and not _triton_bsr.INTERPRET:
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' supports {TRITON_DTYPES}, got {dtype}")
    if not triton_block_ok(*values.shape[1:]):
        raise ValueError(
            f"backend='triton' needs block sides that are powers of two >= 16, got {tuple(values.shape[1:])}"
        )


def kernel_layout(x2d: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the Triton kernels read it: token-major (rows of K contiguous features) or feature-major (a
    transposed view: columns of M contiguous tokens, e.g. the previous layer's output written transposed) as it is,
    any other layout copied to token-major."""
    shape, stride = x2d.shape, x2d.stride()
    token_major = stride[1] == 1 and (shape[0] <= 1 or stride[0] >= shape[1])
    return x2d if token_major or _triton_bsr._feature_major(shape, stride) else x2d.contiguous()


def run_triton(x2d, values, crow, col, gidx, bias, out_f, activation, precision, config, y=None, wrap=None):
    """The Triton kernel into y (allocated when None). crow/col are int32, and the grouped layout (with gidx)
    when config['G'] > 1 (see layout_for). Host work per call: a few checks and the launch. `wrap`: see
    _triton_bsr.launch (the tiled kernel inside a torch.library.triton_op)."""
    in_f = x2d.shape[1]
    x2d = kernel_layout(x2d)
    if not values.is_contiguous():
        values = values.contiguous()
    n_out = out_width(out_f, activation)
    if y is None:
        y = torch.empty(x2d.shape[0], n_out, device=x2d.device, dtype=x2d.dtype)
    if x2d.shape[0] == 0:
        return y
    _check_config(out_f, values, gidx, activation, config)
    return _triton_bsr.launch(x2d, values, crow, col, gidx, bias, y, n_out, in_f, activation, precision, config, wrap)


def bindable(device: torch.device) -> bool:
    """Whether a Triton launch can be bound to a weight on this device (CUDA, or Triton's CPU interpreter)."""
    return device.type == "cuda" or _triton_bsr.INTERPRET


def bind_triton(values, crow, col, gidx, has_bias: bool, shape, activation: str | None, precision: str, config: dict):
    """run_triton for one weight, bound: checks and derivations once, then `run(x, bias, out=None)` per call does
    the product of x [..., in] with the least host work (y's allocation, the grid, the launch; a contiguous x of
    any rank is read as it is, others through a 2-D view). `bias` is None exactly when `has_bias` is False."""
    out_f, in_f = (int(s) for s in shape)
    _check_triton_here(values.device, values.dtype, values)
    _check_config(out_f, values, gidx, activation, config)
    n_out = out_width(out_f, activation)
    if not values.is_contiguous():
        values = values.contiguous()
    launch = _triton_bsr.launch_for(values, crow, col, gidx, has_bias, n_out, in_f, activation, precision, config)
    dtype, device = values.dtype, values.device
    w_desc = _triton_bsr.weight_descriptor(values) if launch.tma else None
    call, flat = launch.bind(values, crow, col, gidx, w_desc)

    def run(x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
        xs = x.shape
        if x.dtype != dtype or x.device != device or xs[-1] != in_f:
            raise ValueError(f"x is {x.dtype} [..., {xs[-1]}] on {x.device}; this weight takes {dtype} "
                             f"[..., {in_f}] on {device}")  # fmt: skip
        if out is None and x.is_contiguous():  # rows of x as they are, y in its final shape: no views made
            y = torch.empty((*xs[:-1], n_out), device=device, dtype=dtype)
            m = x.numel() // in_f
            return flat(x, m, bias, y) if m else y
        x2d = kernel_layout(x.reshape(-1, in_f))
        y = torch.empty(x2d.shape[0], n_out, device=device, dtype=dtype) if out is None else out.view(-1, n_out)
        if x2d.shape[0]:
            call(x2d, bias, y)
        return y.view(*x.shape[:-1], n_out) if out is None else out

    return run


def _check_config(out_f: int, values: torch.Tensor, gidx, activation: str | None, config: dict) -> None:
    """A Triton config that can run this weight: the decode kernel and KB > 1 walk plain block rows, G > 1 needs the
    grouped layout, a gated pair ("silu_mul") needs halves the kernels can pair."""
    group = int(config.get("G", 1))
    if activation == "silu_mul":
        _check_glu(out_f, int(values.shape[1]), config)
    if int(config.get("SPLIT", 0)) >= 1 and group > 1:
        raise ValueError("the decode kernel (SPLIT >= 1) walks plain block rows: it needs G == 1")
    if group > 1 and gidx is None:
        raise ValueError(f"triton config G={group} needs the grouped layout (crow, col, gidx) of layout_for")
    if int(config.get("BAL", 0)) and gidx is None:
        raise ValueError("a balanced decode config (BAL > 0) needs its work list (balanced_work) in gidx's place")
    if int(config.get("KB", 1)) > 1 and (group > 1 or config.get("TMA")):
        raise ValueError("KB > 1 (kept blocks per step) walks plain block rows without TMA: it needs G == 1 and TMA "
                         "off")  # fmt: skip


def _check_glu(out_f: int, bh: int, config: dict) -> None:
    """A [gate; up] weight (activation "silu_mul") the Triton kernels can pair: the up rows start on a block row
    and, with G block rows per program, on a group boundary."""
    group = int(config.get("G", 1))
    if out_f % (2 * bh) or (out_f // (2 * bh)) % group:
        raise ValueError(
            f"activation 'silu_mul' needs a [gate; up] weight whose halves ({out_f} rows / 2) are a multiple of "
            f"G={group} block rows of {bh}"
        )
