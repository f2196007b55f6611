"""Fewer, larger block-sparse products per transformer layer: q/k/v as one product, gate/up as one with SiLU * up.

    fuse_projections(model)     # Llama-style attention and gated MLPs of BlockSparseLinear layers, in place

A BSR weight's block rows stack: concatenating the rows of several weights with the same block size (each but the
last a whole number of block rows) is concatenating their row pointers (offset), columns and values (`concat_rows`).

q/k/v. transformers' attention modules (LlamaAttention and its kin, transformers 5.x) call
`self.q_proj(hidden_states)`, then `self.k_proj(hidden_states)`, then `self.v_proj(hidden_states)`, and nothing else
of those modules. `FusedQKV` (registered on the attention module as `qkv_proj`) holds one BlockSparseLinear over
the concatenated rows; q_proj / k_proj / v_proj become `QKVSlice`s serving column slices (views) of its output. The
q call computes the product and keeps it with its input; the k and v calls reuse it when they get the very same
input tensor (`is`, not id() or a version counter: nothing there for Dynamo to guard on), and the v call drops it.
Any other call computes the product afresh, so an unusual order or another input (cross-attention) is slower,
never wrong, and nothing outlives the v call. Why not replace the attention module: its forward (rotary
embeddings, caches, the attention interface, q/k norms in some models) changes with every transformers release
and model; the projection calls are the stable part. Under torch.compile the kept tensor is a side effect within
one traced frame, cleared before the frame ends, so no guard and no recompilation come from it.

gate/up. A gated MLP (`down_proj(act_fn(gate_proj(x)) * up_proj(x))` with SiLU, as LlamaMLP) becomes
`FusedGatedMLP`: down_proj(gate_up_proj(x)), gate_up_proj a `FusedGateUpLinear` over [gate; up] with activation
"silu_mul" (the kernels compute silu(gate) * up in their epilogue, kernels.ops). Fusion needs the intermediate size
to be a multiple of the block height (of 4 block heights for blocks of 16 or less: the grouped kernel's G).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from superblock.kernels import _runners
from superblock.kernels.modules import BlockSparseLinear

GLU_GROUP = 4  # the most block rows per program the tuner gives blocks of 16 or less (tuning.candidate_configs)

__all__ = [
    "FusedGateUpLinear",
    "FusedGatedMLP",
    "FusedQKV",
    "QKVSlice",
    "concat_rows",
    "fusable_gate_up",
    "fusable_qkv",
    "fuse_projections",
]


def concat_rows(
    layers: list[BlockSparseLinear],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(values, crow, col, bias) of the weight whose rows are the layers' rows, in order. Needs one block size,
    in_features, dtype and device, and every layer but the last a whole number of block rows. A layer without
    bias contributes zeros when another has one."""
    first = layers[0]
    bh = first.block_size[0]
    if any(_geometry(layer)[:4] != _geometry(first)[:4] for layer in layers):
        raise ValueError("concat_rows needs one block size, in_features, dtype and device")
    if any(layer.out_features % bh for layer in layers[:-1]):
        raise ValueError(f"concat_rows needs every layer but the last to have a multiple of {bh} rows")
    values = torch.cat([layer.values for layer in layers])
    col = torch.cat([layer.col_indices for layer in layers])
    crows, offset = [first.crow_indices[:1]], 0
    for layer in layers:
        crows.append(layer.crow_indices[1:] + offset)
        offset += layer.values.shape[0]
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([
            layer.bias if layer.bias is not None else layer.values.new_zeros(layer.out_features) for layer in layers
        ])  # fmt: skip
    return values, torch.cat(crows).to(torch.int32), col, bias


