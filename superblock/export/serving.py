"""Serving runtimes for inference models with block-sparse layers: eager, torch.compile, CUDA graphs.

```python
from superblock.export import make_runtime, load_sparse
model = load_sparse("exports/<run>", device="cuda", dtype="bf16", runtime="cudagraph", batch_sizes=[1, 8, 32, 256])
fast = make_runtime(any_model, "compile", batch_sizes=[1, 8, 32, 256], sample_shape=(3, 224, 224))
logits = fast(images)          # any batch size; padded up to the next of `batch_sizes`, larger ones in chunks
```

Every runtime first warms the model up in eager mode at each batch size, so every BlockSparseLinear decides its
kernel for those token counts (backend="auto" measures once per GPU, see superblock.kernels.tuning) and builds
what it needs; nothing is measured inside a trace or a capture afterwards.

  eager      the model itself (warmed up when batch sizes are given); kernels tuned for eager (host time counts),
             then, on CUDA, checked as a whole against dense kernels per batch size (check_against_dense)
  compile    torch.compile(model, dynamic=False): one graph per batch size, compiled at warm-up; a batch is padded
             up to the smallest batch size >= it, so serving never recompiles; kernels tuned and checked as for
             eager (or tuned for GPU time with compile_options={"mode": "reduce-overhead"}, which replays graphs)
  cudagraph  the model torch.compile'd (inductor's fusions; compile_options=False captures the eager model
             instead), then one CUDA graph per batch size with static input / output buffers (all graphs share
             one memory pool); a batch is copied into the smallest buffer that holds it and the output rows
             sliced and copied out; kernels tuned for GPU time (tuning target "graph"). On a CPU model there are
             no CUDA graphs: the eager model is returned, with a RuntimeWarning.

Rows of a batch must be independent (true of ViTs in eval mode): padding rows hold stale or zero inputs.

A sample input is images (standard-normal, the scale of normalized pixels) or, for language models, token ids:
`sample_input(model, model_spec)` says which, `SampleInput.make(batch, ...)` builds a batch of them.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_map

from superblock.hf_models import is_language_model, max_positions
from superblock.kernels import BlockSparseLinear, prepare_layers, tuning
from superblock.kernels.dispatch import Choice
from superblock.timing import BATCH_SIZES, capture_graph, wall_ms

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "compile", "cudagraph")
DEFAULT_BATCH_SIZES = BATCH_SIZES
TUNING_TARGETS = {"eager": "eager", "compile": "eager", "cudagraph": "graph"}
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs
# Tokens per sequence of a language model's sample input (warm-up, layout timing, the export's equivalence probe):
# every projection then sees batch x this many rows, the prefill shape.
LM_SAMPLE_TOKENS = 32


@dataclass(frozen=True)
class SampleInput:
    """What one input of a model looks like, without the batch dimension: `shape`, and `vocab_size` for token ids
    (int64 in [0, vocab_size)); floats (standard normal, in the model's dtype) when it is None."""

    shape: tuple[int, ...]
    vocab_size: int | None = None

    def make(
        self,
        batch: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        fill: str = "random",
    ) -> torch.Tensor:
        """A batch of inputs on `device` (`dtype` applies to float inputs only). fill="zeros" for static buffers.
        Drawn on the CPU when a generator is given (so a seed means the same inputs everywhere)."""
        size = (batch, *self.shape)
        if fill == "zeros":
            kind = torch.int64 if self.vocab_size is not None else dtype
            return torch.zeros(size, device=device, dtype=kind)
        where = "cpu" if generator is not None else device
        if self.vocab_size is not None:
            x = torch.randint(0, self.vocab_size, size, generator=generator, device=where)
        else:
            x = torch.randn(size, generator=generator, device=where).to(dtype)
        return x.to(device)


def as_sample(sample: SampleInput | Sequence[int]) -> SampleInput:
    """A SampleInput from itself or from a shape of float inputs (the older spelling: `sample_shape`)."""
    return sample if isinstance(sample, SampleInput) else SampleInput(tuple(int(s) for s in sample))


def sample_input(model: nn.Module, model_spec: dict | None = None) -> SampleInput:
    """The sample input of a model: LM_SAMPLE_TOKENS token ids (at most the model's positions) for a transformers
    language model, else an image of image_shape(model, model_spec)."""
    if is_language_model(model):
        length = min(LM_SAMPLE_TOKENS, max_positions(model) or LM_SAMPLE_TOKENS)
        return SampleInput((length,), int(model.config.vocab_size))
    return SampleInput(image_shape(model, model_spec))


def check_runtime(runtime: str, batch_sizes: Sequence[int] | int | None) -> tuple[int, ...] | None:
    """Validate the runtime name and batch sizes; returns the sorted distinct batch sizes (None stays None)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not one of {list(RUNTIMES)}")
    if batch_sizes is None:
        return None
    if isinstance(batch_sizes, int):
        batch_sizes = [batch_sizes]
    ok = isinstance(batch_sizes, Sequence) and not isinstance(batch_sizes, str) and len(batch_sizes) > 0
    sizes = list(batch_sizes) if ok else []
    if not ok or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in sizes):
        raise ValueError(
            f"batch_sizes must be a non-empty list of positive ints, e.g. [1, 8, 32, 256], got {batch_sizes!r}"
        )
    return tuple(sorted(set(sizes)))


def image_shape(model: nn.Module, model_spec: dict | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of a vision model's input: the first conv's channels and the spec's (or the
    model's own `image_size` / timm `patch_embed.img_size`) image size. ValueError when it cannot be told."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv is not None else 3
    size = (model_spec or {}).get("image_size") or getattr(model, "image_size", None)
    if size is None and hasattr(model, "patch_embed"):
        size = getattr(model.patch_embed, "img_size", None)
    if size is None:
        raise ValueError("cannot tell the model's input size: pass sample_shape=(channels, height, width)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return channels, int(h), int(w)


def compile_settings(runtime: str, compile_options: dict | bool | None) -> dict | None:
    """The torch.compile arguments a runtime uses (None: not compiled). compile: always compiled (True / None mean
    defaults); cudagraph: compiled unless compile_options is False; eager: never (options are an error)."""
    if compile_options is not None and not isinstance(compile_options, (dict, bool)):
        raise ValueError(
            f"compile_options must be a dict of torch.compile arguments (or True / False), got {compile_options!r}"
        )
    if runtime == "eager":
        if compile_options not in (None, False):
            raise ValueError("compile_options apply to runtime='compile' or 'cudagraph', not 'eager'")
        return None
    if compile_options is False:
        if runtime == "compile":
            raise ValueError("runtime='compile' with compile_options=False: use runtime='eager'")
        return None
    return dict(compile_options) if isinstance(compile_options, dict) else {}


def tuning_target(runtime: str, compile_options: dict | None = None) -> str:
    """What `auto` should optimize for a runtime: GPU time when the model runs as CUDA graphs (cudagraph, or
    torch.compile modes that use them), else eager time (host launch overhead counts)."""
    mode = (compile_options or {}).get("mode") or ""
    if runtime == "compile" and mode in CUDAGRAPH_COMPILE_MODES:
        return "graph"
    return TUNING_TARGETS[runtime]


def _model_place(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def set_model_tuning_target(model: nn.Module, target: str | None) -> int:
    """Set what `auto` optimizes in every BlockSparseLinear of the model ("eager" | "graph" | None = the global
    target); layers whose target changes forget their earlier choices. Returns how many layers there are. (The
    process-wide default is superblock.kernels.set_tuning_target.)"""
    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    for layer in layers:
        layer.set_tuning_target(target)
    return len(layers)


def prepare_for_decoding(model: nn.Module, batch_sizes: Sequence[int] | int, target: str | None = "graph") -> int:
    """Before a language model's decode steps run compiled or captured (`generate(compile_config=...)`,
    `graph_decoding` with `compile_step=True`): `auto` set to optimize `target` ("graph": GPU time, as CUDA graphs
    and reduce-overhead run; "eager"; None: the global target), and every block-sparse layer's choice for one new
    token per sequence at each batch size decided (on CUDA, measured) now. Inside a compiled step nothing is
    measured: a token count never prepared would run a stand-in (the Triton kernel's default configuration), even
    where dense is faster. Returns how many layers were prepared."""
    set_model_tuning_target(model, target)
    return prepare_layers(model, check_runtime("eager", batch_sizes))


@torch.no_grad()
def warm_up(model: nn.Module, batch_sizes: Sequence[int], sample_shape: SampleInput | Sequence[int]) -> nn.Module:
    """One eager forward per batch size (largest first) on random inputs of the model's device and dtype (token
    ids for a SampleInput with a vocabulary): every BlockSparseLinear makes (and measures) its choice for those
    token counts; a language model's layers also for one token per sequence (its decode steps). Returns the
    model."""
    device, dtype = _model_place(model)
    sample = as_sample(sample_shape)
    if sample.vocab_size is not None:
        prepare_layers(model, batch_sizes)
    for b in sorted(batch_sizes, reverse=True):
        model(sample.make(b, device, dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model


def _layer_tokens(model: nn.Module, layers: list[BlockSparseLinear], x: torch.Tensor) -> dict:
    """{layer: token count it sees} for one forward of x."""
    seen: dict = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod, args[0].numel() // mod.in_features))
        for m in layers
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _use(choices: dict, buckets: dict) -> None:
    """Set each layer's choice for its bucket (None: none, so the next eager call decides again)."""
    for m, choice in choices.items():
        m.set_choice(buckets[m], choice)


