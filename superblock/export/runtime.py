"""An early, clear error when a device cannot run a dtype, and the export check's tolerance per dtype. Device and
dtype names (and what `auto` means) live in superblock.devices; they are re-exported here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from superblock.devices import DTYPES, dtype_name, parse_dtype, resolve_device

__all__ = ["DTYPES", "TOLERANCES", "dtype_name", "ensure_runnable", "parse_dtype", "resolve_device"]

# Largest accepted error of exported vs training-model logits, relative to the largest reference logit.
# Reduced precision rounds every layer's output, so the tolerance grows with the mantissa it drops.
TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 6e-2}


def ensure_runnable(dtype: torch.dtype, device: torch.device) -> None:
    """Run the ops a ViT needs once in `dtype` on `device`; ValueError naming a fix if the device cannot."""
    name = dtype_name(dtype)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype={name} is not supported by {torch.cuda.get_device_name(device)}: use dtype=fp16|fp32")
    try:
        x = torch.randn(1, 3, 4, 4, device=device).to(dtype)
        y = F.conv2d(x, torch.ones(4, 3, 2, 2, device=device, dtype=dtype)).flatten(2).transpose(1, 2)
        y = F.layer_norm(F.gelu(F.linear(y, torch.eye(4, device=device, dtype=dtype))), (4,))
        q = y.reshape(1, 1, -1, 4)
        F.scaled_dot_product_attention(q, q, q)
    except (RuntimeError, NotImplementedError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"dtype={name} cannot run on {device} ({first}): use another dtype, e.g. dtype=fp32") from None
