"""The model a saved spec describes: the one way a checkpoint's or an export's model is rebuilt before its weights
are loaded (`model_spec`: the kwargs of `superblock.models.build_model`; `sparsity_spec`: the kwargs of `sparsify`).

Building a fresh model for a new run from the Hydra config is another concept (engine/builders.py): that model keeps
its own initialisation where loaded weights do not cover it (a new classifier head); this one is all loaded next.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from superblock.models import build_model
from superblock.sparsity import sparsify


def _has_unsaved_buffers(model: nn.Module) -> bool:
    return any(m._non_persistent_buffers_set for m in model.modules())


def _empty_model(spec: dict[str, Any]) -> nn.Module:
    """The model with uninitialised weights, built on the meta device to skip the random init; a model with buffers
    that no state dict carries is built normally instead, since those would stay uninitialised."""
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


def build_from_spec(model_spec: dict[str, Any], sparsity_spec: dict[str, Any] | None = None) -> nn.Module:
    """The model of a saved spec on the CPU, masked with `sparsify(**sparsity_spec)` when one is given, ready for a
    strict `load_state_dict` of the state saved with the spec. Its weights are uninitialised (every one is loaded
    next) and `pretrained` is ignored: the weights come from the artifact, never from a file or hub that may have
    changed or gone since."""
    model = _empty_model({**model_spec, "pretrained": None})
    if sparsity_spec:
        sparsify(model, **sparsity_spec)
    return model
