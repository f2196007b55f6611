"""Deprecated name of `superblock.kernels.projection_fusion` (it holds modules that run several projections as one
block-sparse product, not kernels). Importing it works for one more release, with a warning."""

from __future__ import annotations

import warnings

from superblock.kernels.projection_fusion import *  # noqa: F403
from superblock.kernels.projection_fusion import __all__  # noqa: F401

warnings.warn(
    "superblock.kernels.fused is now superblock.kernels.projection_fusion; the old name goes in the next release",
    FutureWarning,
    stacklevel=2,
)
