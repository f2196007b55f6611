"""graph_decoding on a GPU: the step is captured and replayed (run on the device: python -m pytest -m gpu tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from superblock.export import decoding, graph_decoding, load_sparse
from tests.integration.test_hf_export import LLAMA, export, hf_run

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")


def exported(tmp_path):
    """A block-sparse Llama of 512 tokens on the GPU, in fp32 (the replayed step computes what the eager one does)."""
    config = {**LLAMA, "hidden_size": 256, "intermediate_size": 512, "max_position_embeddings": 256}
    hf_run(tmp_path / "run", "llama", config, num_classes=512, block_size=32)
    export(tmp_path / "run", tmp_path / "exp", device="cuda")
    return load_sparse(tmp_path / "exp", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_step_replays_a_graph_and_decodes_what_the_eager_loop_decodes(tmp_path):
    model = exported(tmp_path)
    prompt = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    kw = {"max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False, "cache_implementation": "static",
          "pad_token_id": 0}  # fmt: skip
    want = model.generate(prompt, **kw)
    for compile_step in (False, True):
        got = model.generate(prompt, custom_generate=graph_decoding, compile_step=compile_step, **kw)
        steps = [s for s in model.__dict__["_superblock_step_graphs"].values() if s.graph is not None]
        assert steps and got.shape == want.shape == (2, 36)
        assert all(s.chunk_graph is not None for s in steps)  # greedy with a min_new_tokens floor: 1 + 16 + 7 tokens
        if compile_step:  # inductor's fused kernels round differently: the first new token, and most of the rest
            assert torch.equal(got[:, :13], want[:, :13]) and (got == want).float().mean() >= 0.9
        else:
            assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_compiled_step_runs_measured_choices_for_its_token_count(tmp_path):
    """graph_decoding with compile_step=True on a freshly loaded model: every block-sparse layer measured its choice
    for the step's token count (the batch) before the step was compiled, by GPU time. Inside the compiled step
    nothing is measured, and the prompt's prefill (2 x 24 tokens) is another bucket: without the preparation the
    step's bucket would run an unmeasured stand-in and never appear among the layers' choices."""
    from superblock.kernels import BlockSparseLinear, tuning

    model = exported(tmp_path)
    prompt = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    model.generate(prompt, custom_generate=graph_decoding, compile_step=True, max_new_tokens=4, min_new_tokens=4,
                   do_sample=False, cache_implementation="static", pad_token_id=0)  # fmt: skip
    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    step = tuning.token_bucket(2)
    assert layers and step != tuning.token_bucket(2 * 24)
    assert all(layer.tuning_target == "graph" and layer.choices()[step].measured for layer in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_greedy_chunks_replay_one_graph_per_16_tokens_and_decode_what_transformers_decodes(tmp_path):
    """40 new tokens (the first, two chunk replays, 7 more) under a floor; then with an end of sequence (the floored
    run's sixth token of row 0, likely inside the first chunk), without and with a floor. One cache is passed to every
    call, so that one chunk graph serves them all, reading each call's floors, end-of-sequence ids and padding from
    its buffers; fp32 without compiling, so the tokens equal transformers' own."""
    from transformers import StaticCache

    model = exported(tmp_path)
    prompt = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1)).cuda()
    kw = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 0}
    free = model.generate(prompt, cache_implementation="static", min_new_tokens=40, **kw)
    eos = int(free[0, 12 + 5])  # row 0's sixth new token, the fifth of the first chunk
    calls = ({"min_new_tokens": 40}, {"eos_token_id": eos}, {"eos_token_id": eos, "min_new_tokens": 10})
    wants = [model.generate(prompt, cache_implementation="static", **kw, **call) for call in calls]
    cache = StaticCache(config=model.config, max_cache_len=12 + 40 - 1)  # as generate() sizes its own
    cache_kw = decoding.cache_kwarg(model)
    for call, want in zip(calls, wants, strict=True):
        cache.reset()  # a cache passed in is the caller's to reset
        got = model.generate(prompt, custom_generate=graph_decoding, **{cache_kw: cache}, **kw, **call)
        assert torch.equal(got, want)
    assert wants[0].shape == (2, 52)
    steps = {id(s): s for s in model.__dict__["_superblock_step_graphs"].values() if s.cache is cache}  # a step
    steps = list(steps.values())  # may be kept under two keys (its cache's, and the fresh caches' of its length)
    assert len(steps) == 1 and steps[0].graph is not None and steps[0].chunk_graph is not None