class FusedGateUpLinear(BlockSparseLinear):
    """A gated MLP's gate and up projections as one block-sparse product: y = silu(x @ Wg^T + bg) * (x @ Wu^T + bu).

    The weight is [gate; up] ((2N, in), `out_features` = 2N, the rows of its BSR buffers), the bias [bg; bu]; the
    output has N columns. Dispatch, tuning and plans are BlockSparseLinear's, with activation "silu_mul".
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_size,
        nnz: int = 0,
        bias: bool = True,
        activation: str | None = "silu_mul",
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        if activation not in (None, "silu_mul"):  # None: BlockSparseLinear.from_bsr / from_dense's default
            raise ValueError(f"FusedGateUpLinear's activation is 'silu_mul', not {activation!r}")
        super().__init__(in_features, out_features, block_size, nnz, bias, None, backend, device, dtype)
        bh = self.block_size[0]
        if self.out_features % (2 * bh):
            raise ValueError(
                f"a [gate; up] weight needs halves of whole block rows, got {out_features} rows, block {bh}"
            )
        self._activation = "silu_mul"

    @property
    def activation(self) -> str:
        return "silu_mul"

    @activation.setter
    def activation(self, value: str | None) -> None:
        if value != "silu_mul":
            raise ValueError(f"FusedGateUpLinear's activation is 'silu_mul', not {value!r}")

    @classmethod
    def from_gate_up(cls, gate: BlockSparseLinear, up: BlockSparseLinear) -> FusedGateUpLinear:
        """From the gate and up BlockSparseLinear of a gated MLP (same shape, block size, dtype, device)."""
        if gate.shape != up.shape or gate.activation is not None or up.activation is not None:
            raise ValueError("gate and up must be BlockSparseLinear of one shape without activation")
        values, crow, col, bias = concat_rows([gate, up])
        n = values.shape[0]
        mod = cls(gate.in_features, 2 * gate.out_features, gate.block_size, n, bias is not None, "silu_mul",
                  gate.backend, values.device, values.dtype)  # fmt: skip
        mod.values, mod.crow_indices, mod.col_indices, mod.bias = values, crow, col, bias
        mod.tuning_target, mod.fp32_precision = gate.tuning_target, gate.fp32_precision
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        # the op applies silu * up itself; a dense choice (F.linear) and the differentiable path leave [gate | up]
        return _runners.activate(y, "silu_mul") if y.shape[-1] == self.out_features else y


class FusedGatedMLP(nn.Module):
    """down_proj(gate_up_proj(x)): a SiLU-gated MLP with its gate and up projections fused."""

    def __init__(self, gate_up_proj: FusedGateUpLinear, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class FusedQKV(nn.Module):
    """One BlockSparseLinear over the rows of q, k and v, served to three QKVSlice modules (module docstring)."""

    def __init__(self, proj: BlockSparseLinear, sizes: tuple[int, int, int]) -> None:
        super().__init__()
        self.proj = proj
        self.sizes = tuple(int(s) for s in sizes)
        q, k, v = self.sizes
        self.bounds = ((0, q), (q, q + k), (q + k, q + k + v))
        # (input, product) of the last q call, read and written whole: a thread switch cannot pair one call's input
        # with another's product (threads sharing an eager model only ever compute again)
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_qkv(cls, q: BlockSparseLinear, k: BlockSparseLinear, v: BlockSparseLinear) -> FusedQKV:
        values, crow, col, bias = concat_rows([q, k, v])
        shape = (q.out_features + k.out_features + v.out_features, q.in_features)
        proj = BlockSparseLinear.from_bsr(values, crow, col, shape, bias, backend=q.backend)
        proj.tuning_target, proj.fp32_precision = q.tuning_target, q.fp32_precision
        return cls(proj, (q.out_features, k.out_features, v.out_features))

    def serve(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Projection `index` (0 q, 1 k, 2 v) of x: a view of the fused product."""
        kept = self._kept
        if index == 0 or kept is None or kept[0] is not x:
            kept = (x, self.proj(x))
            self._kept = kept
        if index == 2:
            self._kept = None
        a, b = self.bounds[index]
        return kept[1][..., a:b]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, k, v) of x, from one product."""
        out = self.proj(x)
        return tuple(out[..., a:b] for a, b in self.bounds)  # type: ignore[return-value]


class QKVSlice(nn.Module):
    """q_proj, k_proj or v_proj of a fused attention: its slice of the FusedQKV product."""

    def __init__(self, fused: FusedQKV, index: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the weights are the attention's `qkv_proj`, listed once
        self.index = int(index)
        self.in_features = fused.proj.in_features
        self.out_features = fused.sizes[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.serve(self.index, x)

    def extra_repr(self) -> str:
        return f"{'qkv'[self.index]} of qkv_proj, in_features={self.in_features}, out_features={self.out_features}"


def _plain(m) -> bool:
    return type(m) is BlockSparseLinear and m.activation is None


def _geometry(m: BlockSparseLinear) -> tuple:
    return (m.block_size, m.in_features, m.values.dtype, m.values.device, m.backend)


def fusable_qkv(attn: nn.Module) -> bool:
    """A self-attention module whose q_proj / k_proj / v_proj are BlockSparseLinear whose rows can stack."""
    parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(_plain(p) for p in parts) or getattr(attn, "is_cross_attention", False):
        return False
    q, k, v = parts
    same = all(_geometry(p) == _geometry(q) for p in (k, v))
    return same and q.out_features % q.block_size[0] == 0 and k.out_features % q.block_size[0] == 0


def _is_silu(act) -> bool:
    if not isinstance(act, nn.Module):
        return False
    probe = torch.linspace(-4.0, 4.0, 9)
    try:
        with torch.no_grad():
            return bool(torch.allclose(act(probe), F.silu(probe)))
    except Exception:  # an activation that wants another input: not SiLU as far as we can tell
        return False


def fusable_gate_up(mlp: nn.Module) -> bool:
    """A SiLU-gated MLP (a module named *MLP with gate_proj, up_proj, down_proj, act_fn = SiLU) whose gate and up
    are BlockSparseLinear of one geometry and an intermediate size the fused kernels can pair."""
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    if not type(mlp).__name__.endswith("MLP") or not hasattr(mlp, "down_proj") or not (_plain(gate) and _plain(up)):
        return False
    if _geometry(gate) != _geometry(up) or gate.shape != up.shape:
        return False
    bh = gate.block_size[0]
    return gate.out_features % (bh * (GLU_GROUP if bh <= 16 else 1)) == 0 and _is_silu(getattr(mlp, "act_fn", None))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def fuse_projections(model: nn.Module, qkv: bool = True, gate_up: bool = True) -> dict[str, int]:
    """Fuse, in place, the q/k/v of every attention module and the gate/up of every SiLU-gated MLP whose projections
    are BlockSparseLinear and can stack (fusable_qkv, fusable_gate_up); returns {"qkv": n, "gate_up": n}. Modules
    that do not qualify are left as they are. Outputs equal the unfused model's up to rounding (silu * up is
    computed in fp32 before one rounding, instead of after three)."""
    counts = {"qkv": 0, "gate_up": 0}
    for name, module in list(model.named_modules()):
        if qkv and fusable_qkv(module):
            fused = FusedQKV.from_qkv(module.q_proj, module.k_proj, module.v_proj)
            module.qkv_proj = fused
            module.q_proj, module.k_proj, module.v_proj = (QKVSlice(fused, i) for i in range(3))
            counts["qkv"] += 1
        elif gate_up and fusable_gate_up(module):
            gate_up_proj = FusedGateUpLinear.from_gate_up(module.gate_proj, module.up_proj)
            _replace(model, name, FusedGatedMLP(gate_up_proj, module.down_proj))
            counts["gate_up"] += 1
    return counts
