"""generate(..., custom_generate=graph_decoding): the same tokens as transformers' own loop, on an exported
block-sparse Llama (CPU: the step runs eagerly in the same loop; tests/gpu/test_graph_decoding_gpu.py replays its
CUDA graph)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from superblock.export import decoding, graph_decoding, load_sparse
from tests.integration.test_hf_export import LLAMA, VOCAB, count, export, hf_run

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    hf_run(root / "run", "llama", {**LLAMA, "initializer_range": 0.5})  # weights large enough that positions and
    export(root / "run", root / "exp")  # the cache change the tokens (at the default 0.02 they barely do)
    model = load_sparse(root / "exp")
    assert count(model, "BlockSparseLinear") == 6
    return model


def prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def both(model, prompt, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' loop and graph_decoding on the same static-cache call (sampling: the same seed each)."""
    kw = {"cache_implementation": "static", "pad_token_id": 0, **kw}
    torch.manual_seed(5)
    want = model.generate(prompt, **kw)
    torch.manual_seed(5)
    got = model.generate(prompt, custom_generate=graph_decoding, **kw)
    return want, got


@pytest.fixture
def chunks(monkeypatch) -> list:
    """The greedy chunks decoded (one entry per `_StepGraph.chunk` call: on a CPU the chunk runs, not its graph)."""
    calls, chunk = [], decoding._StepGraph.chunk

    def counted(step) -> None:
        calls.append(step.chunk_len)
        chunk(step)

    monkeypatch.setattr(decoding._StepGraph, "chunk", counted)
    return calls


def test_greedy_tokens_equal_transformers_loop_at_batch_1_and_3(llama, chunks):
    """Greedy without processors (generate()'s default): the first token from the prompt's logits, then chunks of
    CHECK_EVERY tokens, then the tail short of a chunk token by token (21 and 40 new tokens: 1 + 16 + 4, 1 + 32 + 7)."""
    for batch in (1, 3):
        for new in (21, 40):
            chunks.clear()
            want, got = both(llama, prompts(batch, 7), max_new_tokens=new, do_sample=False)
            assert want.shape == (batch, 7 + new) and torch.equal(got, want)
            assert chunks == [decoding.CHECK_EVERY] * ((new - 1) // decoding.CHECK_EVERY)


def test_left_padded_prompts_decode_as_transformers_does(llama, chunks):
    prompt = prompts(3, 9, seed=1)
    mask = torch.ones_like(prompt)
    mask[0, :4], mask[2, :1] = 0, 0
    prompt = prompt.masked_fill(mask == 0, 0)
    for new in (12, 40):  # token by token; in chunks
        want, got = both(llama, prompt, attention_mask=mask, max_new_tokens=new, do_sample=False)
        assert torch.equal(got, want)
    assert len(chunks) == 2


def test_an_end_of_sequence_inside_a_chunk_pads_the_row_and_cuts_where_transformers_stops(llama, chunks):
    prompt = prompts(2, 6, seed=7)  # row 1 emits the model's end of sequence (2) as its eighth new token
    want, got = both(llama, prompt, max_new_tokens=40, do_sample=False)
    assert want.shape == (2, 46) and want[1, 6 + 7] == 2 and (want[1, 6 + 8 :] == 0).all()  # padded after
    assert torch.equal(got, want)
    prompt = prompts(1, 7, seed=1)
    free, _ = both(llama, prompt, max_new_tokens=40, do_sample=False)
    eos = int(free[0, 7 + 5])  # the sixth new token (the fifth of the first chunk) ends the only row
    assert eos not in free[0, 7 : 7 + 5].tolist()
    chunks.clear()
    want, got = both(llama, prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos)
    assert want.shape == (1, 13) and torch.equal(got, want)
    assert len(chunks) == 1  # the host saw after the first chunk that every row had ended


def test_minimum_length_floors_ban_the_end_of_sequence_inside_chunks_as_transformers_does(llama, chunks):
    prompt = prompts(2, 6, seed=7)  # without a floor row 1 ends at its eighth new token (the chunk's seventh)
    floors = [{"min_new_tokens": 12}, {"min_length": 6 + 10}, {"min_new_tokens": 9, "min_length": 6 + 13}]
    for floor in [*floors, {"min_new_tokens": 7}]:  # the last one lifts just before the end of sequence
        chunks.clear()
        want, got = both(llama, prompt, max_new_tokens=40, do_sample=False, **floor)
        assert (want[1, 6 + 7] == 2) == (floor == {"min_new_tokens": 7}) and torch.equal(got, want)
        assert len(chunks) == 2


def test_a_step_kept_with_its_cache_reads_each_calls_floors_end_of_sequence_and_padding(llama, chunks):
    """A cache passed to generate() keeps its step (on a GPU: the chunk's graph) from call to call: each call's
    length floors, end-of-sequence ids and padding go into the step's buffers, none is kept from an earlier call."""
    from transformers import StaticCache

    prompt = prompts(2, 6, seed=7)  # row 1 ends on the model's end of sequence (2) at its eighth new token
    cache = StaticCache(config=llama.config, max_cache_len=6 + 40 - 1)  # as generate() sizes its own
    cache_kw = decoding.cache_kwarg(llama)
    free, _ = both(llama, prompt, max_new_tokens=40, do_sample=False)
    eos = int(free[0, 6 + 5])
    for call in ({"min_new_tokens": 12}, {}, {"eos_token_id": eos, "pad_token_id": 7}, {"min_length": 6 + 10}, {}):
        kw = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 0, **call}
        want = llama.generate(prompt, cache_implementation="static", **kw)
        cache.reset()  # a cache passed in is the caller's to reset
        got = llama.generate(prompt, custom_generate=graph_decoding, **{cache_kw: cache}, **kw)
        assert torch.equal(got, want)
    kept = {id(s) for s in llama.__dict__["_superblock_step_graphs"].values() if s.cache is cache}
    assert len(kept) == 1 and chunks


