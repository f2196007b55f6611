"""Which weights get block masks: presets (mlp, attn, all_linear) and glob patterns on module/parameter names.

Presets know timm / torchvision ViTs and the transformers families: BERT / RoBERTa (`attention.*` is attention,
`intermediate.dense` and the block's own `output.dense` the feed-forward), GPT-2 (`attn.c_attn` / `attn.c_proj`,
`mlp.c_fc` / `mlp.c_proj`, all `Conv1D`) and Llama / Mistral / Qwen (`self_attn.*_proj`, `mlp.*_proj`). Output
heads (`lm_head`, classifier / `score` heads, BERT's pooler and `cls` head) and weights tied to an embedding stay
dense under a preset; a pattern naming them still masks them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

PRESETS = ("mlp", "attn", "all_linear")
# Name parts that mark a feed-forward block (timm Mlp, torchvision MLPBlock, common transformer names).
MLP_PARTS = {"mlp", "ffn", "feed_forward", "feedforward", "mlp_block", "intermediate"}
# Name parts that mark attention (timm Attention, torchvision self_attention = nn.MultiheadAttention, HF-style).
ATTN_PARTS = {"attn", "attention", "self_attention", "self_attn", "cross_attn", "mha"}
# BERT's FFN down projection is `layer.<i>.output.dense` (`attention.output.dense` is attention's): `output` counts
# as feed-forward only right below a block index.
BLOCK_OUTPUT = re.compile(r"(?:^|\.)(?:blocks|layers|layer|h)\.\d+\.output(?:\.|$)")
# Classifier heads (timm, torchvision, HF `classifier` / `score`), HF language-model heads (`lm_head`, BERT's
# `cls.predictions`) and BERT's pooler: task layers that are small next to the body and that fine-tuning replaces.
HEAD_PARTS = {"head", "heads", "classifier", "lm_head", "score", "pooler", "cls"}
# The index of a transformer block in timm (blocks.0), torchvision (layers.encoder_layer_0), HF (layer.0, h.0).
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:blocks|layers|layer|h)\.(?:encoder_layer_)?(\d+)(?:\.|$)")
# The linear layers of a Llama-family decoder layer (Llama, Mistral, Qwen, SmolLM2) by transformers' names, relative
# to the layer: the benchmarks and tests that build such layers by hand take them from here.
LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LLAMA_PROJECTIONS = LLAMA_ATTENTION + LLAMA_MLP
# Parameters of nn.MultiheadAttention that are projection weights read directly by its forward.
MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class Target:
    """One weight to mask: `getattr(module, param_name)` is the weight; `name` its full dotted name."""

    module_name: str
    param_name: str
    module: nn.Module

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self.module, self.param_name).shape)


def _stored_weight(module: nn.Module) -> torch.Tensor | None:
    """The module's `weight` as stored (under a parametrization: the original, without computing the mask)."""
    plists = getattr(module, "parametrizations", None)
    if plists is not None and "weight" in plists:
        return getattr(plists["weight"], "original", None)
    weight = module._parameters.get("weight")
    return weight if isinstance(weight, torch.Tensor) else None


def is_conv1d(module: nn.Module) -> bool:
    """A transformers `Conv1D` (GPT-2 style): a linear layer whose weight is stored as (in, out), `nf` outputs.

    Recognised by class name and shape rather than by isinstance, so that transformers (an optional dependency) is
    not imported; masked modules get a subclass of it, hence the look at the whole MRO."""
    if not any(cls.__name__ == "Conv1D" for cls in type(module).__mro__):
        return False
    weight = _stored_weight(module)
    nf = getattr(module, "nf", None)
    return isinstance(nf, int) and weight is not None and weight.dim() == 2 and weight.shape[1] == nf