@torch.no_grad()
def check_against_dense(
    model: nn.Module,
    batch_sizes: Sequence[int],
    sample_shape: SampleInput | Sequence[int],
    *,
    rounds: int = 3,
    reps: int = 5,
    run: Callable | None = None,
) -> dict[int, dict]:
    """Per batch size, time the whole model (eager) with its tuned choices and with every block-sparse layer's
    choice for that many tokens set to the dense kernel, and keep the faster (interleaved medians).

    Layers are tuned one at a time, each as if alone; in an eager model near the point where the host's launches
    take as long as the GPU's work, a kernel with a faster GPU time but a slower launch can make the whole model
    slower. This is the model-level check that eager serving is never slower than dense at the named batch sizes.
    Only layers with backend="auto" are changed. `run` is what is timed (default: the eager model; a compiled
    model reads the choices while tracing, so each set of choices gets its own graph, built before it is timed;
    every dense weight is built first, so no graph rebuilds one per call).
    `sample_shape`: one input's shape (images) or a SampleInput (token ids for a language model).
    Returns {batch: {"tuned_ms", "dense_ms", "kept"}}."""
    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear) and m.backend == "auto"]
    if run is not None:  # a trace would rebuild a dense weight it never saw built in every call: build them now
        for m in layers:
            m.dense_weight_buffer()
    run = model if run is None else run
    device, dtype = _model_place(model)
    sample = as_sample(sample_shape)
    report: dict[int, dict] = {}
    for b in sorted(batch_sizes):
        x = sample.make(b, device, dtype)
        buckets = {m: tuning.token_bucket(n) for m, n in _layer_tokens(model, layers, x).items()}
        tuned = {m: m.choices().get(bk) for m, bk in buckets.items()}
        if all(c is not None and c.backend == "dense" for c in tuned.values()):
            continue

        dense = {m: Choice("dense", None, m.precision) for m in tuned}
        times: dict[str, list[float]] = {"tuned": [], "dense": []}
        for _ in range(rounds):
            for name, choices in (("tuned", tuned), ("dense", dense)):
                _use(choices, buckets)
                run(x)  # plans (dense weights, compiled graphs: once) are built outside the timing
                times[name].append(wall_ms(run, x, reps))
        t_tuned, t_dense = statistics.median(times["tuned"]), statistics.median(times["dense"])
        kept = "tuned" if tuning.not_slower_than_dense(t_tuned, t_dense, tolerance=0.0) else "dense"
        _use(dense if kept == "dense" else tuned, buckets)
        report[b] = {"tuned_ms": round(t_tuned, 4), "dense_ms": round(t_dense, 4), "kept": kept}
    return report


