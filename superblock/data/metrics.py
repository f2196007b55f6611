"""Language-model metrics: perplexity and a token-weighted mean loss over batches and ranks.

Batches can hold different numbers of label tokens (a last partial batch, ignored labels), so averaging per-batch
mean losses would weight tokens unequally; :class:`TokenLoss` sums ``mean * tokens`` and divides once at the end.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100  # the label value torch's cross_entropy (and transformers) skip


def perplexity(mean_token_nll: float) -> float:
    """``exp`` of a mean per-token negative log-likelihood (nats): ``inf`` where exp overflows, nan for nan."""
    try:
        return math.exp(mean_token_nll)
    except OverflowError:
        return math.inf


def count_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Label tokens that count in the loss (a 0-d tensor on the labels' device: no host sync)."""
    return (labels != ignore_index).sum()


class TokenLoss:
    """Accumulates a token-weighted mean loss without a host sync per batch.

    ``update(mean_nll, tokens)`` per batch (``mean_nll`` a tensor or float: the batch's mean over ``tokens``
    label tokens, as ``F.cross_entropy(..., reduction="mean")`` returns it); ``all_reduce()`` once under DDP;
    ``compute()`` -> ``{"loss", "perplexity", "tokens"}``. Sums are float64: millions of tokens of fp32 loss.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.tokens: torch.Tensor | int = 0

    def update(self, mean_nll: torch.Tensor | float, tokens: torch.Tensor | int) -> None:
        if isinstance(mean_nll, torch.Tensor):
            mean_nll = mean_nll.detach().to(torch.float64)
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach()
        self.total = self.total + mean_nll * tokens
        self.tokens = self.tokens + tokens

    def all_reduce(self, device: torch.device | None = None) -> None:
        """Sum over the ranks of the default process group (no-op when torch.distributed is not initialised);
        `device` is where the collective runs (a CUDA device under NCCL)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if device is None:
            device = self.total.device if isinstance(self.total, torch.Tensor) else torch.device("cpu")
        both = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in (self.total, self.tokens)])
        dist.all_reduce(both)
        self.total, self.tokens = both[0], both[1]

    def compute(self) -> dict[str, float]:
        """The mean loss per token, its perplexity and the token count (``nan`` loss when no tokens were seen)."""
        total, tokens = float(self.total), float(self.tokens)
        loss = total / tokens if tokens > 0 else math.nan
        return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}
