"""Per-layer choice of the stored layout: BSR where it can run and (layout=auto) where it is never slower than dense
at the batch sizes and in the runtime it will be served with, and faster at one of them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from superblock.devices import dtype_name
from superblock.export.convert import MHA_IN, MHA_OUT, Layer, linear_weight, owner, unsupported_reason
from superblock.export.serving import TUNING_TARGETS, SampleInput, as_sample
from superblock.kernels import BlockSparseLinear, tuning
from superblock.progress import progress_iter
from superblock.timing import compare_latency, time_graph

MODES = ("auto", "bsr", "dense")
# "not slower": BSR within this fraction of dense at a batch size (timing noise; the rule is tuning's); see _verdict
LAYOUT_TOLERANCE = tuning.TIE_TOLERANCE


@torch.no_grad()
def tokens_per_image(model: nn.Module, names: list[str], image_shape: SampleInput | tuple[int, ...]) -> dict[str, int]:
    """Rows each masked weight multiplies per sample (ViT: patches + class token; LM: the sample's tokens), from one
    forward of 1 sample (`image_shape`: an image shape or a SampleInput, e.g. token ids)."""
    seen: dict[str, int] = {}
    hooks = []
    for name in names:
        module_name, kind = owner(model, name)
        module = model.get_submodule(module_name) if module_name else model
        width = module.embed_dim if kind in (MHA_IN, MHA_OUT) else linear_weight(module).shape[1]

        def record(_mod, args, kwargs, name=name, width=width):
            x = args[0] if args else next(iter(kwargs.values()))
            seen[name] = x.numel() // width

        hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        param = next(model.parameters())
        model(as_sample(image_shape).make(1, param.device, param.dtype, fill="zeros"))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _time(fns: dict, inputs: list, device: torch.device, graph: bool, repeats: int) -> dict[str, float]:
    """Median ms per call of each function: CUDA-graph replays (GPU time) for graph, else interleaved eager calls."""
    if graph:
        x = inputs[0]
        return {
            name: time_graph(lambda f=fn: f(x), budget_ms=2.0, repeats=max(3, repeats // 3)) for name, fn in fns.items()
        }
    # bursts: a served model calls its layers back to back, so a host-bound layer costs the larger of its host and
    # GPU time, not the sum a lone call after an idle GPU shows
    stats = compare_latency(fns, inputs, device, warmup=2, repeats=repeats, rounds=2, burst=8)
    return {name: stats[name]["median_ms"] for name in fns}


@torch.no_grad()
def _measure(weight, bias, block, tokens: dict[int, int], device, dtype, backend, runtime, repeats) -> dict:
    """BSR (the BlockSparseLinear a model is served with, tuned for the runtime) vs F.linear, per batch size."""
    w = weight.detach().to(device, dtype)
    b = None if bias is None else bias.detach().to(device, dtype)
    sparse = BlockSparseLinear.from_dense(w, b, block, backend=backend)
    graph = TUNING_TARGETS[runtime] == "graph" and device.type == "cuda"
    sparse.tuning_target = "graph" if graph else "eager"
    rows = []
    for batch, n in sorted(tokens.items()):
        inputs = [torch.randn(n, w.shape[1], device=device, dtype=dtype) for _ in range(2)]
        sparse(inputs[0])  # the layer's choice for this many tokens (measured here for backend=auto on CUDA)
        kernel = sparse.choices()[tuning.token_bucket(n)].backend
        ms = _time({"dense": lambda x: F.linear(x, w, b), "bsr": sparse}, inputs, device, graph, repeats)
        rows.append(
            {
                "batch": batch,
                "tokens": n,
                "dense_ms": round(ms["dense"], 4),
                "bsr_ms": round(ms["bsr"], 4),
                "kernel": kernel,
            }
        )
    return {"runtime": runtime, "timed": "graph" if graph else "eager", "per_batch": rows}


def _verdict(timing: dict, tolerance: float, where: str) -> str | None:
    """None when BSR is kept: never slower than dense beyond `tolerance` at any batch size (a batch size where the
    layer runs the dense kernel itself is a tie) and faster at one at least; else the reason for dense."""
    rows = timing["per_batch"]
    for r in rows:
        if r["kernel"] != "dense" and not tuning.not_slower_than_dense(r["bsr_ms"], r["dense_ms"], tolerance):
            return (
                f"BSR ({r['bsr_ms']:.3f} ms) slower than dense ({r['dense_ms']:.3f} ms) at batch {r['batch']} "
                f"({r['tokens']} tokens), {where}"
            )
    if not any(r["kernel"] != "dense" and r["bsr_ms"] < r["dense_ms"] for r in rows):
        batches = ", ".join(str(r["batch"]) for r in rows)
        return f"BSR not faster than dense at any of batch sizes {batches}, {where}"
    return None


def _weight_and_bias(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    module_name, kind = owner(model, name)
    module = model.get_submodule(module_name)
    if kind == MHA_IN:
        return module.in_proj_weight, module.in_proj_bias
    if kind == MHA_OUT:
        return module.out_proj.weight, module.out_proj.bias
    return linear_weight(module), module.bias


def _keeps_every_tile(layer: Layer) -> str | None:
    """The reason a weight whose mask keeps every tile (a level-0 override: SmolLM2's first layers) is stored dense
    whatever the mode: a block-sparse kernel has nothing to skip there and only adds its indices."""
    if layer.nnz_blocks == layer.total_blocks:
        return "keeps every tile: nothing for a block-sparse kernel to skip"
    return None


def assign_layouts(model: nn.Module, layers: list[Layer], mode: str) -> None:
    """The layouts known without measuring: dense where no block-sparse module can hold a weight or its mask keeps
    every tile (with the reason) or where layout=dense; BSR elsewhere (layout=auto then measures those)."""
    if mode not in MODES:
        raise ValueError(f"layout={mode!r} is not one of {list(MODES)}")
    for layer in layers:
        layer.reason = unsupported_reason(model, layer.name) or _keeps_every_tile(layer)
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
    batch_sizes: Sequence[int],
    image_shape: SampleInput | tuple[int, ...],
    backend: str = "auto",
    runtime: str = "eager",
    repeats: int = 10,
    tolerance: float = LAYOUT_TOLERANCE,
) -> None:
    """Set `layout` / `reason` / `timing` of every layer of a folded model (in place).

    bsr: every layer a block-sparse module can hold and whose mask drops a tile; dense: none; auto: such a layer
    stays BSR only if, on `device` in `dtype`, its block-sparse module (tuned for `runtime`) is not slower than the
    dense product at any of `batch_sizes` and faster at one of them at least. Timed as the runtime runs: GPU time
    (CUDA-graph replays) for cudagraph on CUDA, eager calls otherwise (compile too: its custom-op and matmul launches
    are eager ones).
    `timing` keeps the per-batch numbers. `image_shape`: one input's shape, or a SampleInput (token ids for a
    language model: a batch of b sequences is b x their length rows for every layer).
    """
    assign_layouts(model, layers, mode)
    measured = [layer for layer in layers if layer.layout == "bsr" and mode == "auto"]
    if not measured:
        return
    tokens = tokens_per_image(model, [layer.name for layer in measured], image_shape)
    where = f"{dtype_name(dtype)}, {device.type}, runtime {runtime}"
    for layer in progress_iter(measured, len(measured), "layout", "layer", enabled=True):
        if layer.name not in tokens:
            layer.layout, layer.reason = "dense", "not reached by a forward pass, so not measured"
            continue
        per_batch = {b: tokens[layer.name] * b for b in batch_sizes}
        weight, bias = _weight_and_bias(model, layer.name)
        layer.timing = _measure(weight, bias, layer.block, per_batch, device, dtype, backend, runtime, repeats)
        layer.reason = _verdict(layer.timing, tolerance, where)
        if layer.reason:
            layer.layout = "dense"
