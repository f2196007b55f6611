"""Decoding through transformers' `generate()` with the one-token step replayed from a CUDA graph.

    from superblock.export import graph_decoding, load_sparse
    lm = load_sparse("exports/<lm run>", device="cuda", dtype="bf16")
    out = lm.generate(ids, max_new_tokens=128, cache_implementation="static", custom_generate=graph_decoding)
    out = lm.generate(..., custom_generate=graph_decoding, compile_step=True)  # the step compiled before capture

`generate()` prepares the inputs, the static KV cache, the logits processors and the stopping criteria as it always
does, then hands its decoding loop to `graph_decoding` (transformers' `custom_generate` hook). The prompt runs
eagerly; every later token's forward (the model over one token per sequence, writing its keys and values into the
static cache) is captured once in a CUDA graph per batch size and cache length and replayed (generate() makes a
new, empty static cache every call: the first call's cache is kept with its graphs and serves the later ones; a
cache the caller passes keeps graphs of its own). The logits processors,
greedy or sampled choice and end-of-sequence bookkeeping run eagerly on the device without waiting for it: the host
checks whether every sequence has finished only every `CHECK_EVERY` tokens, and the output is cut where
transformers' own loop would have stopped. So the host work per token is a replay and a few small launches. (On a
Llama-3-8B-shaped model transformers' own loop with reduce-overhead took 2.3-2.4 ms a token more than a replayed
step, dense and sparse alike: docs/benchmarks.md, "Fused, compiled, and through generate()".)

Greedy decoding and sampling with any logits processors, batch padding (left-padded prompts with their attention
mask), and the stopping criteria of `max_new_tokens` / `max_length` and `eos_token_id` are served this way. Anything
else (no static cache, a streamer, `return_dict_in_generate`, other stopping criteria, extra model inputs) runs
transformers' own loop, with a warning that names why; beam search and assisted decoding are refused. On a CPU the
step (and the chunk below) run eagerly in the same loop. Outputs equal transformers' own decoding token for token on
a CPU (greedy, and sampled under the same seed); on a GPU up to the graph's floating-point order.

Greedy decoding whose only logits processors are minimum lengths (`min_length`, `min_new_tokens`, or none: what
generate() passes by default) goes further: a chunk of `CHECK_EVERY` tokens, each the step's forward then on the
device the end-of-sequence ids banned below the length floors, the argmax, the finished sequences' padding, the token
written at a device-side cursor and fed to the next forward, is captured as one CUDA graph (on first such use, per
step graph) and replayed once per `CHECK_EVERY` tokens, with one host check that some sequence is unfinished per
replay. The first token (from the prompt's logits) and the tail too short for a whole chunk before `max_length` go
through the one-token loop.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections import OrderedDict

import torch
from torch import nn

from superblock.export.serving import prepare_for_decoding, tuning_target
from superblock.timing import capture_graph

CHECK_EVERY = 16  # tokens between the host's checks that every sequence has finished
KEEP_GRAPHS = 4  # step graphs (each holding its KV cache) kept per model, the most recently used
STOPS = frozenset({"MaxLengthCriteria", "EosTokenCriteria"})
INPUTS = frozenset(
    {"attention_mask", "position_ids", "logits_to_keep", "use_cache", "cache", "past_key_values", "cache_position"}
)


def graph_decoding(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    compile_step: bool = False,
    **model_kwargs,
):
    """transformers' decoding loop with the one-token step replayed from a CUDA graph (see the module docstring);
    pass it as `generate(..., custom_generate=graph_decoding)`. `compile_step=True` compiles the step with
    torch.compile before it is captured (slower to start, faster per token). Returns the token ids, prompt first."""
    if getattr(generation_config, "num_beams", 1) > 1 or getattr(generation_config, "prompt_lookup_num_tokens", None):
        raise ValueError("graph_decoding decodes greedily or by sampling: drop custom_generate for beam search")
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    why = _unsupported(model, cache, stopping_criteria, generation_config, synced_gpus, streamer, model_kwargs)
    if why is not None:
        warnings.warn(f"graph_decoding: {why}; decoding with transformers' own loop", RuntimeWarning, stacklevel=2)
        return type(model)._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)  # fmt: skip
    mask = model_kwargs.get("attention_mask")
    padded = mask is not None and not bool(mask.all())
    step = _step_graph(model, cache, input_ids.shape[0], generation_config.max_length, padded, compile_step)
    return decode_loop(step, input_ids, mask if padded else None, logits_processor, generation_config)


def _unsupported(model, cache, stops, config, synced_gpus: bool, streamer, model_kwargs: dict) -> str | None:
    """Why this call cannot be served from a graph (None: it can)."""
    if type(cache).__name__ != "StaticCache":
        return f"the cache is a {type(cache).__name__}, not a StaticCache (pass cache_implementation='static')"
    layers = {type(layer).__name__ for layer in getattr(cache, "layers", [])} - {"StaticLayer"}
    if layers:
        return f"cache layers {sorted(layers)} keep their length on the host (sliding windows)"
    if streamer is not None or synced_gpus:
        return "a streamer or synced_gpus asks for every token on the host as it comes"
    if config.return_dict_in_generate:
        return "return_dict_in_generate asks for per-step scores or states"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder models are not served from a graph"
    other = {type(c).__name__ for c in stops} - STOPS
    if other:
        return f"stopping criteria {sorted(other)} need the host every token"
    extra = {k for k, v in model_kwargs.items() if v is not None and k not in INPUTS}
    if extra:
        return f"model inputs {sorted(extra)} are not fed to the graph"
    return None


def _step_graph(model: nn.Module, cache, batch: int, max_length: int, padded: bool, compile_step: bool) -> _StepGraph:
    """The model's step graph for this cache and batch (captured on first use; the most recent KEEP_GRAPHS kept).

    generate(cache_implementation="static") makes a new, still empty cache on every call: where a step of the same
    batch and cache length is kept, that cache is left unused and the step's own cache is reset and serves the call,
    so the graphs are captured once rather than on every call. A cache the caller passes keeps its own step."""
    graphs = model.__dict__.setdefault("_superblock_step_graphs", OrderedDict())
    shape = (batch, padded, compile_step)
    keys = [(id(cache), *shape)] + ([("fresh", _cache_length(cache), *shape)] if _fresh(cache) else [])
    found = [(k, graphs[k]) for k in keys if k in graphs and (k[0] == "fresh" or graphs[k].cache is cache)]
    key, step = found[0] if found else (keys[-1], None)
    if step is None or step.max_length < max_length:
        step = _StepGraph(model, cache, batch, max_length, padded, compile_step)
        for k in keys:
            graphs[k] = step
    elif step.cache is not cache:
        step.cache.reset()  # the kept cache serves this call in place of generate()'s new one
    graphs.move_to_end(key)
    while len(graphs) > KEEP_GRAPHS:
        graphs.popitem(last=False)
    return step


def _fresh(cache) -> bool:
    """Whether generate() made this cache for the call: not passed by the caller, nothing written into it yet."""
    if getattr(cache, "_is_user_defined", False):
        return False
    return not any(getattr(layer, "is_initialized", True) for layer in cache.layers)


def _cache_length(cache) -> int:
    return max(int(layer.max_cache_len) for layer in cache.layers)


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def cache_kwarg(model: nn.Module) -> str:
    """The name `model.forward` (and generate()) takes the cache by: renamed in transformers 5.2x."""
    return "cache" if "cache" in _forward_params(type(model)) else "past_key_values"


def step_inputs(
    model: nn.Module, cache, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor | None = None
) -> dict:
    """The keyword arguments of a cached forward, `model(input_ids=ids, **step_inputs(...))`, whose tokens sit at
    `positions` and are written into `cache` at `slots`, whatever the transformers 5.x version: the cache's keyword
    was renamed in 5.2x, and older versions write where `cache_position` says."""
    kw = {cache_kwarg(model): cache, "position_ids": positions, "use_cache": True, "logits_to_keep": 1}
    if mask is not None:
        kw["attention_mask"] = mask
    if "cache_position" in _forward_params(type(model)):
        kw["cache_position"] = slots
    return kw


class _StepGraph:
    """Static buffers for one token per sequence (token, its position, the cache slot, the attention mask, the
    logits) and the CUDA graph of the model's forward over them; and for the greedy chunk, the output ids, the cursor
    where the next token goes, the unfinished sequences, the length floors, the end-of-sequence ids and the padding,
    with the chunk's graph (captured on first use)."""

    def __init__(self, model: nn.Module, cache, batch: int, max_length: int, padded: bool, compile_step: bool):
        self.model, self.cache, self.max_length = model, cache, max_length
        self.device = device = next(model.parameters()).device
        vocab = model.config.vocab_size
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.ones(batch, max_length, dtype=torch.long, device=device) if padded else None
        self.logits = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
        self.ids = torch.zeros(batch, max_length, dtype=torch.long, device=device)  # prompt and tokens, as decoded
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)  # the chunk's next column of `ids`
        self.floor = torch.zeros(vocab, dtype=torch.long, device=device)  # per token: banned while the length is less
        self.is_eos = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.pad = torch.zeros((), dtype=torch.long, device=device)
        self.chunk_len = CHECK_EVERY  # tokens per chunk, fixed per step graph (its chunk graph is captured so)
        self.chunk_graph = None
        self.forward = torch.compile(model, dynamic=False) if compile_step else model
        self.graph = None  # on a CPU the step runs eagerly, in the same loop
        if device.type == "cuda":
            # `auto` chooses by GPU time, for this batch's token count, before a compiled step could trace a stand-in
            prepare_for_decoding(model, batch, tuning_target("cudagraph"))
            self.graph = capture_graph(self.step, warmups=2, device=device)
            cache.reset()  # the warm-up steps wrote into it

    def inputs(self, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor | None) -> dict:
        return step_inputs(self.model, self.cache, positions, slots, mask)

    def step(self) -> None:
        out = self.forward(input_ids=self.tok, **self.inputs(self.pos, self.slot, self.mask))
        self.logits.copy_(out.logits[:, -1])
        self.pos.add_(1)
        self.slot.add_(1)

    def take(self, token: torch.Tensor) -> None:
        """`token` (one per sequence) is the next forward's input."""
        self.tok.copy_(token[:, None])

    def advance(self) -> None:
        """The forward over the taken token: the step's graph replayed (on a CPU, the step run)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step()

    def chunk(self) -> None:
        """`chunk_len` greedy tokens without the host: each the forward over the taken token, then the end-of-sequence
        ids banned below their length floors, the argmax, the finished sequences' padding (as transformers' loop),
        the token written at `cursor` and taken for the next forward."""
        for _ in range(self.chunk_len):
            self.step()
            token = self.logits.masked_fill(self.cursor < self.floor, -float("inf")).argmax(dim=-1)
            ended = self.is_eos[token]  # for the unfinished rows, whose token this is
            token = torch.where(self.unfinished, token, self.pad)
            self.unfinished &= ~ended
            self.ids.index_copy_(1, self.cursor, token[:, None])
            self.cursor.add_(1)
            self.take(token)

    def decode_chunk(self, cur: int) -> None:
        """The chunk from column `cur` of `ids` (the token before it taken): its graph replayed (on a CPU, run)."""
        self.cursor.fill_(cur)
        if self.chunk_graph is not None:
            self.chunk_graph.replay()
        else:
            self.chunk()

    def capture_chunk(self) -> None:
        """The chunk's CUDA graph, once (before the prompt: the warm-up writes into the cache, which is reset, and
        into the buffers, which each call sets)."""
        if self.graph is None or self.chunk_graph is not None:
            return
        self.cache.reset()  # the warm-up writes slots and columns from the first on
        for buffer in (self.pos, self.slot, self.cursor):
            buffer.zero_()
        self.chunk_graph = capture_graph(self.chunk, warmups=1, device=self.device)
        self.cache.reset()

    def start(self, input_ids: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`ids` for this call (the prompt, then zeros up to `max_length`) and the unfinished sequences (all)."""
        ids = self.ids[:, :max_length]
        ids.zero_()
        ids[:, : input_ids.shape[1]] = input_ids
        return ids, self.unfinished.fill_(True)

    def set_greedy(self, floor: torch.Tensor, eos: torch.Tensor | None, pad: torch.Tensor | None) -> None:
        """This call's length floors, end-of-sequence ids and padding into the chunk's buffers."""
        self.floor.copy_(floor)
        vocab = torch.arange(self.is_eos.shape[0], device=self.device)
        self.is_eos.copy_(torch.isin(vocab, eos.to(self.device)) if eos is not None else vocab < 0)
        self.pad.copy_(pad.reshape(()) if pad is not None else self.pad.new_zeros(()))

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The prompt through the model eagerly (filling the cache); the step buffers set for the first token."""
        n = input_ids.shape[1]
        if mask is None:
            positions = torch.arange(n, device=input_ids.device).expand(input_ids.shape[0], n)
        else:
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
            self.mask.fill_(1)
            self.mask[:, :n].copy_(mask)
        slots = torch.arange(n, device=input_ids.device)
        prompt_mask = None if mask is None else self.mask[:, :n]
        out = self.model(input_ids=input_ids, **self.inputs(positions, slots, prompt_mask))
        self.pos.copy_(positions[:, -1:] + 1)
        self.slot.fill_(n)
        return out.logits[:, -1].float()


def decode_loop(step, input_ids: torch.Tensor, mask: torch.Tensor | None, processors, config) -> torch.Tensor:
    """Prefill, then one replay of `step.graph` per token (or `step.step()` where there is no graph); the choice
    of each token and the finished sequences' padding as transformers' own loop does them. Greedy decoding with
    only minimum-length processors replays `step.chunk_graph` (or runs `step.chunk()`) per `step.chunk_len` tokens
    where a whole chunk fits before `max_length`."""
    n, end = input_ids.shape[1], config.max_length
    eos, pad = config._eos_token_tensor, config._pad_token_tensor
    floor = _length_floors(processors, config, step.floor.shape[0])
    chunked = floor is not None and n + 1 + step.chunk_len <= end
    if chunked:
        step.capture_chunk()
        step.set_greedy(floor, eos, pad)
    ids, unfinished = step.start(input_ids, end)
    logits, cur = step.prefill(input_ids, mask), n
    while cur < end:
        if cur > n and chunked and cur + step.chunk_len <= end:
            step.decode_chunk(cur)
            cur += step.chunk_len
            if cur == end or (eos is not None and not unfinished.any()):
                break
            continue
        if cur > n:
            step.advance()
            logits = step.logits
        token = _choose(processors, ids[:, :cur], logits, config, unfinished)
        ids[:, cur] = token
        cur += 1
        if cur == end or (eos is not None and (cur - n) % CHECK_EVERY == 0 and not unfinished.any()):
            break
        step.take(token)
    return ids[:, : _stopped_at(ids, n, cur, eos)].clone()  # `ids` is the step's buffer, which the next call reuses


def _choose(processors, ids: torch.Tensor, logits: torch.Tensor, config, unfinished: torch.Tensor) -> torch.Tensor:
    """The next token per sequence from `logits` as transformers' loop chooses it (finished sequences: the padding);
    `unfinished` updated in place."""
    eos, pad = config._eos_token_tensor, config._pad_token_tensor
    scores = processors(ids, logits)
    if config.do_sample:
        token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    else:
        token = torch.argmax(scores, dim=-1)
    if eos is not None:
        if pad is not None:
            token = torch.where(unfinished, token, pad)
        unfinished &= ~torch.isin(token, eos)
    return token


def _length_floors(processors, config, vocab: int) -> torch.Tensor | None:
    """For greedy decoding whose only logits processors are minimum lengths: per token id, the length (prompt
    included) below which its logit is -inf (0: never). None where the chunk does not serve the call (sampling,
    other processors, end-of-sequence ids without padding)."""
    if config.do_sample or (config._eos_token_tensor is not None and config._pad_token_tensor is None):
        return None
    floor = torch.zeros(vocab, dtype=torch.long)
    for processor in processors or ():
        name = type(processor).__name__
        if name == "MinLengthLogitsProcessor":
            length = processor.min_length
        elif name == "MinNewTokensLengthLogitsProcessor":
            length = processor.prompt_length_to_skip + processor.min_new_tokens
        else:
            return None
        banned = torch.isin(torch.arange(vocab), torch.as_tensor(processor.eos_token_id).cpu())
        floor = torch.where(banned, floor.clamp(min=length), floor)
    return floor


def _stopped_at(ids: torch.Tensor, n: int, cur: int, eos: torch.Tensor | None) -> int:
    """The length transformers' loop ends at: where the last sequence to finish wrote its end-of-sequence token
    (the tokens after it, written while the host had not looked yet, are padding), else `cur`."""
    if eos is None or cur == n:
        return cur
    ended = torch.isin(ids[:, n:cur], eos)
    if not bool(ended.any(dim=1).all()):
        return cur
    return n + int(ended.int().argmax(dim=1).max()) + 1
