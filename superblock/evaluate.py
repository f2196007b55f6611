"""Evaluate a training run or a sparse export: accuracy in every form of the model, latency vs dense, memory.

Forms ("modes") of one trained model:
  masked  the training model with its mask parametrizations (run dirs, or an export whose source run still exists);
          computed in fp32 weights under autocast to `dtype`, as the training loop validates
  folded  the plain dense model with zeros in the pruned blocks (weights in `dtype`)
  bsr     the block-sparse inference model (BlockSparseLinear / block-sparse attention, weights in `dtype`)
`mode=all` runs every available form on the same batches and reports how far their logits and predictions differ.
`runtime` (eager | compile | cudagraph) serves the folded and bsr forms the same way (superblock.export.serving), so
their latency ratio is the one of that runtime; the masked form always runs eagerly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from superblock.artifacts.resolve import ArtifactError, resolve
from superblock.config import tokenizer_of
from superblock.data.metrics import perplexity, perplexity_per_byte
from superblock.devices import dtype_name, ensure_runnable, parse_dtype, resolve_device
from superblock.engine.builders import TEXT_OPTIONS
from superblock.engine.objective import flat_predictions
from superblock.engine.validation import topk_correct
from superblock.export import (
    Layer,
    SampleInput,
    compare_latency,
    fold_copy,
    install_bsr,
    load_folded,
    load_source,
    load_sparse,
    masked_layers,
    pack_tensors,
    read_manifest,
    sample_input,
)
from superblock.export.layout import assign_layouts
from superblock.export.serving import check_runtime, make_runtime
from superblock.export.source import Source
from superblock.io import write_json_atomically
from superblock.kernels import fuse_linear_gelu
from superblock.models import model_logits
from superblock.progress import epoch_progress, progress_iter
from superblock.rundir import RunDir

MODES = ("masked", "folded", "bsr", "all")
FORMS = ("masked", "folded", "bsr")
DATA_KEYS = ("name", "root", "download", "image_size", "train_size", "val_size", "randaugment", "num_classes")
TEXT_KEYS = ("name", *TEXT_OPTIONS)  # what training builds text data from (engine.builders owns the list)


@dataclass
class Target:
    """What to evaluate: a run (directory or checkpoint file) or an export directory."""

    path: Path
    kind: str  # "run" | "export"
    model_spec: dict
    config: dict
    manifest: dict | None = None
    source: Source | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        if self.kind == "export" or self.path.is_dir():
            return self.path
        run = RunDir.of_checkpoint(self.path)
        return run.path if run is not None else self.path.parent


def open_target(path: str | Path) -> Target:
    """Recognise an export directory (manifest.json) or a training run / checkpoint, and load its description."""
    path = Path(path)
    try:
        kind = resolve(path).kind
    except ArtifactError as err:
        raise ArtifactError(f"{err}: pass a run directory, a checkpoint file or an export directory") from None
    if kind == "export":
        manifest = read_manifest(path)
        return Target(path, "export", manifest["model_spec"], manifest["source"].get("config") or {}, manifest)
    src = load_source(path)
    return Target(path, "run", src.state["model_spec"], src.config, source=src)


# ------------------------------------------------------------------------------------------------- models


def _source_of_export(target: Target) -> Source | None:
    """The training checkpoint an export came from, if it is still where the manifest says."""
    ckpt = target.manifest["source"].get("checkpoint")
    if ckpt and Path(ckpt).is_file():
        return load_source(ckpt)
    target.notes.append(f"masked: skipped, the source checkpoint {ckpt} is not available")
    return None


def to_sparse(folded: nn.Module, layers: list[Layer], backend: str = "auto") -> nn.Module:
    """The block-sparse inference form of a folded model, built in memory (every layer BSR that can be)."""
    assign_layouts(folded, layers, "bsr")
    _, bsr = pack_tensors(folded, layers)
    install_bsr(folded, bsr, backend=backend)
    fuse_linear_gelu(folded)
    return folded


def build_models(
    target: Target, forms: list[str], device: torch.device, dtype: torch.dtype, backend: str, use_ema: bool
) -> dict[str, nn.Module]:
    """{form: model on device} for the requested forms that this target can provide."""
    models: dict[str, nn.Module] = {}
    src = target.source
    if target.kind == "export" and "masked" in forms:
        src = _source_of_export(target)
    masked = src.model(use_ema) if src is not None else None
    if "masked" in forms and masked is not None:
        models["masked"] = masked.to(device)
    if target.kind == "export":
        if "folded" in forms:
            models["folded"] = load_folded(target.path, device, dtype)
        if "bsr" in forms:
            models["bsr"] = load_sparse(target.path, device, dtype, backend)
        return models
    if "folded" in forms:
        models["folded"] = fold_copy(masked).to(device, dtype)
    if "bsr" in forms:
        models["bsr"] = to_sparse(fold_copy(masked), masked_layers(masked), backend).to(device, dtype)
    return models


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's saved state (parameters and persistent buffers: BSR values and indices included, mask
    scores too for masked; not the per-layer derived tensors a block-sparse layer builds for its kernels)."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def serve(models: dict[str, nn.Module], runtime: str, batch_sizes: list[int], shape: SampleInput) -> None:
    """Put the folded and bsr forms behind the same serving runtime (in place); masked stays eager."""
    for form in ("folded", "bsr"):
        if form in models:
            models[form] = make_runtime(models[form], runtime, batch_sizes=batch_sizes, sample_shape=shape)


def _runner(form: str, model: nn.Module, device: torch.device, dtype: torch.dtype) -> Callable[[torch.Tensor], Any]:
    """Forward of one form: masked runs under autocast (fp32 weights), the others in `dtype` directly."""
    if form != "masked":
        # Token ids stay integers; images take the weights' dtype.
        return lambda x: model_logits(model(x if not x.is_floating_point() else x.to(dtype)))
    enabled = dtype != torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            return model_logits(model(x))

    return run


# ------------------------------------------------------------------------------------------------- accuracy


def data_config(target: Target, overrides: dict | None) -> dict:
    """The run's data config with the non-null `overrides` on top; ValueError when there is none at all."""
    base = dict(target.config.get("data") or {})
    base.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if not base.get("name"):
        raise ValueError(
            f"no data config for {target.path} (no run config.yaml found): pass data=<synthetic|cifar10|...> "
            "and data.root=..."
        )
    return base