def linear_weights(model: nn.Module) -> list[Target]:
    """Every projection weight of the model: nn.Linear and transformers Conv1D weights, nn.MultiheadAttention
    input projections."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            found.append(Target(name, "weight", module))
        elif isinstance(module, nn.MultiheadAttention):
            found.extend(Target(name, p, module) for p in MHA_WEIGHTS if getattr(module, p, None) is not None)
    return found


def _parts(name: str) -> list[str]:
    return name.split(".")


def in_preset(target: Target, preset: str) -> bool:
    parts = _parts(target.module_name)
    if preset == "all_linear":
        return True
    if preset == "attn":
        return any(p in ATTN_PARTS or p.startswith("attn") for p in parts)
    if preset == "mlp":
        # timm's `attn.proj` is not an MLP weight, even in a model whose blocks are named "mlp_*".
        ffn = any(p in MLP_PARTS for p in parts) or BLOCK_OUTPUT.search(target.module_name) is not None
        return ffn and not in_preset(target, "attn")
    raise ValueError(f"unknown preset {preset!r}: use one of {PRESETS}")


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    """A transformers model's LM head (`get_output_embeddings`), whatever it is called; None for other models."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        head = getter()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def is_head(target: Target, model: nn.Module, embeddings: set[int] | None = None) -> bool:
    """A classifier / LM head or pooler, or a weight tied to an embedding (GPT-2's lm_head is its token table).

    `embeddings`: ids of the model's embedding weights (computed when not given)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, nn.Module) and target.module is classifier:
        return True
    if target.module is _output_embeddings(model):
        return True
    weight = target.module._parameters.get(target.param_name)
    if weight is not None and id(weight) in (_embedding_weights(model) if embeddings is None else embeddings):
        return True
    parts = _parts(target.module_name)
    return any(p in HEAD_PARTS for p in parts) or target.module_name == "fc"


def block_index(name: str) -> int | None:
    match = BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def _is_pattern(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _weights_of_module(module_name: str, module: nn.Module) -> list[Target]:
    """The mask-able weights of a module matched by name; ValueError if it only has non-2-D weights."""
    if isinstance(module, nn.MultiheadAttention):
        return [Target(module_name, p, module) for p in MHA_WEIGHTS if getattr(module, p, None) is not None]
    weight = module._parameters.get("weight")
    if weight is None:
        return []
    if weight.dim() != 2:
        raise ValueError(
            f"target {module_name!r} ({type(module).__name__}) has a {weight.dim()}-D weight "
            f"{tuple(weight.shape)}: block masks need 2-D (linear) weights; narrow the pattern or add an exclude"
        )
    return [Target(module_name, "weight", module)]


def match_pattern(model: nn.Module, pattern: str) -> list[Target]:
    """Weights whose module name or full parameter name matches a glob pattern (or equals it)."""
    matched: dict[str, Target] = {}
    for module_name, module in model.named_modules():
        if module_name and fnmatchcase(module_name, pattern):
            for t in _weights_of_module(module_name, module):
                matched[t.name] = t
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if not fnmatchcase(full, pattern):
                continue
            if param.dim() != 2:
                raise ValueError(
                    f"target {full!r} has shape {tuple(param.shape)}: block masks need 2-D weights; "
                    "narrow the pattern or add an exclude"
                )
            t = Target(module_name, param_name, module)
            matched[t.name] = t
    return list(matched.values())


def select_targets(
    model: nn.Module,
    targets: list[str] | tuple[str, ...] | str,
    exclude: list[str] | tuple[str, ...] = (),
    skip_first_block: bool = False,
    skip_head: bool = True,
) -> list[Target]:
    """Resolve presets and patterns to weights, in model order. Each entry that matches nothing is an error.

    `skip_head` drops classifier heads from preset matches (an explicit pattern naming the head still wins);
    `skip_first_block` drops every target in the first transformer block (index 0).
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ValueError(f"targets is empty: give presets {PRESETS} and/or glob patterns such as 'blocks.*.mlp.fc1'")
    candidates = linear_weights(model)
    embeddings = _embedding_weights(model)
    chosen: dict[str, Target] = {}
    for entry in targets:
        if entry in PRESETS:
            hits = [t for t in candidates if in_preset(t, entry) and not (skip_head and is_head(t, model, embeddings))]
            if not hits:
                raise ValueError(f"preset {entry!r} matches no weight of {type(model).__name__}: use a glob pattern")
        else:
            hits = match_pattern(model, entry)
            if not hits:
                kind = "pattern" if _is_pattern(entry) else "name"
                raise ValueError(
                    f"target {entry!r} is not a preset {PRESETS} and as a {kind} matches no module or parameter "
                    f"of {type(model).__name__} (names look like {candidates[0].module_name if candidates else '?'!r})"
                )
        for t in hits:
            chosen.setdefault(t.name, t)
    for pattern in exclude:
        if not any(fnmatchcase(n, pattern) for n, _ in model.named_modules() if n) and not any(
            fnmatchcase(n, pattern) for n, _ in model.named_parameters()
        ):
            raise ValueError(f"exclude pattern {pattern!r} matches no module or parameter of {type(model).__name__}")
        chosen = {
            n: t for n, t in chosen.items() if not (fnmatchcase(n, pattern) or fnmatchcase(t.module_name, pattern))
        }
    if skip_first_block:
        chosen = {n: t for n, t in chosen.items() if block_index(n) != 0}
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(chosen.values(), key=lambda t: (order[id(t.module)], t.param_name))
