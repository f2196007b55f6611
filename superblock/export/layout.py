"""Per-layer choice of the stored layout: BSR where it can run and (for layout=auto) where it is measured faster."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from superblock.export.convert import MHA_IN, MHA_OUT, Layer, bsr_of, owner, unsupported_reason
from superblock.export.runtime import dtype_name
from superblock.export.timing import compare_latency
from superblock.kernels import bsr_linear

MODES = ("auto", "bsr", "dense")


@torch.no_grad()
def tokens_per_image(model: nn.Module, names: list[str], image_shape: tuple[int, ...]) -> dict[str, int]:
    """Rows each masked weight multiplies per image (ViT: patches + class token), from one forward of 1 image."""
    seen: dict[str, int] = {}
    hooks = []
    for name in names:
        module_name, kind = owner(model, name)
        module = model.get_submodule(module_name) if module_name else model
        width = module.embed_dim if kind in (MHA_IN, MHA_OUT) else module.in_features

        def record(_mod, args, kwargs, name=name, width=width):
            x = args[0] if args else next(iter(kwargs.values()))
            seen[name] = x.numel() // width

        hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        param = next(model.parameters())
        model(torch.zeros(1, *image_shape, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _measure(weight, bias, block, tokens, device, dtype, backend, repeats) -> dict:
    w = weight.detach().to(device, dtype)
    b = None if bias is None else bias.detach().to(device, dtype)
    values, crow, col = bsr_of(w, block)
    inputs = [torch.randn(tokens, w.shape[1], device=device, dtype=dtype) for _ in range(2)]
    fns = {
        "dense": lambda x: F.linear(x, w, b),
        "bsr": lambda x: bsr_linear(x, values, crow, col, tuple(w.shape), b, backend=backend),
    }
    stats = compare_latency(fns, inputs, device, warmup=2, repeats=repeats, rounds=2)
    return {"dense_ms": round(stats["dense"]["median_ms"], 4), "bsr_ms": round(stats["bsr"]["median_ms"], 4)}


def _weight_and_bias(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    module_name, kind = owner(model, name)
    module = model.get_submodule(module_name)
    if kind == MHA_IN:
        return module.in_proj_weight, module.in_proj_bias
    if kind == MHA_OUT:
        return module.out_proj.weight, module.out_proj.bias
    return module.weight, module.bias


def assign_layouts(model: nn.Module, layers: list[Layer], mode: str) -> None:
    """The layouts known without measuring: dense where no block-sparse module can hold a weight (with the reason)
    or where layout=dense; BSR elsewhere (layout=auto then measures those)."""
    if mode not in MODES:
        raise ValueError(f"layout={mode!r} is not one of {list(MODES)}")
    for layer in layers:
        layer.reason = unsupported_reason(model, layer.name)
        layer.layout = "dense" if layer.reason or mode == "dense" else "bsr"
        if mode == "dense":
            layer.reason = "layout=dense was asked for"


def choose_layouts(
    model: nn.Module,
    layers: list[Layer],
    mode: str = "auto",
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    image_shape: tuple[int, ...],
    backend: str = "auto",
    repeats: int = 10,
) -> None:
    """Set `layout` / `reason` / `timing` of every layer of a folded model (in place).

    bsr: every layer a block-sparse module can hold; dense: none; auto: those whose BSR product is faster than
    the dense one on `device` at `batch_size` images in `dtype` (a short measurement per layer).
    """
    assign_layouts(model, layers, mode)
    measured = [layer for layer in layers if layer.layout == "bsr" and mode == "auto"]
    if not measured:
        return
    tokens = tokens_per_image(model, [layer.name for layer in measured], image_shape)
    for layer in measured:
        if layer.name not in tokens:
            layer.layout, layer.reason = "dense", "not reached by a forward pass, so not measured"
            continue
        rows = tokens[layer.name] * batch_size
        weight, bias = _weight_and_bias(model, layer.name)
        layer.timing = {"tokens": rows, **_measure(weight, bias, layer.block, rows, device, dtype, backend, repeats)}
        if layer.timing["bsr_ms"] >= layer.timing["dense_ms"]:
            layer.layout = "dense"
            layer.reason = (
                f"BSR ({layer.timing['bsr_ms']:.3f} ms) not faster than dense ({layer.timing['dense_ms']:.3f} ms) "
                f"at {rows} tokens ({batch_size} images), {dtype_name(dtype)}, {device.type}"
            )
