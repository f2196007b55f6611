"""Build models by name: tiny torchvision twins, torchvision ViTs, any timm model (``timm:<name>``) or a Hugging Face
transformers model (``hf:<model_type>`` / ``hf:<local dir>``, see superblock.hf_models).

Weights never come from the network at run time: ``pretrained`` is a local file, so a job on an offline
cluster node behaves the same as on a laptop.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import vision_transformer as tv_vit

from superblock.hf_models import build_hf_model, hf_model_spec, is_hf_name, stored_weights

log = logging.getLogger(__name__)

# Small torchvision ViTs with the exact module structure of the big ones (encoder.layers.encoder_layer_i.mlp.0,
# self_attention, heads.head), so sparsity targets and export code paths are the same.
# tiny_vit: the embedded default run (32x32 synthetic data, 2 CPU cores, a few minutes).
# micro_vit: smoke tests that must finish in seconds.
_TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny_vit": {
        "image_size": 32,
        "patch_size": 4,
        "num_layers": 4,
        "num_heads": 4,
        "hidden_dim": 128,
        "mlp_dim": 256,
    },
    "micro_vit": {
        "image_size": 32,
        "patch_size": 4,
        "num_layers": 2,
        "num_heads": 2,
        "hidden_dim": 64,
        "mlp_dim": 128,
    },
}
_TINY_OVERRIDES = frozenset(
    {"patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim", "dropout", "attention_dropout"}
)
_TORCHVISION_BUILDERS = {
    "vit_b_16": tv_vit.vit_b_16,
    "vit_b_32": tv_vit.vit_b_32,
    "vit_l_16": tv_vit.vit_l_16,
    "vit_h_14": tv_vit.vit_h_14,
}
_TORCHVISION_OVERRIDES = frozenset({"dropout", "attention_dropout"})
_TORCHVISION_DEFAULT_SIZE = {"vit_h_14": 518}  # the others default to 224
_TIMM_PREFIX = "timm:"
MODEL_NAMES: tuple[str, ...] = (*_TINY_CONFIGS, *_TORCHVISION_BUILDERS)

# Prefixes that wrappers add to state-dict keys: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def model_logits(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, a transformers output's `.logits`, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(output).__name__}")


def default_image_size(name: str) -> int | None:
    """Input resolution a model is built for when no ``image_size`` is given (None for text models)."""
    if is_hf_name(name):
        return None
    if name in _TINY_CONFIGS:
        return _TINY_CONFIGS[name]["image_size"]
    return _TORCHVISION_DEFAULT_SIZE.get(name, 224)


def build_model(
    name: str,
    num_classes: int,
    image_size: int | None = None,
    pretrained: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a classifier by name, optionally loading weights from a local file.

    ``image_size=None`` means the model's own default (32 for the tiny twins, 224 for most others).
    ``kwargs`` override architecture fields: patch_size, num_layers, num_heads, hidden_dim, mlp_dim,
    dropout, attention_dropout for the tiny twins; dropout, attention_dropout for torchvision ViTs;
    anything ``timm.create_model`` accepts for ``timm:<name>``; ``task`` and ``config`` (transformers config
    overrides) for ``hf:<model_type>`` / ``hf:<dir>``, where ``num_classes`` is the vocabulary size of a causal LM,
    ``image_size`` is ignored and ``pretrained`` is a local transformers weights directory.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if is_hf_name(name):
        return _build_hf(name, num_classes, pretrained, kwargs)
    size = default_image_size(name) if image_size is None else int(image_size)
    if name in _TINY_CONFIGS:
        model = _build_tiny(name, num_classes, size, kwargs)
    elif name in _TORCHVISION_BUILDERS:
        model = _build_torchvision(name, num_classes, size, kwargs)
    elif name.startswith(_TIMM_PREFIX):
        model = _build_timm(name[len(_TIMM_PREFIX) :], num_classes, size, kwargs)
    else:
        valid = ", ".join(MODEL_NAMES)
        raise ValueError(
            f"unknown model {name!r}; valid names: {valid}, timm:<timm model name>, hf:<transformers model_type> "
            "(hf:gpt2, hf:llama, hf:bert) or hf:<local transformers directory>"
        )
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def starts_pretrained(name: str, pretrained: str | None) -> bool:
    """Whether `build_model(name, ..., pretrained=pretrained)` starts from trained weights: a local weights file,
    or an ``hf:<dir>`` that holds weights. False for a fresh initialisation."""
    return bool(pretrained) or (is_hf_name(name) and stored_weights(name) is not None)


def model_spec(
    name: str,
    num_classes: int,
    image_size: int | None = None,
    pretrained: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The JSON-able arguments of :func:`build_model`, so ``build_model(**spec)`` rebuilds the same model.

    ``image_size`` is resolved to an int so the spec does not depend on future default changes. To rebuild a
    model whose weights come from a checkpoint, drop ``pretrained`` (``{**spec, "pretrained": None}``): the
    file may not exist on the machine that rebuilds it, and the checkpoint's weights replace it anyway.
    ``hf:`` models have no image size (None) and take ``task`` / ``config`` only (see hf_models.hf_model_spec).
    """
    if is_hf_name(name):
        return hf_model_spec(name, num_classes, pretrained, **kwargs)
    size = default_image_size(name) if image_size is None else int(image_size)
    spec = {"name": name, "num_classes": int(num_classes), "image_size": size, "pretrained": pretrained}
    spec.update(kwargs)
    try:
        json.dumps(spec)
    except TypeError as err:
        raise ValueError(f"model arguments must be JSON-able (str, int, float, bool, list, dict): {err}") from err
    return spec


