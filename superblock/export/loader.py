"""load_sparse: an export directory -> a ready-to-run inference model with block-sparse weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from superblock.export.convert import Layer, install_bsr, retie, unpack_tensors
from superblock.export.format import WEIGHTS, ExportError, read_manifest, verify_file
from superblock.export.runtime import ensure_runnable, parse_dtype, resolve_device
from superblock.export.serving import check_runtime, compile_settings, make_runtime, sample_input
from superblock.kernels import BACKENDS, fuse_linear_gelu


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{file} cannot be read as safetensors ({err}): export the checkpoint again") from None


def _has_unsaved_buffers(model: nn.Module) -> bool:
    return any(m._non_persistent_buffers_set for m in model.modules())


def build_from_spec(model_spec: dict) -> nn.Module:
    """The plain model described by a manifest's model_spec, with uninitialised weights (all of them are loaded
    next). Built on the meta device to skip the random init; a model with buffers that no state dict carries is
    built normally instead, since those would stay uninitialised."""
    from superblock.models import build_model

    spec = {**model_spec, "pretrained": None}  # weights come from the export, never from a file or the hub
    try:
        with torch.device("meta"):
            model = build_model(**spec)
    except (RuntimeError, NotImplementedError, ValueError):
        return build_model(**spec)
    if _has_unsaved_buffers(model):
        return build_model(**spec)
    model = model.to_empty(device="cpu")
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # to_empty gives each end of a tied pair its own tensor: tie them again (transformers)
    return model


def load_dense_into(
    model: nn.Module, state: dict[str, torch.Tensor], expected_missing: set[str], tied: dict[str, str] | None = None
) -> None:
    """Load `state` into `model`; every model key must be in it except `expected_missing`, and nothing extra.
    `tied`: the manifest's {key: key it is tied to}, copies the export left out."""
    result = model.load_state_dict(retie(state, tied or {}), strict=False)
    missing = set(result.missing_keys) - expected_missing
    if missing or result.unexpected_keys:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(result.unexpected_keys)[:3]}"
        raise ExportError(f"the stored weights do not fit the model in the manifest ({detail})")


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
    verify: bool = True,
) -> nn.Module:
    """Rebuild an exported model for inference: BSR layers as BlockSparseLinear / block-sparse attention.

    `dtype` defaults to the exported one ("fp32" | "bf16" | "fp16" or a torch dtype); `backend` is the kernel of
    every block-sparse layer ("auto" | "triton" | "torch" | "dense"). With `fuse_gelu`, Linear -> GELU pairs run as
    one kernel. `verify` checks the files against the manifest's sha256 first (an edited export is refused).

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
    path = Path(path)
    manifest = read_manifest(path)
    device = resolve_device(device)
    dtype = parse_dtype(dtype if dtype is not None else manifest["dtype"])
    ensure_runnable(dtype, device)
    file = verify_file(path, manifest, "weights") if verify else path / WEIGHTS
    layers = manifest_layers(manifest)
    dense, bsr = unpack_tensors(_load_safetensors(file), layers)
    model = build_from_spec(manifest["model_spec"])
    load_dense_into(model, dense, expected_missing=set(bsr), tied=manifest.get("tied"))
    install_bsr(model, bsr, backend=backend)
    if fuse_gelu:
        fuse_linear_gelu(model)
    model = model.to(device=device, dtype=dtype).eval()
    if sizes is None and runtime != "eager":
        sizes = (manifest.get("layout_policy") or {}).get("batch_sizes") or None
    if runtime == "eager" and sizes is None:
        return model
    return make_runtime(
        model, runtime, batch_sizes=sizes, sample_shape=sample_input(model, manifest["model_spec"]),
        compile_options=compile_options,
    )


def load_folded(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
    """The plain model of an export with its folded dense weights (dense_state_dict.safetensors)."""
    path = Path(path)
    manifest = read_manifest(path)
    device, dtype = resolve_device(device), parse_dtype(dtype if dtype is not None else manifest["dtype"])
    ensure_runnable(dtype, device)
    state = _load_safetensors(verify_file(path, manifest, "dense"))
    model = build_from_spec(manifest["model_spec"])
    load_dense_into(model, state, expected_missing=set(), tied=manifest.get("tied"))
    return model.to(device=device, dtype=dtype).eval()

