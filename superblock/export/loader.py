"""load_sparse: an export directory -> a ready-to-run inference model with block-sparse weights."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from superblock.artifacts.folded import load_dense_into, read_folded, read_weights
from superblock.artifacts.format import ExportError, read_manifest
from superblock.artifacts.spec import build_from_spec
from superblock.devices import ensure_runnable, parse_dtype, resolve_device
from superblock.export.convert import Layer, install_bsr, unpack_tensors
from superblock.export.serving import check_runtime, compile_settings, make_runtime, sample_input
from superblock.kernels import BACKENDS, fuse_linear_gelu, projection_fusion

log = logging.getLogger(__name__)


def manifest_layers(manifest: dict) -> list[Layer]:
    try:
        return [Layer.from_dict(d) for d in manifest["layers"]]
    except (KeyError, TypeError) as err:
        raise ExportError(f"manifest has no usable 'layers' list ({err})") from None


def load_sparse(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    backend: str = "auto",
    *,
    runtime: str = "eager",
    batch_sizes: Sequence[int] | int | None = None,
    compile_options: dict | bool | None = None,
    fuse_gelu: bool = True,
    fuse_projections: bool = True,
    verify: bool = True,
) -> nn.Module:
    """Rebuild an exported model for inference: BSR layers as BlockSparseLinear / block-sparse attention.

    `dtype` defaults to the exported one ("fp32" | "bf16" | "fp16" or a torch dtype); `backend` is the kernel of
    every block-sparse layer ("auto" | "triton" | "torch" | "dense"). With `fuse_gelu`, Linear -> GELU pairs run as
    one kernel; with `fuse_projections`, a transformers attention's block-sparse q/k/v run as one product and a
    SiLU-gated MLP's gate/up as one with silu(gate) * up in its epilogue (Llama: 4 sparse products per layer instead
    of 7; superblock.kernels.projection_fusion; GPT-2's c_attn is one matrix already). `verify` checks the files
    against the manifest's sha256 first (an edited export is refused).

    `runtime` ("eager" | "compile" | "cudagraph") and `batch_sizes` say how it is served (see
    superblock.export.serving.make_runtime): eager returns the model (warmed up, i.e. tuned, at `batch_sizes` when
    given); compile / cudagraph return a ServingModel that compiled / captured one graph per batch size (default:
    the export's batch sizes, else 1, 8, 32, 256) and pads every batch up to the next of them. cudagraph on a CPU
    device falls back to eager with a RuntimeWarning. `compile_options` go to torch.compile (cudagraph compiles
    before capturing unless compile_options=False).
    A transformers model (an `hf:` model_spec) comes back as the transformers model itself, its projections
    (GPT-2's Conv1D included) BlockSparseLinear, so `generate()` and its KV caches work; its runtimes feed token ids.
    Raises ExportError for a missing, edited or mismatched export, ValueError for bad options. Eval mode.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {list(BACKENDS)}")
    sizes = check_runtime(runtime, batch_sizes)
    compile_settings(runtime, compile_options)  # bad options fail before anything is loaded
    path, start = Path(path), time.perf_counter()
    log.info("load_sparse: loading %s (runtime=%s)", path, runtime)
    manifest = read_manifest(path)
    device = resolve_device(device)
    dtype = parse_dtype(dtype if dtype is not None else manifest["dtype"])
    ensure_runnable(dtype, device)
    model = _build(path, manifest, backend, fuse_gelu, verify, fuse_projections).to(device=device, dtype=dtype).eval()
    _log_built(manifest, device, start)
    if sizes is None and runtime != "eager":
        sizes = (manifest.get("layout_policy") or {}).get("batch_sizes") or None
    if runtime == "eager" and sizes is None:
        return model
    served = make_runtime(
        model,
        runtime,
        batch_sizes=sizes,
        sample_shape=sample_input(model, manifest["model_spec"]),
        compile_options=compile_options,
    )
    log.info("load_sparse: %s ready for runtime=%s in %.1f s", path, runtime, time.perf_counter() - start)
    return served


def _log_built(manifest: dict, device: torch.device, start: float) -> None:
    n_bsr = sum(layer.layout == "bsr" for layer in manifest_layers(manifest))
    elapsed = time.perf_counter() - start
    log.info("load_sparse: built the model (%d block-sparse weights) on %s in %.1f s", n_bsr, device, elapsed)


def _build(path: Path, manifest: dict, backend: str, fuse_gelu: bool, verify: bool, fuse: bool = False) -> nn.Module:
    """The model of an export on the CPU in the export's dtype: dense weights loaded, BSR layers installed."""
    layers = manifest_layers(manifest)
    dense, bsr = unpack_tensors(read_weights(path, manifest, "weights", verify=verify), layers)
    model = build_from_spec(manifest["model_spec"])
    load_dense_into(model, dense, expected_missing=set(bsr), tied=manifest.get("tied"))
    install_bsr(model, bsr, backend=backend)
    if fuse_gelu:
        fuse_linear_gelu(model)
    if fuse:
        counts = projection_fusion.fuse_projections(model)
        if any(counts.values()):
            log.info(
                "load_sparse: fused q/k/v in %d attention modules, gate/up in %d MLPs", counts["qkv"], counts["gate_up"]
            )
    return model


def load_folded(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
    """The plain model of an export with its folded dense weights (dense_state_dict.safetensors)."""
    path = Path(path)
    manifest = read_manifest(path)
    device, dtype = resolve_device(device), parse_dtype(dtype if dtype is not None else manifest["dtype"])
    ensure_runnable(dtype, device)
    return read_folded(path, manifest).to(device=device, dtype=dtype).eval()
