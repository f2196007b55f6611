"""Kernel dispatch: which backend, which kernel and which call run a product, decided in this one file.

Both the functional `bsr_linear` and `BlockSparseLinear` ask `choose(...)` for a `Choice` (backend and Triton launch
configuration) and turn it into a `Plan` with `build_plan(...)` (the tensors the choice runs on, which kernel, and how
it is called). Callers keep plans per weight and token count and only execute them; the runners
(_runners, _triton_bsr) run what a plan says.

Backend (`choose`):

  needs a gradient  dense (differentiable) for auto; triton refuses (inference only)
  CPU, auto         torch's BSR path (MKL) for fp32/fp64 with square blocks, else dense (`cpu_backend`)
  traced, auto      no measurement, no host sync: tuning.stand_in (triton's first candidate where it runs, else
                    dense) (`static_choice`)
  eager CUDA, auto  the measured choice (kernels.tuning: stored, else measured now, else tuning.stand_in)
  explicit          that backend; triton gets the given configuration, the tuned one, or the default

Kernel (`kernel_variant`, from the Triton configuration; _triton_bsr.Launch runs it):

  SPLIT >= 1        "decode": few tokens, SPLIT programs per block row (partial sums reduced in a workspace);
                    with BAL > 0 each block row gets as many programs as keep each under BAL kept blocks (a
                    work list derived once per weight; inside a trace where it was never built, the SPLIT split)
  KB > 1            "packed": the tiled kernel multiplying KB kept blocks of a block row per step (thin tiles)
  TMA, G == 1       "tma": the tiled kernel with TMA loads (not for gated pairs; falls back to "tiled" for x or y
                    whose rows are not 16-byte aligned)
  otherwise         "tiled": one program per (token tile, G block rows)

Call (`CALLS`, the plan's `call`; the caller executes it):

  bound     eager triton: the launch bound to this weight (_runners.bind_triton), the least host work per call
  dense     F.linear on the dense weight (built once, or inside a trace in the graph) and the activation
  inductor  traced triton with a tiled configuration: superblock::bsr_linear_triton, which inductor launches
  opaque    traced, everything else: superblock::bsr_linear, one opaque node
  impl      eager, everything else (torch's BSR path; triton where no launch can be bound): the op's kernel
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from superblock.kernels import _runners, _triton_bsr, ops
from superblock.kernels import tuning as _tuning

BACKENDS = ("auto", *_runners.KERNEL_BACKENDS)


@dataclass(frozen=True)
class Choice:
    """One decision: `backend` ("triton" | "torch" | "dense"), the Triton launch `config` (triton only), the fp32
    `precision` of the triton backend, and whether it was `measured` (False: a stand-in rule)."""

    backend: str
    config: dict | None = None
    precision: str = "ieee"
    measured: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS[1:]:
            raise ValueError(f"a choice's backend must be one of {BACKENDS[1:]}, got {self.backend!r}")

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able form stored in dispatch tables, export manifests and tuning tables."""
        out = {"backend": self.backend, "config": self.config, "precision": self.precision}
        if not self.measured:
            out["measured"] = False
        return out

    @classmethod
    def from_dict(cls, entry: dict, precision: str = "ieee") -> Choice:
        return cls(
            backend=entry["backend"],
            config=entry.get("config") if entry["backend"] == "triton" else None,
            precision=entry.get("precision", precision),
            measured=bool(entry.get("measured", True)),
        )


CALLS = ("bound", "dense", "inductor", "opaque", "impl")


class Plan(NamedTuple):
    """What a layer runs for one token count: the backend, its tensors (handles: buffer names, or tensors), the Triton
    config list, the fp32 precision, how it is called (one of CALLS), the Triton kernel (kernel_variant; "" for
    other backends) and, for call "bound", `run`: the Triton launch bound to the weight (`run(x, bias, out=None)`)."""

    backend: str
    tensors: Any
    config: list[int]
    precision: str
    call: str = "impl"
    kernel: str = ""
    run: Any = None


class Weight(NamedTuple):
    """What build_plan needs of a weight. `crow` / `col`: handles of its index tensors (buffer names for a module,
    the tensors for the functional op); `resolve(handle)` the tensor of a handle; `dense()` its dense weight."""

    values: torch.Tensor
    crow: Any
    col: Any
    shape: tuple[int, int]
    has_bias: bool
    activation: str | None
    resolve: Callable[[Any], Any]
    dense: Callable[[], torch.Tensor]


def kernel_variant(config: dict, activation: str | None = None) -> str:
    """The Triton kernel a configuration runs (the table in this module's docstring)."""
    return _triton_bsr.kernel_variant(config, activation)