def _check_overrides(name: str, kwargs: Mapping[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"model {name!r} does not take {unknown}; it accepts {sorted(allowed)}")


def _check_patch_grid(name: str, image_size: int, patch_size: int) -> None:
    # torchvision only asserts this inside forward(); failing at build time names the real cause.
    if image_size % patch_size:
        raise ValueError(f"{name}: image_size {image_size} is not divisible by patch_size {patch_size}")


def _build_tiny(name: str, num_classes: int, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    _check_overrides(name, kwargs, _TINY_OVERRIDES)
    cfg = {**_TINY_CONFIGS[name], **kwargs, "image_size": image_size}
    _check_patch_grid(name, image_size, cfg["patch_size"])
    if cfg["hidden_dim"] % cfg["num_heads"]:
        raise ValueError(f"{name}: hidden_dim {cfg['hidden_dim']} is not divisible by num_heads {cfg['num_heads']}")
    return tv_vit.VisionTransformer(num_classes=num_classes, **cfg)


def _build_torchvision(name: str, num_classes: int, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    _check_overrides(name, kwargs, _TORCHVISION_OVERRIDES)
    patch = int(name.rsplit("_", 1)[1])
    _check_patch_grid(name, image_size, patch)
    return _TORCHVISION_BUILDERS[name](weights=None, num_classes=num_classes, image_size=image_size, **kwargs)


def _build_hf(name: str, num_classes: int, pretrained: str | None, kwargs: dict[str, Any]) -> nn.Module:
    # A weights directory goes to transformers' from_pretrained; a weights file (a state dict, e.g. a folded
    # export's dense_state_dict.safetensors) loads like any other model's.
    weights_file = pretrained is not None and Path(os.fspath(pretrained)).expanduser().is_file()
    model = build_hf_model(name, num_classes, None if weights_file else pretrained, **kwargs)
    if weights_file:
        load_pretrained(model, pretrained)
    return model


def _build_timm(name: str, num_classes: int, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm  # imported lazily: it is slow to import and only needed for timm models

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; list them with timm.list_models('*vit*')")
    # pretrained=False always: weights come from a local file through load_pretrained, never from the hub.
    return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=image_size, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Local pretrained weights
# ---------------------------------------------------------------------------------------------------------


def load_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load weights from a local ``.safetensors`` / ``.pt`` / ``.pth`` file into ``model`` in place.

    A classifier head whose shape differs (another ``num_classes``) is dropped and keeps its fresh
    initialisation; position embeddings are resampled when the image size differs. Any other mismatch
    raises ValueError, because silently skipping weights would train a half-initialised model.
    """
    load_state(model, _read_state_dict(_resolve_local_file(path)), str(path))


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a plain (unmasked) state dict into ``model`` with :func:`load_pretrained`'s rules; ``source`` names
    where it came from in error messages."""
    path = source
    state = _strip_wrapper_prefixes(dict(state))
    if any(".parametrizations." in key for key in state):
        raise ValueError(
            f"{path} holds a block-masked (sparsified) state dict; rebuild it with "
            "superblock.artifacts.checkpoint.model_from_checkpoint, or export it to fold the masks first"
        )
    target = model.state_dict()
    _fill_tied(state, target)
    heads = _head_prefixes(model)
    dropped = _drop_mismatched_heads(state, target, heads)
    _resample_position_embeddings(model, state, target)

    unexpected = sorted(set(state) - set(target))
    missing = sorted(k for k in set(target) - set(state) if k not in dropped)
    mismatched = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if unexpected or missing or mismatched:
        raise ValueError(
            f"weights in {path} do not fit this model: "
            f"unexpected keys {unexpected[:8]}, missing keys {missing[:8]}, "
            f"shape mismatches {[(k, tuple(state[k].shape), tuple(target[k].shape)) for k in mismatched[:8]]}"
        )
    for key in dropped:
        state[key] = target[key]  # keep the freshly initialised head
    model.load_state_dict(state, strict=True)


def _fill_tied(state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> None:
    """Files store tied weights once (transformers' lm_head and token embedding share one tensor; safetensors refuses
    shared tensors): a model key that is missing from `state` but shares its tensor with a key that is there gets
    that key's value."""
    by_storage: dict[tuple, list[str]] = {}
    for key, t in target.items():
        if t.numel():
            by_storage.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(key)
    for keys in by_storage.values():
        present = [k for k in keys if k in state]
        if present and len(keys) > 1:
            for key in keys:
                state.setdefault(key, state[present[0]])


def _resolve_local_file(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"pretrained must be a local file path, got {path!r}")
    text = os.fspath(path)
    file = Path(text).expanduser()
    if file.is_file():
        return file
    if "://" in text or text.startswith(("hf-hub:", "hf_hub:", "timm/")) or not text.endswith(_WEIGHT_SUFFIXES):
        raise ValueError(
            f"pretrained={text!r} looks like a URL or hub/weights name; pretrained weights must be a local "
            f"file ({', '.join(_WEIGHT_SUFFIXES)}): download it once, then pass its path (no downloads at run time)"
        )
    raise FileNotFoundError(f"pretrained weights file not found: {file.resolve()}")


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    # weights_only: a pickled checkpoint must not be able to run code when loaded.
    obj = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{file} is not a state dict (nor a dict with a 'model' or 'state_dict' state dict)")
    return dict(obj)


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    if isinstance(model, tv_vit.VisionTransformer):
        return ("heads.",)
    # timm records its classifier module name(s) in pretrained_cfg, e.g. "head" or ("head", "head_dist").
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", "head")
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{n}." for n in names)


def _drop_mismatched_heads(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], heads: tuple[str, ...]
) -> list[str]:
    """Remove classifier weights whose shape differs from the model's; returns the model keys left to init."""
    mismatched = [
        key for key in state if key.startswith(heads) and key in target and state[key].shape != target[key].shape
    ]
    if not mismatched:
        return []
    for key in mismatched:
        del state[key]
    # Drop the whole head, not half of it: a new weight with an old bias would be meaningless.
    head_keys = [k for k in target if k.startswith(heads)]
    for key in head_keys:
        state.pop(key, None)
    log.warning("pretrained classifier head does not match num_classes; re-initialising %s", head_keys)
    return head_keys


def _resample_position_embeddings(
    model: nn.Module, state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> None:
    if isinstance(model, tv_vit.VisionTransformer):
        key, prefix_tokens = "encoder.pos_embedding", 1
        grid = model.image_size // model.patch_size
        new_grid = [grid, grid]
    elif "pos_embed" in target and hasattr(model, "patch_embed"):
        key = "pos_embed"
        # no_embed_class models keep the class token out of the position table.
        prefix_tokens = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        new_grid = list(model.patch_embed.grid_size)
    else:
        return
    if key not in state or state[key].shape == target[key].shape:
        return
    old = state[key]
    old_tokens = old.shape[1] - prefix_tokens
    old_side = int(round(old_tokens**0.5))
    if old.ndim != 3 or old_side * old_side != old_tokens:
        return  # not a square grid: leave it to the shape check, which names the key
    from timm.layers import resample_abs_pos_embed

    state[key] = resample_abs_pos_embed(
        old, new_size=new_grid, old_size=[old_side, old_side], num_prefix_tokens=prefix_tokens
    )
    log.warning("resampled %s from a %dx%d to a %dx%d grid", key, old_side, old_side, *new_grid)
