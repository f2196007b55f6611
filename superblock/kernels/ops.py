"""The block-sparse linear layer as a torch custom operator: `torch.ops.superblock.bsr_linear`.

    superblock::bsr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? gidx,
                           Tensor? bias, int out_features, str activation, str backend, str precision,
                           int[] config) -> Tensor

y = act(x @ W^T + bias), W block-sparse over the zero-padded (ceil(out/bh)*bh, ceil(in/bw)*bw) matrix; x is
[..., in], y is [..., out_features] in x's dtype (a new, contiguous tensor; nothing is mutated or aliased).

  activation  "none" | "gelu" (exact erf GELU, fused into the kernel's epilogue) | "silu_mul" (a gated MLP's gate
              and up projections: W = [gate; up], out_features = 2N rows with N a multiple of the block height,
              bias [gate's N; up's N]; y = silu(x @ Wg^T + bg) * (x @ Wu^T + bu) is [..., N])
  backend     "triton" (CUDA) | "torch" (torch's BSR kernels) | "dense" (the dense weight rebuilt per call:
              a reference; modules run their dense choice as F.linear with a weight prepared at load time)
  precision   fp32 products in the triton backend: "ieee" | "tf32" | "tf32x3" (ignored otherwise)
  config      triton launch configuration [BLOCK_M, G, num_warps, num_stages, TMA] or [..., TMA, SPLIT] ([] for
              other backends); with G > 1, crow/col are the grouped layout and gidx its block map
              (kernels._runners.layout_for); SPLIT >= 1 runs the decode kernel (few tokens: SPLIT programs per
              block row, fp32 partial sums reduced by a second kernel; kernels._triton_bsr.launch_decode)

    superblock::bsr_linear_triton(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? gidx,
                                  Tensor? bias, int out_features, str activation, str precision,
                                  int[] config) -> Tensor

The same product with backend "triton" and a tiled-kernel config (no TMA, no SPLIT), registered with
torch.library.triton_op: torch.compile sees through it to the Triton kernel and launches that from its own
generated code (no dispatcher, no Python of ours per call), which is what keeps small compiled batches from being
host-bound. CUDA only; `tiled_config(config)` says whether a config qualifies.

torch.compile and torch.export see one opaque node with a fake (meta) implementation: no guards on tensor
identity, no Python inside. Every choice (backend, config) is an argument: callers decide outside the trace.
"""

from __future__ import annotations

import torch

from superblock.kernels import _runners, _triton_bsr

OP_ACTIVATIONS = ("none", "gelu", "silu_mul")
OP_BACKENDS = _runners.KERNEL_BACKENDS


def bsr_linear_impl(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    gidx: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    activation: str,
    backend: str,
    precision: str,
    config: list[int],
    out: torch.Tensor | None = None,
    wrap=None,
) -> torch.Tensor:
    """The op's CPU/CUDA kernel, callable directly in eager code (no dispatcher: ~10 us less per call).
    `out` (eager only) is a [..., y's width] contiguous tensor the result is written into. `wrap`: the triton
    backend's launch wrapper (torch.library.wrap_triton inside superblock::bsr_linear_triton)."""
    in_f = x.shape[-1]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_f)
    act = None if activation == "none" else activation
    n_out = _runners.out_width(out_features, act)
    y2d = None if out is None else out.view(-1, n_out)
    if backend == "triton":
        _runners.check_triton(x2d, values)
        cfg = _runners.config_from_list(config)
        y = _runners.run_triton(
            x2d, values, crow_indices, col_indices, gidx, bias, out_features, act, precision, cfg, y2d, wrap
        )
    else:
        shape = (out_features, in_f)
        if backend == "torch":
            y = _runners.run_torch(x2d, values, crow_indices, col_indices, shape, bias, act)
        elif backend == "dense":
            w = _runners.bsr_to_dense(values, crow_indices, col_indices, shape)
            y = _runners.run_dense(x2d, w, bias, act)
        else:
            raise ValueError(f"backend must be one of {OP_BACKENDS}, got {backend!r}")
        if y2d is not None:
            y2d.copy_(y)
            y = y2d
    return out if out is not None else y.reshape(*lead, n_out)


@torch.library.custom_op("superblock::bsr_linear", mutates_args=())
def bsr_linear_op(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    gidx: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    activation: str,
    backend: str,
    precision: str,
    config: list[int],
) -> torch.Tensor:
    y = bsr_linear_impl(
        x, values, crow_indices, col_indices, gidx, bias, out_features, activation, backend, precision, config
    )
    return y if y.is_contiguous() else y.contiguous()


@bsr_linear_op.register_fake
def _bsr_linear_fake(x, values, crow_indices, col_indices, gidx, bias, out_features, activation, backend, precision,
                     config):  # fmt: skip
    torch._check(x.shape[-1] > 0, lambda: "x must have a non-empty last dimension (in_features)")
    torch._check(values.dim() == 3, lambda: "values must be [nnz_blocks, bh, bw]")
    torch._check(activation in OP_ACTIVATIONS, lambda: f"activation must be one of {OP_ACTIVATIONS}")
    torch._check(backend in OP_BACKENDS, lambda: f"backend must be one of {OP_BACKENDS}")
    return x.new_empty(*x.shape[:-1], _runners.out_width(out_features, None if activation == "none" else activation))


# torch.library.triton_op arrived in torch 2.6; without it (or without triton) traced layers keep the opaque op
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and _triton_bsr.HAS_TRITON


def tiled_config(config: list[int]) -> bool:
    """Whether a triton config list runs through superblock::bsr_linear_triton (the tiled kernel, no TMA; the
    decode kernel stays inside the opaque op)."""
    cfg = _runners.config_from_list(config)
    return HAS_TRITON_OP and not cfg["TMA"] and int(cfg.get("SPLIT", 0)) == 0


def _triton_op(fn):
    return torch.library.triton_op("superblock::bsr_linear_triton", fn, mutates_args=()) if HAS_TRITON_OP else fn


@_triton_op
def bsr_linear_triton_op(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    gidx: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    activation: str,
    precision: str,
    config: list[int],
) -> torch.Tensor:
    if not tiled_config(config):
        raise ValueError(f"superblock::bsr_linear_triton runs the tiled kernel without TMA, got config {config}")
    return bsr_linear_impl(
        x, values, crow_indices, col_indices, gidx, bias, out_features, activation, "triton", precision, config,
        wrap=torch.library.wrap_triton,
    )  # fmt: skip