def val_loader(data: dict, seed: int, model_spec: dict, batch_size: int | None):
    """The validation loader of a data config (same seed as the run, so synthetic data is the same images, and the
    run's eval transforms). Only the val split is built and needed on disk (a val-only ImageNet copy works)."""
    from superblock.data import build_datasets, build_val_loader

    text = data.get("name") == "text"
    kwargs = {k: data[k] for k in (TEXT_KEYS if text else DATA_KEYS) if data.get(k) is not None}
    if not text:
        kwargs["image_size"] = kwargs.get("image_size") or model_spec["image_size"]
    elif not kwargs.get("tokenizer"):  # the run's config names none: the tokenizer training read the text with
        kwargs["tokenizer"] = tokenizer_of(model_spec["name"], model_spec.get("pretrained"))
    if isinstance(data.get("augment"), dict) and not text:
        kwargs["augment"] = dict(data["augment"])
    bundle = build_datasets(kwargs.pop("name"), seed=seed, val_only=True, **kwargs)
    if not text and bundle.image_size != model_spec["image_size"]:
        raise ValueError(f"data image size {bundle.image_size} != the model's {model_spec['image_size']}")
    if bundle.num_classes != model_spec["num_classes"]:
        hint = ""
        if text:
            read = f"tokenizer {kwargs['tokenizer']}" if kwargs.get("tokenizer") else "UTF-8 bytes"
            hint = f" (the text read with {read}): pass data.tokenizer=<the folder of the model's tokenizer>"
        raise ValueError(f"data has {bundle.num_classes} classes, the model {model_spec['num_classes']}{hint}")
    bs = batch_size or data.get("eval_batch_size") or data.get("batch_size") or 128
    return bundle, build_val_loader(bundle, batch_size=bs, num_workers=data.get("num_workers", 0) or 0)


