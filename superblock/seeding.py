"""Seeds that are the same in every process, on every rank and machine, and seeding the global RNGs."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of `parts` (joined with '/'). Python's hash() is salted per process;
    blake2b gives the same seed in every process, on every rank. Mixed, not added: seed + epoch would make runs
    with seeds 0 and 1 draw the same streams shifted by one."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (what models, transforms and mixup draw from)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
