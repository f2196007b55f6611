"""Serving runtimes on CPU: load_sparse / make_runtime with runtime=eager|compile|cudagraph, evaluate's runtime option.

CUDA graphs need a GPU (tests/gpu/test_export_gpu.py); here cudagraph must fall back to eager with a warning.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from superblock.evaluate import evaluate
from superblock.export import ServingModel, export_checkpoint, load_sparse, make_runtime
from superblock.kernels import BlockSparseLinear, tuning
from tests.helpers.runs import logits, make_run, probe


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    make_run(root / "run", sparsity=0.75)
    export_checkpoint(root / "run", root / "export", device="cpu", layout="bsr", probe_batch=2, echo=lambda _: None)
    return root / "export"


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"runtime": "tensorrt"}, r"runtime='tensorrt' is not one of \['eager', 'compile', 'cudagraph'\]"),
        ({"runtime": "compile", "batch_sizes": []}, "non-empty list of positive ints"),
        ({"runtime": "compile", "batch_sizes": [0, 8]}, "positive ints"),
        ({"runtime": "compile", "batch_sizes": [1.5]}, "positive ints"),
        ({"runtime": "compile", "batch_sizes": "8"}, "positive ints"),
        ({"runtime": "compile", "batch_sizes": [2], "compile_options": "max-autotune"}, "compile_options"),
        ({"runtime": "eager", "compile_options": {"mode": "default"}}, "not 'eager'"),
        ({"runtime": "compile", "compile_options": False}, "use runtime='eager'"),
    ],
)
def test_bad_runtime_options(exported, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_sparse(exported, **kwargs)


def test_eager_runtime_warms_up_every_layer(exported):
    model = load_sparse(exported, batch_sizes=[1, 4])
    assert not isinstance(model, ServingModel)
    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    tokens = 65  # micro_vit: 64 patches + class token
    assert layers and all(
        set(m.dispatch) == {tuning.token_bucket(tokens), tuning.token_bucket(4 * tokens)} for m in layers
    )
    x = probe(n=3)
    torch.testing.assert_close(logits(model, x), logits(load_sparse(exported), x))


def test_cudagraph_on_cpu_falls_back_to_eager_with_a_warning(exported):
    with pytest.warns(RuntimeWarning, match="cudagraph.*running it eagerly"):
        model = load_sparse(exported, runtime="cudagraph", batch_sizes=[2])
    assert not isinstance(model, ServingModel)
    x = probe(n=2)
    torch.testing.assert_close(logits(model, x), logits(load_sparse(exported), x))


def test_compile_runtime_matches_eager_and_never_recompiles(exported):
    """CPU inductor: one graph per batch size at load, then any batch size (padded up, or split beyond the largest)
    runs without compiling again."""
    eager = load_sparse(exported)
    model = load_sparse(exported, runtime="compile", batch_sizes=[2, 4])
    assert isinstance(model, ServingModel) and model.batch_sizes == (2, 4)
    assert counters["stats"]["unique_graphs"] == 2
    assert sum(isinstance(m, BlockSparseLinear) for m in model.modules()) > 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (1, 2, 3, 4, 9):
            x = probe(n=n)
            torch.testing.assert_close(logits(model, x), logits(eager, x), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2
    assert model.bucket(3) == 4 and model.bucket(9) == 4


def test_make_runtime_on_any_model():
    """A plain model (the dense baseline of a benchmark) gets the same runtime; sample_shape is needed when the
    model does not say its input size."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 5)).eval()
    with pytest.raises(ValueError, match="sample_shape"):
        make_runtime(net, "compile", batch_sizes=[2])
    served = make_runtime(net, "compile", batch_sizes=[2, 8], sample_shape=(12,), compile_options={"backend": "eager"})
    x = torch.randn(5, 12)
    with torch.no_grad():
        torch.testing.assert_close(served(x), net(x))
    assert "runtime=compile" in repr(served)


def test_models_of_one_class_each_get_their_graphs():
    """Models of one class share their forward's code object and so Dynamo's per-code recompile limit: every served
    model adds its own room (a dense baseline next to the sparse model must not leave the latter running eagerly)."""
    torch.manual_seed(0)
    # (different widths: models with the same weight shapes share graphs, their weights being graph inputs)
    nets = [nn.Sequential(nn.Linear(12, w), nn.GELU(), nn.Linear(w, 5)).eval() for w in (16, 24, 32)]
    sizes = [1, 2, 3, 4, 5]
    served = [
        make_runtime(n, "compile", batch_sizes=sizes, sample_shape=(12,), compile_options={"backend": "eager"})
        for n in nets
    ]
    assert counters["stats"]["unique_graphs"] == len(nets) * len(sizes)  # none skipped at the limit
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for net, fast in zip(nets, served, strict=True):
            for b in sizes:
                x = torch.randn(b, 12)
                torch.testing.assert_close(fast(x), net(x))
    assert counters["stats"]["unique_graphs"] == len(nets) * len(sizes)