def make_runtime(
    model: nn.Module,
    runtime: str = "eager",
    *,
    batch_sizes: Sequence[int] | int | None = None,
    sample_shape: SampleInput | Sequence[int] | None = None,
    compile_options: dict | bool | None = None,
    check_dense: bool | None = None,
) -> nn.Module:
    """Wrap an inference model (eval mode, on its device and dtype; any model, with or without BlockSparseLinear
    layers) for `runtime` ("eager" | "compile" | "cudagraph", see the module docstring).

    `batch_sizes`: the batch sizes to warm up, compile or capture (default (1, 8, 32, 256) for compile /
    cudagraph, none for eager). `sample_shape`: one input's shape without the batch dimension, or a SampleInput
    (default: sample_input(model), token ids for a transformers language model, else a ViT's image shape).
    `compile_options`: torch.compile arguments (e.g.
    {"mode": "max-autotune-no-cudagraphs"} or {"backend": "aot_eager"}) for compile and cudagraph (which
    compiles by default; False captures the eager model). `check_dense` (eager and compile, tuned for eager time;
    default on CUDA): time the whole model per batch size with its tuned kernels and with dense ones and keep
    the faster (check_against_dense; the report is left in `model.dense_check`). Inputs are cast to the model's
    device and dtype. Returns the model itself for eager, else a ServingModel around it.
    """
    sizes = check_runtime(runtime, batch_sizes)
    options = compile_settings(runtime, compile_options)
    device, _ = _model_place(model)
    if runtime == "cudagraph" and device.type != "cuda":
        warnings.warn(
            f"runtime='cudagraph' needs a CUDA model, this one is on {device}: running it eagerly instead",
            RuntimeWarning,
            stacklevel=2,
        )
        runtime, options = "eager", None
    if sizes is None and runtime != "eager":
        sizes = DEFAULT_BATCH_SIZES
    model.eval()
    target = tuning_target(runtime, options)
    set_model_tuning_target(model, target)
    if sizes is None:
        return model
    shape = as_sample(sample_shape) if sample_shape is not None else sample_input(model)
    _timed(
        f"warmed up at batch sizes {list(sizes)} (every block-sparse layer chose its kernels)",
        warm_up,
        model,
        sizes,
        shape,
    )
    check = target == "eager" and (check_dense if check_dense is not None else device.type == "cuda")
    if runtime == "eager":
        if check:
            model.dense_check = _timed(
                "checked the whole model against dense kernels", check_against_dense, model, sizes, shape
            )
        return model
    # compile: checked on the compiled model itself, whose host overhead differs from eager's
    return ServingModel(model, runtime, sizes, shape, options, check_dense=check and runtime == "compile")


