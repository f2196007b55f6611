"""Devices and dtypes by name, and an early, clear error when a device cannot run a dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Largest accepted error of exported vs training-model logits, relative to the largest reference logit.
# Reduced precision rounds every layer's output, so the tolerance grows with the mantissa it drops.
TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 6e-2}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not supported: use one of {list(DTYPES)}")
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {list(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' means CUDA when available, else CPU; asking for CUDA without one is a clear error."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a torch device: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} was asked for but CUDA is not available here: use device=cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name} is not supported: use auto, cpu or cuda")
    return device


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