@torch.no_grad()
def measure_accuracy(
    runners: dict[str, Callable], loader, device: torch.device, max_batches: int | None = None
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Top-1/top-5 of every form on the same batches, and how each form's logits differ from the first form's."""
    names = list(runners)
    counts = {n: torch.zeros(3, dtype=torch.float64) for n in names}  # top-1, top-5, summed loss
    diffs = {n: {"max_abs_logit_diff": 0.0, "disagreements": 0} for n in names[1:]}
    seen = 0
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    for inputs, targets in progress_iter(itertools.islice(loader, total), total, "evaluate", "batch", enabled=True):
        inputs, targets = inputs.to(device), targets.to(device)
        # A language model's every token is one prediction (flat_predictions), as in training.
        raw = {n: runners[n](inputs).float() for n in names}
        sequences = next(iter(raw.values())).dim() == 3
        logits = {n: flat_predictions(r, targets)[0] for n, r in raw.items()}
        targets = targets.reshape(-1)
        for n in names:
            loss = torch.nn.functional.cross_entropy(logits[n], targets, reduction="sum").double().cpu()
            counts[n] += torch.stack([*(c.double().cpu() for c in topk_correct(logits[n], targets)), loss])
        ref = logits[names[0]]
        for n in names[1:]:
            diffs[n]["max_abs_logit_diff"] = max(diffs[n]["max_abs_logit_diff"], (logits[n] - ref).abs().max().item())
            diffs[n]["disagreements"] += int((logits[n].argmax(-1) != ref.argmax(-1)).sum().item())
        seen += len(targets)
    if seen == 0:
        raise ValueError("the validation split is empty: check data.root / data.val_size")
    per_byte = getattr(loader.dataset, "bytes_per_label", None)
    acc = {n: _accuracy_entry(c, seen, sequences, per_byte) for n, c in counts.items()}
    for d in diffs.values():
        d.update(reference=names[0], top1_agreement=1.0 - d["disagreements"] / seen)
    return acc, diffs


def _accuracy_entry(
    counts: torch.Tensor, seen: int, sequences: bool, bytes_per_label: float | None = None
) -> dict[str, float]:
    """Top-1 / top-5 in percent (next-token accuracy for a language model, with its loss and perplexity: per token,
    and per byte of text when the dataset says how many bytes its labels spell)."""
    top1, top5, loss = counts.tolist()
    entry = {"top1": 100 * top1 / seen, "top5": 100 * top5 / seen}
    if sequences:
        entry.update(loss=loss / seen, perplexity=perplexity(loss / seen), tokens=seen)
        if bytes_per_label:
            entry["perplexity_per_byte"] = perplexity_per_byte(loss / seen, bytes_per_label)
        return entry
    return {**entry, "images": seen}


# ------------------------------------------------------------------------------------------------- latency


def measure_latency(
    runners: dict[str, Callable], sample: SampleInput, device: torch.device, batch_size: int, cfg: dict
) -> dict[str, dict]:
    """Per form: median ms per batch, images/s and speedup over the dense (folded) model, measured side by side.
    A language model's batch is `batch_size` sequences of the sample's length (random token ids)."""
    n_inputs = max(1, int(cfg.get("inputs", 4)))
    inputs = [sample.make(batch_size, device) for _ in range(n_inputs)]
    reps = {k: int(cfg.get(k, v)) for k, v in (("warmup", 3), ("repeats", 30), ("rounds", 3))}
    bar = epoch_progress(
        max(1, reps["rounds"]) * len(runners), 0, "latency", enabled=True, every_s=30.0, step=None, unit="round"
    )
    try:
        stats = compare_latency(runners, inputs, device, **reps, progress=lambda: bar.update(1))
    finally:
        bar.close()
    dense = stats.get("folded", {}).get("median_ms")
    for s in stats.values():
        s["images_per_s"] = batch_size * 1e3 / s["median_ms"]
        s["speedup_vs_dense"] = dense / s["median_ms"] if dense else None
    return stats


# ------------------------------------------------------------------------------------------------- entry


def _forms(mode: str, latency_on: bool) -> list[str]:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
    forms = list(FORMS) if mode == "all" else [mode]
    if latency_on and "folded" not in forms:
        forms.append("folded")  # the dense baseline of the latency comparison
    return [f for f in FORMS if f in forms]


def _header(target, mode: str, dev: torch.device, torch_dtype: torch.dtype, backend: str, models: dict) -> dict:
    """What eval.json says about the evaluation itself: its source, mode, device, dtype, backend and weight bytes."""
    return {
        "checkpoint": str(target.path.resolve()),
        "kind": target.kind,
        "mode": mode,
        "device": str(dev),
        "dtype": dtype_name(torch_dtype),
        "backend": backend,
        "notes": target.notes,
        "weight_bytes": {f: weight_bytes(m) for f, m in models.items()},
    }


def evaluate(
    checkpoint: str | Path,
    mode: str = "all",
    *,
    device: str = "auto",
    dtype: str = "fp32",
    backend: str = "auto",
    runtime: str = "eager",
    batch_sizes: list[int] | None = None,
    use_ema: bool = False,
    data: dict | None = None,
    batch_size: int | None = None,
    max_batches: int | None = None,
    accuracy: bool = True,
    latency: dict | None = None,
    output: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Evaluate a run or export in one mode (or all); writes eval.json (atomically) and returns its content.

    `runtime` serves the folded and bsr forms (eager | compile | cudagraph) at `batch_sizes` (default: the latency
    batch size and the accuracy batch size; other batches are padded up or split)."""
    latency_cfg = dict(latency or {})
    latency_on = bool(latency_cfg.get("enabled", True))
    forms = _forms(mode, latency_on)
    sizes = check_runtime(runtime, batch_sizes)
    dev, torch_dtype = resolve_device(device), parse_dtype(dtype)
    ensure_runnable(torch_dtype, dev)
    target = open_target(checkpoint)
    data_cfg = data_config(target, data) if accuracy else None
    models = build_models(target, forms, dev, torch_dtype, backend, use_ema)
    if not models:
        raise ValueError(f"nothing to evaluate in mode={mode}: {'; '.join(target.notes)}")
    shape = sample_input(next(iter(models.values())), target.model_spec)
    result = _header(target, mode, dev, torch_dtype, backend, models)
    if sizes is None and runtime != "eager":
        sizes = _served_sizes(runtime, latency_cfg if latency_on else None, data_cfg, batch_size)
    serve(models, runtime, list(sizes) if sizes else None, shape)
    result.update(runtime=runtime, runtime_batch_sizes=list(sizes) if sizes else None)
    runners = {f: _runner(f, m, dev, torch_dtype) for f, m in models.items()}
    if accuracy:
        _, loader = val_loader(data_cfg, int(target.config.get("seed", 0) or 0), target.model_spec, batch_size)
        eval_runners = {f: r for f, r in runners.items() if mode == "all" or f == mode}
        result["data"] = data_cfg
        result["accuracy"], result["agreement"] = measure_accuracy(eval_runners, loader, dev, max_batches)
    if latency_on:
        bs = int(latency_cfg.get("batch_size", 64))
        timed = {f: r for f, r in runners.items() if f != "masked" or mode == "masked"}
        result["latency"] = {"batch_size": bs, **measure_latency(timed, shape, dev, bs, latency_cfg)}
        result.update(headline(result["latency"], mode))
    out = Path(output) if output else RunDir(target.output_dir).eval
    write_json_atomically(out, result)
    echo(table(result))
    echo(f"wrote {out}")
    return result


def _served_sizes(runtime: str, latency: dict | None, data_cfg: dict | None, batch_size: int | None):
    """The batch sizes a compiled / graphed runtime prepares by default: the timed one and the accuracy one."""
    wanted = [int(latency.get("batch_size", 64))] if latency is not None else []
    if data_cfg is not None:
        wanted.append(int(batch_size or data_cfg.get("eval_batch_size") or data_cfg.get("batch_size") or 128))
    return check_runtime(runtime, wanted or None)


def headline(lat: dict, mode: str) -> dict:
    """Top-level speed fields (read by superblock.report): the evaluated form (bsr for mode=all) vs dense."""
    form = "bsr" if mode == "all" else mode
    entry, dense = lat.get(form) or {}, lat.get("folded") or {}
    return {
        "speedup": entry.get("speedup_vs_dense"),
        "latency_ms": entry.get("median_ms"),
        "dense_latency_ms": dense.get("median_ms"),
    }


def _fmt(value: float | None, spec: str, width: int, suffix: str = "") -> str:
    text = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec) + suffix
    return text.rjust(width)


