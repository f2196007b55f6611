"""Write scikit-learn's handwritten digits (UCI, 1797 images of 8x8, shipped inside the package: no download)
as an ImageFolder tree: <out>/train/<digit>/*.png and <out>/val/<digit>/*.png, a fixed stratified 80/20 split.

    pip install scikit-learn && python scripts/digits_tree.py data/digits
    python train.py data=small_images data.root=data/digits
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits_tree(out: Path, val_fraction: float = 0.2, upscale: int = 4, seed: int = 0) -> dict[str, int]:
    """Returns the number of images written per split. Pixels 0..16 become 0..255 grey, upscaled with nearest."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit("scikit-learn is needed for its bundled digits: pip install scikit-learn") from err
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
                img = Image.fromarray(pixels, mode="L").resize((8 * upscale, 8 * upscale), Image.NEAREST)
                img.convert("RGB").save(folder / f"{i:04d}.png")
                counts[split] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (created)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    counts = write_digits_tree(args.out, args.val_fraction, seed=args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images under {args.out}")


if __name__ == "__main__":
    main()
