"""Language-model metrics: perplexity of a mean per-token loss (per token, or per byte of the text so that models
with different tokenizers compare), and the label value losses skip.

Batches can hold different numbers of label tokens (a last partial batch, ignored labels), so the evaluators
(engine/validation.py, evaluate.py) sum per-token losses (`reduction="sum"`) and divide once at the end rather
than averaging per-batch means."""

from __future__ import annotations

import math

IGNORE_INDEX = -100  # the label value torch's cross_entropy (and transformers) skip


def perplexity(mean_token_nll: float) -> float:
    """``exp`` of a mean per-token negative log-likelihood (nats): ``inf`` where exp overflows, nan for nan."""
    try:
        return math.exp(mean_token_nll)
    except OverflowError:
        return math.inf


def perplexity_per_byte(mean_token_nll: float, bytes_per_token: float) -> float:
    """Perplexity per UTF-8 byte of a mean per-token loss: ``exp(nll / bytes_per_token)``, where `bytes_per_token`
    is how many bytes of text the scored tokens spell, on average (1 for the byte-level tokenizer's text)."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
    return perplexity(mean_token_nll / bytes_per_token)
