"""In-memory conversion between a folded dense model and its block-sparse form.

The same three steps serve `export` (pack, then write), `load_sparse` (read, then install) and `evaluate mode=bsr`
on a training run (pack, then install, no files): `masked_layers` says which weights carry block masks,
`pack_tensors` turns a folded model into a flat {key: tensor} dict with BSR triplets for the chosen layers, and
`install_bsr` swaps the owning modules for block-sparse ones (BlockSparseLinear; for torchvision's
nn.MultiheadAttention, which reads its weights directly, the whole module is replaced).

A transformers `Conv1D` (GPT-2) stores its weight as (in, out) and is masked in that layout; its Layer describes the
(out, in) weight that is stored as BSR (`transposed`, shape and block swapped), and it becomes a BlockSparseLinear.
Weights tied to each other (GPT-2's lm_head and token embedding) are stored once (safetensors refuses shared
tensors): `tied_keys` names the copies, `untie`/`retie` drop and restore them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from superblock.artifacts.format import BSR_SUFFIXES, LAYOUTS, ExportError, bsr_keys
from superblock.kernels import BlockSparseLinear, BlockSparseMultiheadAttention, check_bsr, dense_to_bsr
from superblock.sparsity import iter_block_masks
from superblock.sparsity.targets import is_conv1d

Triplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
MHA_IN, MHA_OUT, LINEAR = "mha.in_proj", "mha.out_proj", "linear"


@dataclass
class Layer:
    """One masked weight: its geometry, the stored layout and, when dense, why."""

    name: str
    shape: tuple[int, int]
    block: tuple[int, int]
    nnz_blocks: int = 0
    layout: str = "bsr"
    reason: str | None = None
    timing: dict = field(default_factory=dict)
    transposed: bool = False  # the model stores the weight as (in, out) (transformers Conv1D): shape is (out, in)

    @property
    def total_blocks(self) -> int:
        return math.ceil(self.shape[0] / self.block[0]) * math.ceil(self.shape[1] / self.block[1])

    @property
    def density(self) -> float:
        return self.nnz_blocks / self.total_blocks

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(shape=list(self.shape), block=list(self.block), total_blocks=self.total_blocks)
        d["density"] = round(self.density, 6)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Layer:
        try:
            layer = cls(d["name"], tuple(d["shape"]), tuple(d["block"]), int(d["nnz_blocks"]), d["layout"])
        except (KeyError, TypeError, ValueError) as err:
            raise ExportError(f"manifest layer entry {d!r} is malformed ({err})") from None
        if layer.layout not in LAYOUTS:
            raise ExportError(f"manifest layer {layer.name} has layout {layer.layout!r}, not one of {LAYOUTS}")
        layer.reason, layer.timing = d.get("reason"), d.get("timing") or {}
        layer.transposed = bool(d.get("transposed", False))
        return layer

    def stored(self, weight: torch.Tensor) -> torch.Tensor:
        """The (out, in) weight stored as BSR, from the weight as the model holds it."""
        return weight.t() if self.transposed else weight


def masked_layers(model: nn.Module) -> list[Layer]:
    """A Layer for every weight of `model` that carries a block mask, in model order (Conv1D: transposed), with the
    tiles its mask keeps."""
    layers = []
    for name, module, _, m in iter_block_masks(model):
        shape, block, kept = tuple(m.weight_shape), tuple(m.block), int(m.mask.count_nonzero())  # packing recounts
        if is_conv1d(module):
            layers.append(Layer(name, shape[::-1], block[::-1], kept, transposed=True))
        else:
            layers.append(Layer(name, shape, block, kept))
    return layers


def tied_keys(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{key: earlier key holding the same tensor} of a state dict (tied weights, e.g. lm_head and embeddings)."""
    seen: dict[tuple, str] = {}
    tied = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
        else:
            seen.setdefault(ident, key)
    return tied


def _split(name: str) -> tuple[str, str]:
    module_name, _, param = name.rpartition(".")
    return module_name, param


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def owner(model: nn.Module, name: str) -> tuple[str, str | None]:
    """(module name to replace, kind) of a weight; kind is None when no block-sparse module can hold it."""
    module_name, param = _split(name)
    module = _module(model, module_name)
    parent_name = _split(module_name)[0] if module_name else ""
    if isinstance(module, nn.MultiheadAttention) and param == "in_proj_weight":
        return module_name, MHA_IN
    if param == "weight" and isinstance(module, nn.Linear):
        if module_name and isinstance(_module(model, parent_name), nn.MultiheadAttention):
            return parent_name, MHA_OUT
        return module_name, LINEAR
    if param == "weight" and is_conv1d(module):
        return module_name, LINEAR
    return module_name, None


def unsupported_reason(model: nn.Module, name: str) -> str | None:
    """Why a masked weight must stay dense, or None when it can be stored and run as BSR."""
    module_name, kind = owner(model, name)
    if kind is None:
        return "not an nn.Linear, Conv1D or nn.MultiheadAttention projection weight: no block-sparse module for it"
    if kind in (MHA_IN, MHA_OUT):
        mha = _module(model, module_name)
        if mha.in_proj_weight is None:
            return "nn.MultiheadAttention with separate q/k/v weights (kdim/vdim != embed_dim) is not supported"
        if mha.bias_k is not None or mha.add_zero_attn:
            return "nn.MultiheadAttention with bias_k/bias_v or add_zero_attn is not supported"
    return None


def bsr_of(weight: torch.Tensor, block: tuple[int, int]) -> Triplet:
    """(values, crow_indices, col_indices) of a folded weight; edge tiles are zero-padded (see dense_to_bsr)."""
    return dense_to_bsr(weight, block)


