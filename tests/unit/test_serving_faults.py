"""Serving faults on the CPU: an export edited after loading or while loading, inconsistent or corrupt files, inputs
of the wrong dtype / kind / shape, batches beyond every compiled size, calls from several threads, and what loading
logs. (CUDA graphs: tests/gpu/test_serving_faults_gpu.py.)"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from superblock.artifacts import folded as folded_mod
from superblock.artifacts.format import WEIGHTS
from superblock.export import ExportError, ServingModel, export_checkpoint, load_sparse
from tests.helpers.runs import logits, make_run, probe

pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py
EAGER_COMPILE = {"backend": "eager"}  # Dynamo's graphs without inductor's codegen: the serving logic, fast


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Exports a and b (same model and sparsity, other weights and masks) and c (another sparsity)."""
    root = tmp_path_factory.mktemp("faults")
    for name, seed, sparsity in (("a", 0, 0.75), ("b", 1, 0.75), ("c", 0, 0.5)):
        make_run(root / f"run_{name}", sparsity=sparsity, seed=seed)
        export_checkpoint(
            root / f"run_{name}", root / name, device="cpu", layout="bsr", probe_batch=2, echo=lambda _: None
        )
    return root


@pytest.fixture
def copy_of_a(root, tmp_path):
    shutil.copytree(root / "a", tmp_path / "a")
    return tmp_path / "a"


# ------------------------------------------------------------------------------------------ the export's files


def test_files_edited_after_loading_do_not_reach_the_loaded_model(root, copy_of_a):
    """safetensors maps the file: a model that kept mapped tensors changed with an in-place edit and died (SIGBUS)
    when the file was truncated."""
    model, x = load_sparse(copy_of_a), probe(n=2)
    before = logits(model, x)
    other = (root / "b" / WEIGHTS).read_bytes()
    with open(copy_of_a / WEIGHTS, "r+b") as f:  # in place: the same inode, as `cp` or an editor writes it
        f.write(other)
        f.truncate()
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)
    with open(copy_of_a / WEIGHTS, "r+b") as f:
        f.truncate(0)
    torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)
    with pytest.raises(ExportError, match="sha256 differs"):  # a re-load checks the file again
        load_sparse(copy_of_a)


def test_a_reload_after_a_new_export_reads_the_new_weights(root, tmp_path):
    """The same directory exported again (another run) and loaded again, in the same process, compiled: the new
    weights are served, not the old model's graphs or cached kernels' state."""
    out, x = tmp_path / "exp", probe(n=2)
    export_checkpoint(root / "run_a", out, device="cpu", layout="bsr", probe_batch=2, echo=lambda _: None)
    first = load_sparse(out, runtime="compile", batch_sizes=[2])
    y_a = logits(first, x)
    export_checkpoint(
        root / "run_b", out, device="cpu", layout="bsr", probe_batch=2, echo=lambda _: None, overwrite=True
    )
    second = load_sparse(out, runtime="compile", batch_sizes=[2])
    y_b = logits(second, x)
    torch.testing.assert_close(y_b, logits(load_sparse(root / "b"), x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y_a, y_b, atol=1e-3)
    torch.testing.assert_close(logits(first, x), y_a, atol=0, rtol=0)  # the first model still serves its own


def _save_edited(src, dst, edit) -> None:
    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dst))


@pytest.mark.parametrize("case", ["garbage", "other_sparsity", "columns_out_of_range", "row_pointers_step_back"])
def test_inconsistent_or_corrupt_weights_are_a_clear_error_even_unverified(root, copy_of_a, case):
    """verify=False skips the sha256 check, not the checks that keep a kernel inside its tensors."""
    file = copy_of_a / WEIGHTS
    col = next(k for k in load_file(str(file)) if k.endswith(".col_indices"))
    crow = col.replace(".col_indices", ".crow_indices")
    if case == "garbage":
        file.write_bytes(os.urandom(4096))
        match = "cannot be read as safetensors"
    elif case == "other_sparsity":
        shutil.copyfile(root / "c" / WEIGHTS, file)
        match = "of .* do not fit the manifest .* shapes"
    elif case == "columns_out_of_range":
        _save_edited(file, file, lambda t: t[col].__setitem__(0, 10_000))
        match = "of .* do not fit the manifest .* outside the .* block grid or step back"
    else:
        _save_edited(file, file, lambda t: t[crow].__setitem__(1, t[crow][-1] + 1))
        match = "of .* do not fit the manifest .* outside the .* block grid or step back"
    with pytest.raises(ExportError, match=match):
        load_sparse(copy_of_a, verify=False)
    with pytest.raises(ExportError, match="sha256 differs"):
        load_sparse(copy_of_a)


