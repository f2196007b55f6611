"""Serving runtimes on a CUDA GPU: compile and cudagraph give the eager model's outputs in every dtype, with no
recompilation after load, and the block-sparse custom op inside compiled / captured code.

Run on a CUDA machine: python -m pytest -m gpu tests/gpu/test_runtime_gpu.py (needs no hydra / omegaconf).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("fresh_dynamo"),  # tests/conftest.py
]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/gpu is not a package: reach tests.unit

from superblock.export import ServingModel, export_checkpoint, load_sparse  # noqa: E402
from superblock.kernels import BlockSparseLinear  # noqa: E402
from tests.helpers.runs import make_run, probe  # noqa: E402

TOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}  # max |diff| / max |eager logit|


@pytest.fixture(scope="module")
def micro_export(tmp_path_factory):
    """micro_vit (hidden 64, MLP 128) with every linear masked at block 16: the triton kernel runs everywhere."""
    root = tmp_path_factory.mktemp("runtime_gpu")
    make_run(root / "run", "micro_vit", sparsity=0.75, block_size=16, targets=("all_linear",))
    export_checkpoint(root / "run", root / "export", device="cuda", layout="bsr", echo=lambda _: None)
    return root / "export"


def close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    got, ref = got.float(), ref.float()
    assert torch.isfinite(got).all(), what
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol, f"{what}: {err:.2e} > {tol:.0e}"


CASES = [(rt, dt, "auto") for rt in ("compile", "cudagraph") for dt in ("bf16", "fp16", "fp32")]
CASES += [("compile", "bf16", "triton"), ("cudagraph", "bf16", "triton"), ("cudagraph+compile", "bf16", "auto")]


@pytest.mark.parametrize("runtime,dtype,backend", CASES)
def test_runtime_matches_eager(micro_export, runtime, dtype, backend):
    eager = load_sparse(micro_export, device="cuda", dtype=dtype, backend=backend)
    # cudagraph compiles before capturing by default; plain "cudagraph" here captures the eager model
    options = False if runtime == "cudagraph" else None
    runtime = runtime.split("+")[0]
    served = load_sparse(
        micro_export,
        device="cuda",
        dtype=dtype,
        backend=backend,
        runtime=runtime,
        batch_sizes=[1, 4],
        compile_options=options,
    )
    assert isinstance(served, ServingModel) and served.runtime == runtime
    assert served.compiled == (options is None)
    layers = [m for m in served.modules() if isinstance(m, BlockSparseLinear)]
    assert layers and all(m.tuning_target == ("graph" if runtime == "cudagraph" else "eager") for m in layers)
    if backend == "triton":
        assert all(e["backend"] == "triton" for m in layers for e in m.dispatch.values())
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for n in (1, 3, 4, 6):  # exact, padded, exact, split into 4 + 2
            x = probe(n=n).cuda()
            ref = eager(x.to(eager_dtype(eager)))
            out = served(x)
            assert out.shape == ref.shape and out.dtype == ref.dtype
            close(out, ref, TOL[dtype], f"{runtime} {dtype} {backend} n={n}")
            if runtime == "cudagraph" and not served.compiled and n in (1, 4):  # the eager model's kernels
                torch.testing.assert_close(out, served.model(x.to(out.dtype)), atol=0, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs
    if served.compiled:
        # made at load: one per batch size, plus (runtime=compile) the dense variants its whole-model check traced
        extra = len(served.batch_sizes) if runtime == "compile" else 0
        assert len(served.batch_sizes) <= graphs <= len(served.batch_sizes) + extra


def eager_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def test_cudagraph_outputs_are_not_overwritten(micro_export):
    served = load_sparse(
        micro_export, device="cuda", dtype="bf16", runtime="cudagraph", batch_sizes=[2], compile_options=False
    )
    a, b = probe(n=2, seed=1).cuda(), probe(n=2, seed=2).cuda()
    with torch.no_grad():
        ya = served(a)
        ya_copy = ya.clone()
        served(b)
    torch.testing.assert_close(ya, ya_copy, atol=0, rtol=0)
