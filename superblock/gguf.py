"""Pretrained weights from a GGUF file (llama.cpp's format) as a transformers folder that `model=hf` fine-tunes.

transformers reads GGUF itself (dequantizing every tensor to float; it needs the optional `gguf` and `accelerate`
packages: `pip install -e ".[gguf]"`), but a model loaded that way is marked quantized and refuses save_pretrained.
`convert_gguf` copies the dequantized weights into a plain model of the same config, saves it (safetensors, config,
generation config, tokenizer) through a temporary folder renamed at the end, reloads the folder and checks that its
logits match the GGUF model's on a few prompts. Nothing is downloaded: the file is local.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from superblock.hf_models import bars_only_on_a_terminal

PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _require(*packages: str) -> None:
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise RuntimeError(
            f"reading GGUF files needs {', '.join(missing)}: pip install -e '.[gguf]' (gguf, accelerate, transformers)"
        )


def load_gguf(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF file, dequantized to fp32 by transformers."""
    _require("transformers", "gguf", "accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # a GGUF file's tokenizer comes with transformers' WordPiece-era default (clean-up on: some versions then strip
    # the spaces before punctuation when decoding, others warn on every load); the BPE vocabularies GGUF files hold
    # want it off, as their own tokenizer_config.json says (SmolLM2's does)
    tokenizer.clean_up_tokenization_spaces = False
    with bars_only_on_a_terminal():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def plain_copy(model: Any) -> Any:
    """The same network as an ordinary transformers model (no quantizer attached): what save_pretrained accepts."""
    from transformers import AutoModelForCausalLM

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    fresh = AutoModelForCausalLM.from_config(type(model.config).from_dict(config), dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.tie_weights()
    return fresh.eval()


@torch.no_grad()
def logits_gap(reference: Any, candidate: Any, tokenizer: Any, prompts: Sequence[str]) -> float:
    """The worst relative error of the candidate's logits over the prompts: ||candidate - reference|| / ||reference||
    (Frobenius norm over positions and vocabulary)."""
    worst = 0.0
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        ref = reference(ids).logits.float()
        got = candidate(ids).logits.float()
        worst = max(worst, ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item())
    return worst


def save_checked(
    model: Any,
    tokenizer: Any,
    out: str | Path,
    *,
    dtype: str = "float32",
    prompts: Sequence[str] = PROMPTS,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Save `model` (any transformers causal LM, quantizer attached or not) and `tokenizer` to `out` as a plain
    transformers folder in `dtype`, reload it and check its logits against `model`'s. Returns the check's numbers."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain = plain_copy(model).to(DTYPES[dtype])
    with bars_only_on_a_terminal():
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # computed in fp32 whatever the stored dtype: the check sees what saving did to the weights, not bf16 arithmetic
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
    gap = logits_gap(model, reloaded, tokenizer, prompts)
    tolerance = 1e-5 if dtype == "float32" else 1e-2  # bf16 rounds each weight by up to 2^-9 relative
    if gap > tolerance:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"the saved model's logits differ from the source's by {gap:.2e} (> {tolerance:g})")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    params = sum(p.numel() for p in reloaded.parameters())
    echo(f"saved {type(reloaded).__name__} ({params / 1e6:.1f}M parameters, {dtype}) to {out}; its logits match the "
         f"source's within {gap:.1e} (relative) on {len(prompts)} prompts")  # fmt: skip
    return {"path": str(out), "params": params, "dtype": dtype, "logits_gap": gap, "prompts": list(prompts)}


def convert_gguf(gguf: str | Path, out: str | Path, **kwargs: Any) -> dict[str, Any]:
    """GGUF file -> checked transformers folder (see save_checked for the keywords)."""
    model, tokenizer = load_gguf(gguf)
    return save_checked(model, tokenizer, out, **kwargs)