def test_a_file_replaced_while_loading_is_refused(root, copy_of_a, monkeypatch):
    """What the sha256 check read must be what is loaded: an export written over the directory in between is an
    error, not an unchecked load."""
    real = folded_mod.verify_file

    def verify_then_replace(path, manifest, key):
        result = real(path, manifest, key)
        shutil.copyfile(root / "b" / WEIGHTS, copy_of_a / "new")
        os.replace(copy_of_a / "new", copy_of_a / WEIGHTS)
        return result

    monkeypatch.setattr(folded_mod, "verify_file", verify_then_replace)
    with pytest.raises(ExportError, match="changed while it was being loaded"):
        load_sparse(copy_of_a)


# ------------------------------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def eager_a(root):
    return load_sparse(root / "a")


@pytest.fixture
def served(root):
    return load_sparse(root / "a", runtime="compile", batch_sizes=[2, 4], compile_options=EAGER_COMPILE)


def test_a_batch_beyond_every_compiled_size_runs_in_chunks(served, eager_a):
    for n in (5, 9):
        x = probe(n=n)
        torch.testing.assert_close(logits(served, x), logits(eager_a, x), atol=1e-5, rtol=1e-5)


def test_float_inputs_of_another_dtype_are_cast_to_the_models(served, eager_a):
    x = probe(n=3)
    torch.testing.assert_close(served(x.double()), logits(eager_a, x), atol=1e-5, rtol=1e-5)
    y = served(x.bfloat16())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, logits(eager_a, x.bfloat16().float()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "bad,match",
    [
        (
            torch.zeros(2, 3, 32, 32, dtype=torch.int64),
            r"takes float inputs of shape \(batch, 3, 32, 32\), got a "
            r"int64 tensor of shape \(2, 3, 32, 32\)",
        ),
        (torch.zeros(3, 32, 32), r"got a float32 tensor of shape \(3, 32, 32\)"),  # one image, no batch dimension
        ([[0.0]], "takes a tensor of float inputs .* got list"),
    ],
)
def test_inputs_no_graph_can_run_are_a_clear_error(served, bad, match):
    with pytest.raises(ValueError, match=match):
        served(bad)


def test_the_eager_model_refuses_another_dtype_naming_both(eager_a):
    """runtime=eager returns the model itself: torch's own check, which names both dtypes (no silent cast)."""
    with pytest.raises(RuntimeError, match=r"double.*float"):
        eager_a(probe(n=2).double())


# ------------------------------------------------------------------------------------------------ threads


def test_calls_from_several_threads_are_correct_and_run_one_at_a_time(served, eager_a):
    inputs = [probe(n=1 + i % 6, seed=i) for i in range(24)]
    expected = [logits(eager_a, x) for x in inputs]
    inside, most, real = [0], [0], served._run_locked

    def watched(x):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.002)  # long enough for another thread to get in, were there no lock
        try:
            return real(x)
        finally:
            inside[0] -= 1

    served._run_locked = watched
    results: dict[int, torch.Tensor] = {}

    def worker(k: int) -> None:
        for i in range(k, len(inputs), 6):
            results[i] = served(inputs[i])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and sorted(results) == list(range(len(inputs)))
    for i, y in results.items():
        torch.testing.assert_close(y, expected[i], atol=1e-5, rtol=1e-5)


def test_the_eager_model_called_from_several_threads_is_correct(root):
    """runtime=eager is the model itself, with no lock: concurrent calls (each layer's kernel choice and derived
    tensors made on first use, possibly in two threads at once) still give every caller its own answer."""
    model = load_sparse(root / "a")
    inputs = [probe(n=1 + i % 5, seed=i) for i in range(20)]
    ref = load_sparse(root / "a")  # another copy, called from this thread alone
    expected = [logits(ref, x) for x in inputs]
    results: dict[int, torch.Tensor] = {}

    def worker(k: int) -> None:
        for i in range(k, len(inputs), 4):
            results[i] = logits(model, inputs[i])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(len(inputs)))
    for i, y in results.items():
        torch.testing.assert_close(y, expected[i], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ logging


def test_loading_says_what_it_compiles_with_timings(root, caplog):
    caplog.set_level(logging.INFO, logger="superblock.export")
    model = load_sparse(root / "a", runtime="compile", batch_sizes=[1, 2], compile_options=EAGER_COMPILE)
    assert isinstance(model, ServingModel)
    text = "\n".join(r.getMessage() for r in caplog.records)
    for expected in (
        r"loading .*a \(runtime=compile\)",
        r"built the model \(\d+ block-sparse weights\) on cpu in",
        r"warmed up at batch sizes \[1, 2\] .* in \d+\.\d s",
        r"cold compile cache",
        r"compiled batch 1 in \d+\.\d s",
        r"compiled batch 2 in \d+\.\d s",
        r"ready for runtime=compile in \d+\.\d s",
    ):
        assert any(re.search(expected, line) for line in text.splitlines()), (expected, text)