def test_length_floors_mask_what_the_minimum_length_processors_mask():
    from transformers.generation import logits_process as lp

    config = SimpleNamespace(do_sample=False, _eos_token_tensor=torch.tensor([2, 5]), _pad_token_tensor=torch.tensor(0))
    processors = lp.LogitsProcessorList([lp.MinLengthLogitsProcessor(9, [2, 5]),
                                         lp.MinNewTokensLengthLogitsProcessor(4, 7, 5)])  # fmt: skip
    floor = decoding._length_floors(processors, config, VOCAB)  # token 2 banned below length 9, token 5 below 11
    scores = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    for length in range(4, 16):
        want = processors(torch.zeros(2, length, dtype=torch.long), scores)
        assert torch.equal(scores.masked_fill(length < floor, -float("inf")), want)
    assert torch.equal(decoding._length_floors(lp.LogitsProcessorList(), config, VOCAB), torch.zeros(VOCAB).long())
    repeats = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.3)])
    assert decoding._length_floors(repeats, config, VOCAB) is None  # other processors, sampling: token by token
    sampled, unpadded = SimpleNamespace(**vars(config)), SimpleNamespace(**vars(config))
    sampled.do_sample, unpadded._pad_token_tensor = True, None
    assert decoding._length_floors(lp.LogitsProcessorList(), sampled, VOCAB) is None
    assert decoding._length_floors(lp.LogitsProcessorList(), unpadded, VOCAB) is None


def test_other_processors_and_sampling_decode_token_by_token(llama, chunks):
    prompt = prompts(2, 7, seed=8)
    want, got = both(llama, prompt, max_new_tokens=40, do_sample=False, repetition_penalty=1.3)
    assert torch.equal(got, want)
    want, got = both(llama, prompt, max_new_tokens=40, do_sample=True)
    assert torch.equal(got, want) and not chunks


def test_sampling_with_processors_draws_what_transformers_draws(llama):
    want, got = both(llama, prompts(2, 5, seed=2), max_new_tokens=10, do_sample=True, temperature=0.7, top_k=8,
                     repetition_penalty=1.3)  # fmt: skip
    assert torch.equal(got, want)