def build_plan(choice: Choice, device: torch.device, traced: bool, weight: Weight, derive) -> Plan:
    """The plan of a choice. `derive(name, build, n)`: the handle(s) of n tensors derived from the weight, built once
    and kept by the caller, or None when they cannot be built here (inside a trace: the grouped layout needs the
    index values on the host, so G > 1 runs as G = 1 there)."""
    p = choice.precision
    if choice.backend == "dense":
        handle = derive("_dense_weight", weight.dense, 1)
        return Plan("dense", weight.dense() if handle is None else handle, [], p, "dense")
    if choice.backend == "torch":
        idx = derive("_index64", lambda: tuple(weight.resolve(h).long() for h in (weight.crow, weight.col)), 2)
        crow, col = idx if idx is not None else (weight.crow, weight.col)
        return Plan("torch", (crow, col, None), [], p, "opaque" if traced else "impl")
    if choice.backend != "triton":
        raise ValueError(f"unknown backend {choice.backend!r} in the dispatch table")
    config = dict(choice.config)
    group = int(config.get("G", 1))
    handles = (weight.crow, weight.col, None)
    if group > 1:
        build = lambda: _runners.layout_for(weight.resolve(weight.crow), weight.resolve(weight.col), group)  # noqa: E731
        layout = derive(f"_group{group}", build, 3)
        if layout is None:
            config["G"] = 1
        else:
            handles = layout
    per_program = int(config.get("BAL", 0))
    if per_program:
        build = lambda: _triton_bsr.balanced_work(  # noqa: E731
            weight.resolve(weight.crow), int(weight.values.shape[0]), per_program, weight.activation == "silu_mul"
        )
        work = derive(f"_balanced{per_program}", build, 1)
        if work is None:
            config.pop("BAL")
        else:
            handles = (weight.crow, weight.col, work)
    config_list = _runners.config_to_list(config)
    kernel = kernel_variant(config, weight.activation)
    if traced:
        call = "inductor" if device.type == "cuda" and ops.tiled_config(config_list) else "opaque"
        return Plan("triton", handles, config_list, p, call, kernel)
    if not _runners.bindable(device):
        return Plan("triton", handles, config_list, p, "impl", kernel)
    crow, col, gidx = (weight.resolve(h) if h is not None else None for h in handles)
    run = _runners.bind_triton(
        weight.values, crow, col, gidx, weight.has_bias, weight.shape, weight.activation, p, config
    )
    return Plan("triton", handles, config_list, p, "bound", kernel, run)


def cpu_backend(dtype: torch.dtype, block: tuple[int, int]) -> str:
    """`auto` on the CPU: MKL's BSR matmul runs fp32/fp64 with square blocks; everything else the dense path."""
    return "torch" if dtype in (torch.float32, torch.float64) and block[0] == block[1] else "dense"


def static_choice(x: torch.Tensor, values: torch.Tensor, backend: str, precision: str) -> Choice:
    """What runs where nothing may be measured (inside a trace, a bucket never prepared): no host sync."""
    if backend == "auto" and x.device.type != "cuda":
        return Choice(cpu_backend(x.dtype, (int(values.shape[1]), int(values.shape[2]))), None, precision, False)
    if backend == "auto":
        return Choice.from_dict(_tuning.stand_in(x, values, precision), precision)
    config = _tuning.first_config(x, values, precision) if backend == "triton" else None
    return Choice(backend, config, precision, measured=False)


def choose(
    args: tuple,
    backend: str,
    precision: str,
    *,
    traced: bool = False,
    needs_grad: bool = False,
    config: dict | None = None,
    target: str | None = None,
) -> Choice:
    """The choice for one product. args = (x2d, values, crow, col, (out, in), bias, activation)."""
    x2d, values, _crow, _col, shape, bias, activation = args
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if needs_grad:
        if backend == "triton":
            raise ValueError("backend='triton' is inference only (no backward); use backend='dense' to train")
        return Choice("dense", None, precision, measured=False)
    if backend == "auto":
        if x2d.device.type != "cuda" or traced:
            return static_choice(x2d, values, backend, precision)
        entry = _tuning.measured_choice(args, precision, target=target)
        return Choice.from_dict({**entry, "precision": precision})
    if backend != "triton":
        return Choice(backend, None, precision)
    _runners.check_triton(x2d, values)
    if config is None and traced:
        return static_choice(x2d, values, "triton", precision)
    if config is None:
        bh, bw = values.shape[1:]
        config = _tuning.default_config(
            x2d.shape[0], *shape, bh, bw, x2d.dtype, precision, values.shape[0], bias is not None, activation, target,
            _triton_bsr.feature_major(x2d),
        )  # fmt: skip
    return Choice("triton", dict(config), precision)
