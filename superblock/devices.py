"""Devices and dtypes by name, and what `auto` means for each: the one place every layer asks.

* device `auto`: CUDA when a GPU is visible, else the CPU.
* dtype / precision `auto`: bf16 on CUDA, fp32 on the CPU.
* ensure_runnable: an early, clear error when a device cannot run a dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = tuple(DTYPES)  # ("fp32", "bf16", "fp16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)  # config values: a dtype name or auto
DEVICE_CHOICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def auto_device() -> torch.device:
    """What device `auto` means here: CUDA when available, else the CPU."""
    return torch.device("cuda" if cuda_available() else "cpu")


def auto_dtype_name(device: str | torch.device | None = None) -> str:
    """What dtype `auto` means on `device` (default: the `auto` device): bf16 on CUDA, fp32 on the CPU."""
    kind = torch.device(device).type if device is not None else auto_device().type
    return "bf16" if kind == "cuda" else "fp32"


def dtype_name_or_auto(name: str, device: str | torch.device | None = None) -> str:
    """`name` itself, or for `auto` the dtype name it means on `device`."""
    return auto_dtype_name(device) if name == "auto" else name


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (fp32 | bf16 | fp16) or a supported torch dtype; ValueError otherwise."""
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
        return auto_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a torch device: use auto, cpu or cuda") from None
    if device.type == "cuda" and not cuda_available():
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
