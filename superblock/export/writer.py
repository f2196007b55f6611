"""export_checkpoint: a training run -> an export directory (BSR safetensors + dense state dict + manifest)."""

from __future__ import annotations

import copy
import datetime as _dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from superblock.artifacts.format import (
    DENSE_WEIGHTS,
    FORMAT,
    MANIFEST,
    VERSION,
    WEIGHTS,
    ExportError,
    bsr_keys,
    file_entry,
    seal,
    write_dir_atomically,
    write_json,
)
from superblock.devices import dtype_name, ensure_runnable, parse_dtype, resolve_device
from superblock.export.convert import Layer, masked_layers, pack_tensors, tied_keys
from superblock.export.layout import MODES, choose_layouts
from superblock.export.loader import load_sparse
from superblock.export.serving import (
    DEFAULT_BATCH_SIZES,
    RUNTIMES,
    SampleInput,
    as_sample,
    check_runtime,
    sample_input,
)
from superblock.export.serving import image_shape as serving_image_shape
from superblock.export.source import Source, load_source
from superblock.export.tolerances import TOLERANCES
from superblock.models import model_logits
from superblock.sparsity import fold_masks, get_controller
from superblock.version import __version__

EXPORT_ROOT = Path("exports")


@dataclass
class ExportResult:
    path: Path
    manifest: dict

    def __str__(self) -> str:
        return summary_table(self.manifest, self.path)


def image_shape(model: nn.Module, model_spec: dict) -> tuple[int, int, int]:
    """(channels, height, width) of the model's input: the first conv's channels and the spec's image size."""
    try:
        return serving_image_shape(model, model_spec)
    except ValueError:
        raise ExportError("cannot tell the model's input size: the checkpoint's model_spec has no image_size") from None


def model_sample(model: nn.Module, model_spec: dict) -> SampleInput:
    """The model's sample input (token ids for a language model, else images), or ExportError."""
    try:
        return sample_input(model, model_spec)
    except ValueError:
        raise ExportError("cannot tell the model's input size: the checkpoint's model_spec has no image_size") from None


def fold_copy(model: nn.Module) -> nn.Module:
    """A folded (plain) copy of a masked model; the masked model is left as it is."""
    clone = copy.deepcopy(model)
    return fold_masks(clone) if get_controller(clone) is not None else clone