def test_end_of_sequence_pads_finished_rows_and_cuts_where_transformers_stops(llama):
    prompt = prompts(2, 6, seed=3)
    free, _ = both(llama, prompt, max_new_tokens=40, do_sample=False)
    eos = int(free[0, 8])  # row 0 ends after its third new token; row 1 when (if) it first emits the same token
    want, got = both(llama, prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos)
    assert want.shape[1] < free.shape[1] or bool((free[1, 6:] == eos).any()) is False
    assert torch.equal(got, want)
    assert (got[0, 9:] == 0).all()  # padding after row 0's end


def test_the_host_checks_for_finished_rows_only_every_few_tokens(llama, monkeypatch):
    """Both rows end early: the loop runs on up to CHECK_EVERY - 1 tokens past the end, and the output is cut back."""
    monkeypatch.setattr(decoding, "CHECK_EVERY", 5)
    prompt = prompts(1, 6, seed=4)
    free, _ = both(llama, prompt, max_new_tokens=30, do_sample=False)
    eos = int(free[0, 7])  # ends after 2 new tokens
    want, got = both(llama, prompt, max_new_tokens=30, do_sample=False, eos_token_id=eos)
    assert want.shape == (1, 8) and torch.equal(got, want)


def test_what_a_graph_cannot_serve_runs_transformers_loop_with_a_warning(llama):
    prompt = prompts(2, 5, seed=6)
    want = llama.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)  # a dynamic cache
    with pytest.warns(RuntimeWarning, match="not a StaticCache"):
        got = llama.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, custom_generate=graph_decoding)
    assert torch.equal(got, want)
    with pytest.warns(RuntimeWarning, match="return_dict_in_generate"):
        out = llama.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static",
                             return_dict_in_generate=True, custom_generate=graph_decoding)  # fmt: skip
    assert torch.equal(out.sequences, want)
    with pytest.warns(RuntimeWarning, match="stopping criteria"):
        got = llama.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static",
                             max_time=60.0, custom_generate=graph_decoding)  # fmt: skip
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="beam search"):
        llama.generate(prompt, max_new_tokens=6, num_beams=2, pad_token_id=0, custom_generate=graph_decoding)


def test_step_buffers_are_kept_per_cache_and_batch(llama):
    llama.__dict__.pop("_superblock_step_graphs", None)
    for batch in (1, 2, 1):
        both(llama, prompts(batch, 5), max_new_tokens=4, do_sample=False)
    graphs = llama.__dict__["_superblock_step_graphs"]
    assert 1 <= len(graphs) <= decoding.KEEP_GRAPHS and list(graphs.values())[-1].tok.shape[0] == 1


def test_generates_own_static_caches_share_one_kept_step(llama, monkeypatch):
    """generate(cache_implementation="static") makes a new, empty cache every call: the kept step of the same batch
    and cache length (on a GPU: its captured graphs) serves the next calls with its own cache, reset, and gives
    transformers' tokens each time; a longer call gets a step of its own, and so does a cache the caller passes."""
    from transformers import StaticCache

    llama.__dict__.pop("_superblock_step_graphs", None)
    built, init = [], decoding._StepGraph.__init__
    counted = lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1]  # noqa: E731
    monkeypatch.setattr(decoding._StepGraph, "__init__", counted)
    llama._previous_max_cache_length = -1  # generate() sizes its caches to the longest call so far
    for seed in (0, 1, 2):
        want, got = both(llama, prompts(2, 6, seed=seed), max_new_tokens=20, do_sample=False)
        assert torch.equal(got, want)
    assert len(built) == 1
    want, got = both(llama, prompts(2, 6, seed=3), max_new_tokens=30, do_sample=False)
    assert torch.equal(got, want) and len(built) == 2
    cache = StaticCache(config=llama.config, max_cache_len=6 + 30 - 1)
    got = llama.generate(prompts(2, 6, seed=3), custom_generate=graph_decoding, max_new_tokens=30, do_sample=False,
                         pad_token_id=0, **{decoding.cache_kwarg(llama): cache})  # fmt: skip
    assert torch.equal(got, want) and len(built) == 3 and cache.is_initialized
