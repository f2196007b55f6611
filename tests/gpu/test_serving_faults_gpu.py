"""Serving faults under CUDA graphs: a batch beyond every captured size, inputs of another dtype / device / shape,
calls from several threads (and CUDA streams), a re-export read again, what loading logs. Quick: CUDA graphs of the
eager model (compile_options=False) of a micro ViT; the compiled variant is covered by test_runtime_gpu.py.

Run on a CUDA machine: python -m pytest -m gpu tests/gpu/test_serving_faults_gpu.py
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/gpu is not a package: reach tests.unit

from superblock.export import ServingModel, export_checkpoint, load_sparse  # noqa: E402
from tests.helpers.runs import make_run, probe  # noqa: E402

BF16_TOL = 3e-2  # max |diff| / max |reference logit| (bf16 through a different batch size's kernels)


def export(root: Path, name: str, seed: int, out: Path | None = None, overwrite: bool = False) -> Path:
    run = root / f"run_{name}"
    if not run.exists():
        make_run(run, "micro_vit", sparsity=0.75, block_size=16, targets=("all_linear",), seed=seed)
    out = out or root / name
    export_checkpoint(run, out, device="cuda", layout="bsr", echo=lambda _: None, overwrite=overwrite)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_gpu")
    export(root, "a", seed=0)
    return root


@pytest.fixture(scope="module")
def served(root):
    model = load_sparse(
        root / "a", device="cuda", dtype="bf16", runtime="cudagraph", batch_sizes=[1, 4], compile_options=False
    )
    assert isinstance(model, ServingModel) and model.runtime == "cudagraph"
    return model


@pytest.fixture(scope="module")
def eager(root):
    return load_sparse(root / "a", device="cuda", dtype="bf16")


def close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    got, ref = got.float(), ref.float()
    assert torch.isfinite(got).all(), what
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol, f"{what}: {err:.2e} > {tol:.0e}"


def images(n: int, seed: int = 1) -> torch.Tensor:
    return probe(n=n, seed=seed).cuda().bfloat16()


@torch.no_grad()
def test_a_batch_beyond_every_captured_size_runs_in_chunks(served, eager):
    x = images(9)
    y = served(x)
    assert y.shape == (9, 10) and y.dtype == torch.bfloat16
    chunks = torch.cat([served(x[:4]), served(x[4:8]), served(x[8:])])  # the graphs of 4, 4 and 1
    torch.testing.assert_close(y, chunks, atol=0, rtol=0)
    close(y, eager(x), BF16_TOL, "n=9 vs eager")


@torch.no_grad()
def test_inputs_of_another_dtype_or_device_are_cast(served):
    x = probe(n=3, seed=2)  # float32, on the CPU
    y = served(x)
    assert y.device.type == "cuda" and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, served(x.cuda().bfloat16()), atol=0, rtol=0)
    torch.testing.assert_close(served(x.double().cuda()), y, atol=0, rtol=0)


@pytest.mark.parametrize(
    "shape,dtype,match",
    [
        (
            (2, 3, 16, 16),
            torch.bfloat16,
            r"takes float inputs of shape \(batch, 3, 32, 32\), got a bfloat16 tensor "
            r"of shape \(2, 3, 16, 16\)",
        ),
        ((2, 3, 1, 1), torch.bfloat16, r"\(2, 3, 1, 1\)"),  # would broadcast into the static buffer, silently
        ((2, 3, 32, 32), torch.int64, r"got a int64 tensor"),
    ],
)
def test_inputs_no_graph_can_run_are_a_clear_error(served, shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        served(torch.zeros(shape, dtype=dtype, device="cuda"))


def test_the_eager_model_refuses_an_input_on_another_device(eager):
    """runtime=eager is the model itself: torch's own check names both sides (no silent copy)."""
    with pytest.raises(RuntimeError, match=r"cuda|CUDA|device"):
        eager(probe(n=2).bfloat16())


@torch.no_grad()
@pytest.mark.parametrize("streams", [False, True])
def test_threads_calling_one_cudagraph_model_get_their_own_answers(served, streams):
    """The graphs share static input / output buffers and one memory pool: each call's copy-in, replay and
    copy-out run alone (a lock), and a call on another stream first waits for the last call's GPU work."""
    inputs = [images(n=(1, 2, 3, 4, 6)[i % 5], seed=10 + i) for i in range(32)]
    expected = [served(x).float() for x in inputs]
    torch.cuda.synchronize()
    results: dict[int, torch.Tensor] = {}

    def worker(k: int) -> None:
        stream = torch.cuda.Stream() if streams else torch.cuda.current_stream()
        with torch.cuda.stream(stream):
            for i in range(k, len(inputs), 4):
                results[i] = served(inputs[i])
            stream.synchronize()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert sorted(results) == list(range(len(inputs)))
    for i, y in results.items():
        close(y, expected[i], 1e-2, f"call {i} ({len(inputs[i])} images)")


@torch.no_grad()
def test_a_reexported_directory_loads_the_new_weights(root, tmp_path):
    out, x = tmp_path / "exp", images(4, seed=3)
    export(root, "a", seed=0, out=out)
    first = load_sparse(out, device="cuda", dtype="bf16", runtime="cudagraph", batch_sizes=[4], compile_options=False)
    y_a = first(x).clone()
    export(root, "b", seed=1, out=out, overwrite=True)
    second = load_sparse(out, device="cuda", dtype="bf16", runtime="cudagraph", batch_sizes=[4], compile_options=False)
    close(second(x), load_sparse(out, device="cuda", dtype="bf16")(x), BF16_TOL, "re-export vs its eager model")
    assert not torch.allclose(second(x).float(), y_a.float(), atol=1e-2)
    torch.testing.assert_close(first(x), y_a, atol=0, rtol=0)  # the first model still serves its own graphs


def test_loading_logs_each_capture_with_its_time(root, caplog):
    caplog.set_level(logging.INFO, logger="superblock.export")
    load_sparse(root / "a", device="cuda", dtype="bf16", runtime="cudagraph", batch_sizes=[1, 2], compile_options=False)
    text = "\n".join(r.getMessage() for r in caplog.records)
    for b in (1, 2):
        assert f"warmed up batch {b} in " in text and "captured its CUDA graph in " in text, text
    assert "ready for runtime=cudagraph in" in text, text