def make_probe(shape: SampleInput | tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """The fixed equivalence probe: n standard-normal images (the scale of normalized inputs) of `shape`, or n
    sequences of token ids uniform over the vocabulary for a SampleInput of a language model."""
    return as_sample(shape).make(n, generator=torch.Generator().manual_seed(seed))


def _on(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x on `device`, float inputs in `dtype` (token ids stay int64)."""
    return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)


@torch.no_grad()
def logits_error(reference: torch.Tensor, other: torch.Tensor) -> dict:
    """Max abs error, max error relative to the largest reference logit, and top-1 agreement."""
    ref, out = reference.float().cpu(), other.float().cpu()
    max_abs = (out - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-12)
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return {"max_abs_err": max_abs, "max_rel_err": max_abs / scale, "top1_agreement": agree}


def _sizes(layers: list[Layer], tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    elem = torch.tensor([], dtype=dtype).element_size()
    dense = sum(layer.shape[0] * layer.shape[1] * elem for layer in layers)
    sparse = sum(
        sum(tensors[k].numel() * tensors[k].element_size() for k in bsr_keys(layer.name))
        if layer.layout == "bsr"
        else layer.shape[0] * layer.shape[1] * elem
        for layer in layers
    )
    return {"masked_weights_dense_bytes": dense, "masked_weights_stored_bytes": sparse}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": FORMAT})


def _manifest(src: Source, layers: list[Layer], dtype: torch.dtype, policy: dict) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_spec": src.state["model_spec"],
        "dtype": dtype_name(dtype),
        "layers": [layer.to_dict() for layer in layers],
        "layout_policy": policy,
        "source": src.summary(),
        "torch_version": torch.__version__,
        "superblock_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@torch.no_grad()
def _equivalence(masked: nn.Module, folded: nn.Module, export_dir: Path, probe: dict, device, dtype, backend) -> dict:
    """Logits of the export (loaded back from `export_dir`) and of the folded model against the masked model's."""
    x = make_probe(probe["sample"], probe["n"], probe["seed"])
    reference = model_logits(masked.to(device)(_on(x, device)))
    exported = load_sparse(export_dir, device=device, dtype=dtype, backend=backend)
    result = logits_error(reference, model_logits(exported(_on(x, device, dtype))))
    result["folded"] = logits_error(reference, model_logits(folded.to(device)(_on(x, device))))
    if dtype != torch.float32:  # what the dtype alone does: the folded dense model cast to it, no sparse kernels
        cast = copy.deepcopy(folded).to(device, dtype)
        result["dtype_only"] = logits_error(reference, model_logits(cast(_on(x, device, dtype))))
        del cast
    tol = probe["tolerance"]
    result.update(tolerance=tol, passed=result["max_rel_err"] <= tol, probe_batch=probe["n"], probe_seed=probe["seed"])
    result.update(device=str(device), dtype=dtype_name(dtype), backend=backend)
    return result


def _check_args(layout: str, runtime: str, batch_sizes, probe_n: int, tolerance: float | None) -> tuple[int, ...]:
    if layout not in MODES:
        raise ValueError(f"layout={layout!r} is not one of {list(MODES)}")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not one of {list(RUNTIMES)}")
    if probe_n <= 0:
        raise ValueError(f"probe_batch must be > 0, got {probe_n}")
    if tolerance is not None and tolerance <= 0:
        raise ValueError(f"tolerance must be > 0 (max logit error relative to the largest logit), got {tolerance}")
    if isinstance(batch_sizes, int) and not isinstance(batch_sizes, bool) and batch_sizes <= 0:
        raise ValueError(f"batch_size and batch_sizes must be > 0, got {batch_sizes}")
    return check_runtime(runtime, batch_sizes)


def _output_dir(output: str | Path | None, run_name: str, overwrite: bool) -> Path:
    """Where the export goes (default exports/<run name>); an existing one only with overwrite."""
    out = Path(output) if output else EXPORT_ROOT / run_name
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists: pass output=<another dir> or overwrite=true")
    return out


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path | None = None,
    *,
    dtype: str = "fp32",
    layout: str = "auto",
    device: str = "auto",
    batch_sizes: Sequence[int] | int | None = DEFAULT_BATCH_SIZES,
    runtime: str = "eager",
    batch_size: int | None = None,
    backend: str = "auto",
    probe_batch: int = 4,
    probe_seed: int = 0,
    tolerance: float | None = None,
    use_ema: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> ExportResult:
    """Export a training run (run directory or checkpoint file) to a sparse checkpoint directory.

    Folds the masks, stores every masked weight as BSR (layout=bsr), dense (layout=dense) or, for layout=auto, BSR
    only where its block-sparse module is never slower than dense at any of `batch_sizes` (inputs per batch) on
    `device` in `dtype` as served by `runtime` ("eager" | "compile" | "cudagraph") and faster at one of them
    (timings in the manifest; `batch_size` = batch_sizes=[N]). Writes the folded dense state dict beside it and
    checks the exported model's logits (token ids for hf: models) against the masked model's on a fixed probe batch
    (fails beyond the dtype's tolerance). Written to a temporary directory and renamed at the end."""
    sizes = _check_args(layout, runtime, batch_size if batch_size is not None else batch_sizes, probe_batch, tolerance)
    torch_dtype, dev = parse_dtype(dtype), resolve_device(device)
    ensure_runnable(torch_dtype, dev)
    src = load_source(checkpoint)
    output = _output_dir(output, src.name, overwrite)
    masked = src.model(use_ema)
    layers = masked_layers(masked)
    folded = fold_copy(masked)
    sample = model_sample(folded, src.state["model_spec"])
    echo(f"exporting {src.checkpoint} ({len(layers)} masked weights) -> {output} [{dtype_name(torch_dtype)}]")
    choose_layouts(
        folded,
        layers,
        layout,
        device=dev,
        dtype=torch_dtype,
        batch_sizes=sizes,
        image_shape=sample,
        backend=backend,
        runtime=runtime,
    )
    policy = {"mode": layout, "device": str(dev), "batch_sizes": list(sizes), "runtime": runtime, "backend": backend}
    files, manifest = _contents(src, folded, layers, torch_dtype, policy, sample, use_ema)
    tolerance = tolerance or TOLERANCES[dtype_name(torch_dtype)]
    probe = {"sample": sample, "n": probe_batch, "seed": probe_seed, "tolerance": tolerance}

    def check(tmp: Path) -> dict:
        return _equivalence(masked, folded, tmp, probe, dev, torch_dtype, backend)

    final = write_dir_atomically(output, lambda tmp: _fill(tmp, files, manifest, check), overwrite=overwrite)
    result = ExportResult(output, final)
    echo(str(result))
    return result


def _contents(
    src: Source,
    folded: nn.Module,
    layers: list[Layer],
    dtype: torch.dtype,
    policy: dict,
    sample: SampleInput,
    use_ema: bool,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The tensors of both weights files ({file name: tensors}) and the manifest without files and equivalence."""
    tensors, _ = pack_tensors(folded, layers, dtype)
    dense_tensors, _ = pack_tensors(folded, [], dtype)
    manifest = _manifest(src, layers, dtype, policy)
    manifest["sizes"] = _sizes(layers, tensors, dtype)
    manifest["source"]["use_ema"] = use_ema
    manifest["tied"] = tied_keys(folded.state_dict())
    manifest["sample_input"] = {"shape": list(sample.shape), "vocab_size": sample.vocab_size}
    return {WEIGHTS: tensors, DENSE_WEIGHTS: dense_tensors}, manifest


def _fill(tmp: Path, files: dict[str, dict[str, torch.Tensor]], manifest: dict, check: Callable[[Path], dict]) -> dict:
    """Write the weights files and the manifest into `tmp`, load the export back and check it (ExportError when its
    logits differ from the training model's); returns the final, sealed manifest."""
    for name, tensors in files.items():
        _save(tensors, tmp / name)
    manifest["files"] = {"weights": file_entry(tmp / WEIGHTS), "dense": file_entry(tmp / DENSE_WEIGHTS)}
    write_json(tmp / MANIFEST, seal(manifest))
    manifest["equivalence"] = check(tmp)
    if not manifest["equivalence"]["passed"]:
        raise ExportError(_equivalence_failure(manifest["equivalence"]))
    final = seal(json.loads(json.dumps(manifest)))
    write_json(tmp / MANIFEST, final)
    return final


def _equivalence_failure(eq: dict) -> str:
    head = (
        f"exported model does not match the training model: max logit error {eq['max_abs_err']:.3g} "
        f"({eq['max_rel_err']:.3g} of the largest logit, top-1 agreement {eq['top1_agreement']:.3f}) > tolerance "
        f"{eq['tolerance']:.3g} for {eq['dtype']} on {eq['device']} with backend {eq['backend']}; nothing was written."
    )
    alone = eq.get("dtype_only")
    if alone is not None and alone["max_rel_err"] > eq["tolerance"]:
        return (
            f"{head} The dense model itself cast to {eq['dtype']} differs as much ({alone['max_rel_err']:.3g} of the "
            f"largest logit, top-1 agreement {alone['top1_agreement']:.3f}): the loss is {eq['dtype']}'s, not the "
            f"sparse export's. Export in fp32 (dtype=fp32), or accept {eq['dtype']}'s error with "
            f"tolerance={1.25 * max(eq['max_rel_err'], alone['max_rel_err']):.2g} after checking its quality "
            f"(evaluate.py on the export)"
        )
    beside = (
        f" (the dense model cast to {eq['dtype']}: {alone['max_rel_err']:.3g} of the largest logit, top-1 agreement "
        f"{alone['top1_agreement']:.3f})"
        if alone is not None
        else ""
    )
    return f"{head}{beside} Try dtype=fp32 or another backend"


def _probe_kind(manifest: dict) -> str:
    vocab = (manifest.get("sample_input") or {}).get("vocab_size")
    return "images" if vocab is None else f"sequences of {manifest['sample_input']['shape'][0]} tokens"


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def summary_table(manifest: dict, path: Path | None = None) -> str:
    """Per-layer density and layout, file sizes sparse vs dense, and the equivalence result."""
    width = max([len(d["name"]) for d in manifest["layers"]] + [5])
    head = f"{'layer':<{width}} {'shape':>11} {'block':>7} {'density':>8} {'layout':>6}  reason"
    lines = [head, "-" * len(head)]
    for d in manifest["layers"]:
        shape, block = "x".join(map(str, d["shape"])), "x".join(map(str, d["block"]))
        reason = d["reason"] or ""
        lines.append(f"{d['name']:<{width}} {shape:>11} {block:>7} {d['density']:>8.3f} {d['layout']:>6}  {reason}")
    files, sizes = manifest["files"], manifest["sizes"]
    w, dns = files["weights"]["bytes"], files["dense"]["bytes"]
    lines.append(f"{WEIGHTS}: {_mb(w)}  vs dense {DENSE_WEIGHTS}: {_mb(dns)}  ({w / dns:.2f}x)")
    mw, ms = sizes["masked_weights_dense_bytes"], sizes["masked_weights_stored_bytes"]
    if mw:
        lines.append(f"masked weights: {_mb(ms)} stored vs {_mb(mw)} dense ({ms / mw:.2f}x, incl. indices)")
    eq = manifest.get("equivalence")
    if eq:
        lines.append(
            f"equivalence ({eq['probe_batch']} probe {_probe_kind(manifest)}, {eq['dtype']}, {eq['device']}): "
            f"max abs err {eq['max_abs_err']:.3g}, rel {eq['max_rel_err']:.3g} <= {eq['tolerance']:.3g}, "
            f"top-1 agreement {eq['top1_agreement']:.3f}"
        )
    if path is not None:
        lines.append(f"written to {path}")
    return "\n".join(lines)