def table(result: dict) -> str:
    """One row per form: accuracy, agreement with the reference form, latency, speedup, weight memory."""
    acc, agree, lat = result.get("accuracy", {}), result.get("agreement", {}), result.get("latency", {})
    forms = [f for f in FORMS if f in result["weight_bytes"]]
    lm = any("perplexity" in a for a in acc.values())  # a language model: perplexity too, sequences per second
    ppl_head = f" {'ppl':>9} {'ppl/byte':>8}" if lm else ""
    head = (
        f"{'mode':<7} {'top-1':>7} {'top-5':>7}{ppl_head} {'agree':>7} {'max|dlogit|':>11} {'ms/batch':>9} "
        f"{'seq/s' if lm else 'img/s':>9} {'speedup':>8} {'weights MB':>10}"
    )
    title = f"{result['checkpoint']} ({result['kind']}) on {result['device']}, {result['dtype']}"
    lines = [title, head, "-" * len(head)]
    for f in forms:
        a, g, t = acc.get(f, {}), agree.get(f, {}), lat.get(f, {})
        cells = [
            _fmt(a.get("top1"), ".2f", 7),
            _fmt(a.get("top5"), ".2f", 7),
            *([_fmt(a.get("perplexity"), ".3f", 9), _fmt(a.get("perplexity_per_byte"), ".4f", 8)] if lm else []),
            _fmt(g.get("top1_agreement"), ".4f", 7),
            _fmt(g.get("max_abs_logit_diff"), ".2e", 11),
            _fmt(t.get("median_ms"), ".2f", 9),
            _fmt(t.get("images_per_s"), ".1f", 9),
            _fmt(t.get("speedup_vs_dense"), ".2f", 8, "x"),
            _fmt(result["weight_bytes"][f] / 2**20, ".2f", 10),
        ]
        lines.append(f"{f:<7} " + " ".join(cells))
    if lat:
        runtime = result.get("runtime", "eager")
        lines.append(
            f"latency at batch {lat['batch_size']} ({runtime} runtime for folded and bsr): median of interleaved "
            "repeats, speedup = folded / mode"
        )
    if agree:
        ref = next(iter(agree.values()))["reference"]
        lines.append(f"agree / max|dlogit|: vs {ref} on the same batches")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)