def _timed(what: str, fn: Callable, *args):
    """fn(*args), logged at INFO with its wall time."""
    start = time.perf_counter()
    out = fn(*args)
    log.info("%s in %.1f s", what, time.perf_counter() - start)
    return out


def compile_cache_dir() -> str:
    """Where inductor caches compiled graphs ($TORCHINDUCTOR_CACHE_DIR, else torch's default)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return cache_dir()
    except (ImportError, AttributeError, OSError):  # a torch without it: say where to set it
        return "$TORCHINDUCTOR_CACHE_DIR"


class ServingModel(nn.Module):
    """A model served through torch.compile or CUDA graphs at fixed batch sizes (build with make_runtime).

    `compile_options`: torch.compile arguments, or None for a cudagraph of the eager model. `model` is the eager
    model inside (its modules, e.g. BlockSparseLinear, are reachable through
    `.modules()`); `runtime`, `batch_sizes` and `sample_shape` say how it is served. Inference only (no_grad).

    Inputs: float inputs are cast to the model's dtype and copied to its device (outputs stay there); token ids
    for token-id models, floats for the others, else a ValueError; under cudagraph the shape after the batch
    dimension must be `sample_shape` (the static buffers'), under compile another shape compiles another graph.
    Calls from several threads are correct: one call at a time runs (a lock around copy-in, replay and copy-out;
    a call on another CUDA stream waits for the previous call's work first).
    """

    def __init__(
        self,
        model: nn.Module,
        runtime: str,
        batch_sizes: Sequence[int],
        sample_shape: SampleInput | Sequence[int],
        compile_options: dict | None = None,
        check_dense: bool = False,
    ) -> None:
        super().__init__()
        if runtime not in ("compile", "cudagraph"):
            raise ValueError(f"ServingModel runs runtime 'compile' or 'cudagraph', got {runtime!r}")
        self.model = model
        self.runtime = runtime
        self.batch_sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
        self.sample = as_sample(sample_shape)
        self.sample_shape = self.sample.shape
        self.device, self.dtype = _model_place(model)
        self._graphs: dict[int, tuple] = {}
        self._compiled: Callable | None = None
        self._lock = threading.Lock()  # graphs share static buffers and one memory pool: one call at a time
        self._stream: torch.cuda.Stream | None = None  # the stream of the last call
        # outputs of a graph replay live in the graph's memory and are overwritten by the next call: copy them out
        mode = (compile_options or {}).get("mode") or ""
        self._copy_out = runtime == "cudagraph" or mode in CUDAGRAPH_COMPILE_MODES
        self.compiled = compile_options is not None
        if runtime == "compile" and not self.compiled:
            raise ValueError("runtime='compile' needs compile_options (a dict, {} for torch.compile's defaults)")
        if self.compiled:
            log.info(
                "torch.compile at batch sizes %s: can take a minute on a cold compile cache, seconds on a warm "
                "one (%s; docs/export.md, 'Start-up time')",
                list(self.batch_sizes),
                compile_cache_dir(),
            )
            self._compile(dict(compile_options or {}), warm=runtime == "compile")
        self.dense_check: dict[int, dict] = {}
        if check_dense and runtime == "compile":
            # on the compiled model itself: under torch.compile small batches are host-bound and every custom-op
            # call costs host time that inlined cuBLAS calls do not; eager timing cannot see that
            self.dense_check = check_against_dense(model, self.batch_sizes, self.sample, run=self._compiled)
        if runtime == "cudagraph":
            self._capture(self._compiled if self.compiled else self.model)

    # ------------------------------------------------------------------------------------------------ build

    @torch.no_grad()
    def _compile(self, options: dict, warm: bool = True) -> None:
        options.setdefault("dynamic", False)
        # one graph per batch size: make room for all of them under dynamo's per-frame recompile limit (twice: the
        # compiled dense check traces a dense variant per batch size too). Added to the limit, not a floor: models
        # of one class share their forward's code object and its cache, so a dense baseline served in the same
        # process (evaluate.py, benchmarks) would otherwise use up the room and leave the next model eager.
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, getattr(config, name) + 2 * len(self.batch_sizes) + 2)
        # a plain attribute, not a submodule: the compiled wrapper holds the same model
        object.__setattr__(self, "_compiled", torch.compile(self.model, **options))
        for b in self.batch_sizes if warm else ():  # one graph per batch size, compiled now
            _timed(f"compiled batch {b}", self._compiled, self.sample.make(b, self.device, self.dtype, fill="zeros"))

    @torch.no_grad()
    def _capture(self, fn: Callable) -> None:
        pool = None
        for b in sorted(self.batch_sizes, reverse=True):  # largest first: the shared pool is sized once
            x = self.sample.make(b, self.device, self.dtype, fill="zeros")
            out: dict[str, torch.Tensor] = {}
            times = [time.perf_counter()]
            graph = capture_graph(
                lambda x=x, out=out: out.update(y=fn(x)),  # (and compiles, for a compiled fn: never in the capture)
                warmups=2,
                pool=pool,
                device=self.device,
                on_warm=lambda times=times: times.append(time.perf_counter()),
            )
            pool = graph.pool()
            log.info(
                "%s batch %d in %.1f s, captured its CUDA graph in %.2f s",
                "compiled and warmed up" if self.compiled else "warmed up",
                b,
                times[1] - times[0],
                time.perf_counter() - times[1],
            )
            self._graphs[b] = (graph, x, out["y"])
        torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------------------------------------ call

    def bucket(self, n: int) -> int:
        """The batch size a batch of n runs at (the largest one for n beyond it: then in chunks)."""
        for b in self.batch_sizes:
            if b >= n:
                return b
        return self.batch_sizes[-1]

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        self._check_input(x)
        n = x.shape[0]
        if n == 0:
            raise ValueError("empty batch")
        top = self.batch_sizes[-1]
        if n > top:  # chunks of the largest batch size
            parts = [self._run(x[i : i + top]) for i in range(0, n, top)]
            return tree_map(lambda *ts: torch.cat(ts) if isinstance(ts[0], torch.Tensor) else ts[0], *parts)
        return self._run(x)

    def _check_input(self, x: torch.Tensor) -> None:
        """ValueError naming what was expected for an input no graph can run (see the class docstring)."""
        ids = self.sample.vocab_size is not None
        if isinstance(x, torch.Tensor):
            kind = x.dtype in (torch.int64, torch.int32) if ids else x.is_floating_point()
            strict = self.runtime == "cudagraph"  # static input buffers: one shape
            shape_ok = tuple(x.shape[1:]) == self.sample_shape if strict else x.dim() == len(self.sample_shape) + 1
            if kind and shape_ok:
                return
        want = f"{'token ids' if ids else 'float inputs'} of shape (batch, {', '.join(map(str, self.sample_shape))})"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"this served model takes a tensor of {want}, got {type(x).__name__}")
        raise ValueError(
            f"this served model ({self.runtime}) takes {want}, got a {str(x.dtype)[6:]} tensor of shape "
            f"{tuple(x.shape)}"
        )

    def _run(self, x: torch.Tensor):
        with self._lock:
            if self.device.type == "cuda":
                self._follow_last_call()
            return self._run_locked(x)

    def _follow_last_call(self) -> None:
        """Order this call after the last one when it comes on another stream (graph memory is shared)."""
        stream = torch.cuda.current_stream(self.device)
        if self._stream is not None and stream != self._stream:
            stream.wait_stream(self._stream)
        self._stream = stream

    def _run_locked(self, x: torch.Tensor):
        n, b = x.shape[0], self.bucket(x.shape[0])
        if self.runtime == "cudagraph":
            graph, static_x, static_y = self._graphs[b]
            static_x[:n].copy_(x)  # casts a float input to the model's dtype, copies it to the model's device
            graph.replay()
            return tree_map(lambda t: t[:n].clone() if isinstance(t, torch.Tensor) else t, static_y)
        x = x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device)  # token ids stay ints
        if n != b:
            x = torch.cat([x, x.new_zeros(b - n, *x.shape[1:])])
        y = self._compiled(x.contiguous())
        if n == b and not self._copy_out:
            return y
        return tree_map(lambda t: (t[:n].clone() if self._copy_out else t[:n]) if isinstance(t, torch.Tensor) else t, y)

    def extra_repr(self) -> str:
        return (
            f"runtime={self.runtime}, compiled={self.compiled}, batch_sizes={list(self.batch_sizes)}, "
            f"sample_shape={list(self.sample_shape)}"
        )
