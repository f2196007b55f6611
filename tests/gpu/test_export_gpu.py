"""Export / load_sparse / evaluate on a CUDA GPU: every kernel backend reproduces the masked model.

Run on a CUDA machine: python -m pytest -m gpu tests/gpu/test_export_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/gpu is not a package: reach tests.unit

from superblock.evaluate import evaluate  # noqa: E402
from superblock.export import export_checkpoint, load_sparse  # noqa: E402
from superblock.kernels import BlockSparseLinear, BlockSparseMultiheadAttention  # noqa: E402
from superblock.kernels._triton_bsr import HAS_TRITON  # noqa: E402
from tests.helpers.runs import make_run, probe  # noqa: E402

BACKENDS = ["auto", "torch", "dense", *(["triton"] if HAS_TRITON else [])]


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    masked = make_run(root / "run", "vit_b_16", image_size=224, sparsity=0.9, block_size=32)
    return root, masked.cuda()


@torch.no_grad()
def masked_logits(masked, x):
    return masked(x.cuda()).float()


@pytest.mark.parametrize("dtype,runtime", [("fp32", "eager"), ("bf16", "cudagraph")])
def test_export_on_gpu_auto_layout(vit_b16, dtype, runtime):
    root, masked = vit_b16
    result = export_checkpoint(
        root / "run",
        root / f"export_{dtype}",
        dtype=dtype,
        device="cuda",
        layout="auto",
        batch_sizes=[1, 32],
        runtime=runtime,
        echo=lambda _: None,
    )
    eq = result.manifest["equivalence"]
    assert eq["passed"] and eq["device"].startswith("cuda") and eq["dtype"] == dtype
    assert result.manifest["layout_policy"]["runtime"] == runtime
    for d in result.manifest["layers"]:
        rows = d["timing"]["per_batch"]
        assert [r["tokens"] for r in rows] == [197, 32 * 197] and (d["layout"] == "dense") == bool(d["reason"])
        assert d["timing"]["timed"] == ("graph" if runtime == "cudagraph" else "eager")


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_sparse_backends_match_masked(vit_b16, backend):
    root, masked = vit_b16
    path = root / "export_bsr"
    if not path.exists():
        export_checkpoint(root / "run", path, device="cuda", layout="bsr", echo=lambda _: None)
    model = load_sparse(path, device="cuda", backend=backend)
    assert sum(isinstance(m, BlockSparseMultiheadAttention) for m in model.modules()) == 12
    assert all(m.backend == backend for m in model.modules() if isinstance(m, BlockSparseLinear))
    x = probe(224, n=4)
    with torch.no_grad():
        out = model(x.cuda()).float()
    ref = masked_logits(masked, x)
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    with torch.no_grad():
        bf16 = load_sparse(path, device="cuda", dtype="bf16", backend=backend)(x.cuda().bfloat16()).float()
    assert (bf16 - ref).abs().max() <= 6e-2 * ref.abs().max()


def test_evaluate_latency_on_gpu(vit_b16, tmp_path):
    root, _ = vit_b16
    path = root / "export_bsr"
    if not path.exists():
        export_checkpoint(root / "run", path, device="cuda", layout="bsr", echo=lambda _: None)
    latency = {"batch_size": 64, "warmup": 3, "repeats": 12, "rounds": 3}
    result = evaluate(
        path,
        "bsr",
        device="cuda",
        dtype="bf16",
        accuracy=False,
        latency=latency,
        output=tmp_path / "eval.json",
        echo=lambda _: None,
    )
    assert result["latency"]["bsr"]["median_ms"] > 0 and result["speedup"] > 0
    assert result["weight_bytes"]["bsr"] < 0.3 * result["weight_bytes"]["folded"]