def test_evaluate_with_compile_runtime(exported, tmp_path):
    latency = {"batch_size": 2, "warmup": 1, "repeats": 2, "rounds": 1, "inputs": 2}
    result = evaluate(
        exported,
        "bsr",
        device="cpu",
        accuracy=False,
        latency=latency,
        runtime="compile",
        output=tmp_path / "e.json",
        echo=lambda _: None,
    )
    assert result["runtime"] == "compile" and result["runtime_batch_sizes"] == [2]
    assert result["speedup"] > 0 and result["latency"]["bsr"]["median_ms"] > 0
    with pytest.raises(ValueError, match="runtime"):
        evaluate(exported, "bsr", device="cpu", accuracy=False, latency=latency, runtime="jit", echo=lambda _: None)


@pytest.mark.parametrize("faster", ["dense", "tuned"])
def test_eager_check_against_dense_keeps_the_faster(exported, monkeypatch, faster):
    """The whole-model check: where the tuned block-sparse kernels make the model slower than dense kernels, the
    layers' choices for that batch size become dense (else they stay); the outputs stay the same. The clock is
    a stand-in that charges each block-sparse (or each dense) kernel, so the test does not depend on CPU timing."""
    from superblock.export import serving

    def fake_time(model, x, reps):
        plans = [p[0] for m in model.modules() if isinstance(m, BlockSparseLinear) for p in m._plans.values()]
        return 1.0 + sum((kind == "dense") == (faster == "tuned") for kind in plans)

    monkeypatch.setattr(serving, "wall_ms", fake_time)
    model = load_sparse(exported)
    ref = logits(model, probe(n=2))
    served = make_runtime(model, "eager", batch_sizes=[2], sample_shape=(3, 32, 32), check_dense=True)
    report = model.dense_check[2]
    assert served is model and report["kept"] == faster, report
    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    kinds = {e["backend"] for m in layers for e in m.dispatch.values()}
    assert kinds == ({"dense"} if faster == "dense" else {"torch"})  # CPU auto: MKL for fp32 square blocks
    torch.testing.assert_close(logits(model, probe(n=2)), ref)


@pytest.mark.parametrize("faster", ["dense", "tuned"])
def test_compile_check_against_dense_times_the_compiled_graphs(exported, monkeypatch, faster):
    """runtime=compile checks the compiled model, not the eager one: per batch size, the graph traced with the tuned
    choices and the one traced with dense kernels are timed, the faster kept; afterwards calls reuse that graph
    (no recompilation) and give the same outputs. The clock charges what the layers' current choices run."""
    from superblock.export import serving

    model = load_sparse(exported)
    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]

    def fake_time(fn, x, reps):
        kinds = [e["backend"] for m in layers for e in m.dispatch.values()]
        return 1.0 + sum((kind == "dense") == (faster == "tuned") for kind in kinds)

    monkeypatch.setattr(serving, "wall_ms", fake_time)
    ref = logits(model, probe(n=2))
    served = make_runtime(model, "compile", batch_sizes=[2], sample_shape=(3, 32, 32), check_dense=True)
    assert served.dense_check[2]["kept"] == faster, served.dense_check
    # the dense variant's graph reads built dense weights (it would rebuild one per call in the graph otherwise)
    assert all("_dense_weight" in m._buffers for m in layers)
    kinds = {e["backend"] for m in layers for e in m.dispatch.values()}
    assert kinds == ({"dense"} if faster == "dense" else {"torch"})
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(logits(served, probe(n=2)), ref, atol=1e-5, rtol=1e-5)


def test_a_language_model_is_warmed_up_for_its_decode_steps_too(tmp_path):
    """A language model's runtime warm-up (full sequences of the sample's tokens per batch size) also decides every
    block-sparse layer's choice for one token per sequence (the buckets generate()'s compiled or captured decode
    steps run: inside a trace nothing is measured); prepare_for_decoding does the same before generate() and sets
    `auto`'s target. On the CPU the choice is the CPU rule, but the same bookkeeping."""
    from superblock.export import prepare_for_decoding, sample_input, warm_up
    from tests.integration.test_hf_export import LLAMA, export, hf_run

    hf_run(tmp_path / "run", "llama", LLAMA, block_size=8)
    model = load_sparse(export(tmp_path / "run", tmp_path / "exp").path)
    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    assert layers and all(not layer.choices() for layer in layers)
    warm_up(model, [1, 8], sample_input(model))  # full sequences: 32 and 256 tokens
    buckets = {tuning.token_bucket(m) for m in (1, 8)}  # one new token per sequence
    assert all(buckets <= set(layer.choices()) for layer in layers)
    assert all({tuning.token_bucket(32), tuning.token_bucket(256)} <= set(layer.choices()) for layer in layers)
    model = load_sparse(tmp_path / "exp")
    assert prepare_for_decoding(model, [1, 64], target="graph") == len(layers)
    assert all(layer.tuning_target == "graph" for layer in model.modules() if isinstance(layer, BlockSparseLinear))
    want = {tuning.token_bucket(1), tuning.token_bucket(64)}
    assert all(set(layer.choices()) == want for layer in model.modules() if isinstance(layer, BlockSparseLinear))
