"""Language-model metrics: perplexity of a mean per-token loss, and the label value losses skip.

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
