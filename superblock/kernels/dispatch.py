"""Kernel dispatch, one rule for everything: which backend (and Triton launch configuration) runs a product.

Both the functional `bsr_linear` and `BlockSparseLinear` ask `choose(...)`; `Choice` is what a decision is and
`Plan` what a layer keeps per token count to run it (the tensors of that choice, by buffer name). The rules:

  needs a gradient  dense (differentiable) for auto; triton refuses (inference only)
  CPU, auto         torch's BSR path (MKL) for fp32/fp64 with square blocks, else dense (`cpu_backend`)
  traced, auto      no measurement, no host sync: triton's first candidate configuration when it runs here, else
                    dense (`static_choice`)
  eager CUDA, auto  the measured choice (kernels.tuning: stored, else measured now, else a default)
  explicit          that backend; triton gets the given configuration, the tuned one, or the default

Backends a Triton configuration can select (CONFIG_KEYS in _runners): the tiled kernel (G >= 1, TMA) and the decode
kernel (SPLIT >= 1, few tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from superblock.kernels import _runners
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


class Plan(NamedTuple):
    """What a layer runs for one token count: the backend, its tensors (buffer names, or tensors built inside a
    trace), the Triton config list, the fp32 precision, whether inductor may launch the kernel itself, and, in eager
    code, `run`: the Triton launch bound to the weight (_runners.bind_triton: `run(x, bias, out=None)`)."""

    backend: str
    tensors: Any
    config: list[int]
    precision: str
    inductor: bool = False
    run: Any = None


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
            x2d.shape[0], *shape, bh, bw, x2d.dtype, precision, values.shape[0], bias is not None, activation, target
        )
    return Choice("triton", dict(config), precision)