def pack_tensors(
    model: nn.Module, layers: list[Layer], dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Triplet]]:
    """Flat tensors of a folded model for safetensors: BSR triplets for `layout == "bsr"` layers, else dense.

    Floating tensors are cast to `dtype` first (so BSR values are exactly the cast dense values). Tied copies
    (tied_keys) are left out. Fills in each layer's `nnz_blocks`. Returns (tensors, {weight name: triplet} of the
    BSR layers).
    """
    state = model.state_dict()
    tied = tied_keys(state)
    tensors = {}
    for key, t in state.items():
        if key in tied:
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.contiguous()
    bsr = {}
    for layer in layers:
        if layer.name not in tensors:
            raise ExportError(f"{layer.name} is not in the folded model's state dict (was the model folded?)")
        triplet = bsr_of(layer.stored(tensors[layer.name]), layer.block)
        layer.nnz_blocks = int(triplet[0].shape[0])
        if layer.layout == "bsr":
            del tensors[layer.name]
            tensors.update(zip(bsr_keys(layer.name), triplet, strict=True))
            bsr[layer.name] = triplet
    return tensors, bsr


def unpack_tensors(
    tensors: dict[str, torch.Tensor], layers: list[Layer]
) -> tuple[dict[str, torch.Tensor], dict[str, Triplet]]:
    """Inverse of pack_tensors: (dense state dict without the BSR weights, {weight name: triplet})."""
    dense = dict(tensors)
    bsr = {}
    for layer in layers:
        if layer.layout != "bsr":
            continue
        keys = bsr_keys(layer.name)
        missing = [k for k in keys if k not in dense]
        if missing:
            raise ExportError(f"weights file lacks {missing} that the manifest lists for {layer.name}")
        bsr[layer.name] = tuple(dense.pop(k) for k in keys)  # type: ignore[assignment]
        _check_triplet(layer, bsr[layer.name])
    return dense, bsr


def _check_triplet(layer: Layer, triplet: Triplet) -> None:
    """Stored BSR tensors a kernel can follow without reading outside the weight, and that match the manifest's
    shape, block and count. A corrupt file that passed as safetensors stops here."""
    values, _, _ = triplet
    matches = values.dim() == 3 and tuple(values.shape[1:]) == layer.block and values.shape[0] == layer.nnz_blocks
    try:
        if not matches:
            raise ValueError(f"shapes {[tuple(t.shape) for t in triplet]}")
        check_bsr(*triplet, layer.shape, contents=True)
    except ValueError as err:
        raise ExportError(
            f"stored BSR tensors of {layer.name} ({', '.join(BSR_SUFFIXES)}) do not fit the manifest (shape "
            f"{layer.shape}, block {layer.block}, {layer.nnz_blocks} blocks): {err}; export it again"
        ) from None


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _sparse_linear(triplet: Triplet, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> nn.Module:
    """A BlockSparseLinear for an (out, in) `weight` (only its shape is read: the values are the triplet's)."""
    return BlockSparseLinear.from_bsr(*triplet, tuple(weight.shape), bias=bias, backend=backend)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or a transformers Conv1D (a transposed view of its (in, out) one)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _sparse_attention(mha: nn.MultiheadAttention, in_bsr: Triplet | None, out_bsr: Triplet | None, backend: str):
    w_in, b_in = mha.in_proj_weight.detach(), mha.in_proj_bias
    b_in = None if b_in is None else b_in.detach()
    in_proj = _sparse_linear(in_bsr, w_in, b_in, backend) if in_bsr else _dense_linear(w_in, b_in)
    out = mha.out_proj
    out_bias = None if out.bias is None else out.bias.detach()
    if out_bsr:
        out_proj = _sparse_linear(out_bsr, out.weight, out_bias, backend)
    else:
        out_proj = _dense_linear(out.weight.detach(), out_bias)
    module = BlockSparseMultiheadAttention(in_proj, out_proj, mha.num_heads, mha.batch_first, mha.dropout)
    module.embed_dim = mha.embed_dim
    return module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, child = _split(name)
    setattr(_module(model, parent_name), child, new)


def _group_by_owner(model: nn.Module, bsr: dict[str, Triplet]) -> Iterator[tuple[str, str, dict[str, Triplet]]]:
    groups: dict[str, tuple[str, dict[str, Triplet]]] = {}
    for name, triplet in bsr.items():
        module_name, kind = owner(model, name)
        if kind is None:
            raise ExportError(f"{name}: {unsupported_reason(model, name)}")
        family = "mha" if kind != LINEAR else LINEAR
        groups.setdefault(module_name, (family, {}))[1][kind] = triplet
    for module_name, (family, parts) in groups.items():
        yield module_name, family, parts


@torch.no_grad()
def install_bsr(model: nn.Module, bsr: dict[str, Triplet], backend: str = "auto") -> nn.Module:
    """Swap the modules owning the weights in `bsr` for block-sparse ones (in place); biases and dense parts are
    taken from the model, so load everything else into it first. Returns the model."""
    for module_name, family, parts in _group_by_owner(model, bsr):
        module = _module(model, module_name)
        if family == LINEAR:
            bias = None if module.bias is None else module.bias.detach()
            new = _sparse_linear(parts[LINEAR], linear_weight(module), bias, backend)
        else:
            new = _sparse_attention(module, parts.get(MHA_IN), parts.get(MHA_OUT), backend)
        _replace(model, module_name, new)
    return model
