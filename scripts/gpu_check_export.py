"""A small export for scripts/gpu_check.sh: a randomly initialised micro ViT (hidden 64) at 224 px with 90% block-16
masks on every linear layer, exported as BSR on the GPU in seconds. It exercises every serving runtime side by side
with dense; its speed ratios say little (a micro model is host-bound), the per-layer benchmark's do.

    python scripts/gpu_check_export.py <export dir>
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from superblock.export import export_checkpoint  # noqa: E402
from tests.helpers.runs import make_run  # noqa: E402


def main(export_dir: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        make_run(run, "micro_vit", image_size=224, sparsity=0.9, block_size=16, targets=("all_linear",), seed=0)
        export_checkpoint(run, export_dir, device="cuda", layout="bsr", echo=print)
    print(f"export written to {export_dir}")


if __name__ == "__main__":
    main(sys.argv[1])
