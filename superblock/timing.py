"""Timing, one home: CUDA events, CUDA-graph replays, wall clock with syncs, interleaved side-by-side comparisons and
the training step's lazily read timers. Used by kernel tuning (kernels.tuning), layout and serving decisions
(export), evaluation, the trainer and the benchmarks.

  time_cuda(fn)            GPU time per call in ms from CUDA events over back-to-back calls (host overhead shows
                           when the GPU outruns the launches)
  time_graph(fn)           GPU time per call in ms from replays of a CUDA graph of several calls (no host overhead)
  replay_ms(graph, calls)  the same for a graph captured elsewhere
  capture_graph(fn, reps)  the CUDA graph of reps calls, captured after a warm-up on a side stream (the one
                           capture of the package: timing graphs and served models)
  own_cublas_workspace()   around a capture: the graph gets a cuBLAS workspace of its own (see its docstring)
  wall_ms(fn, x, reps)     mean wall time of reps calls, synchronised at both ends (what a caller waits)
  host_us(fn, reps)        host (CPU) time of one call in us: the Python and launch cost a caller pays per call
  compare_latency(fns, ..) medians of several functions measured interleaved (fair ratios under clock drift), per
                           call or per call of bursts of back-to-back calls
  interleaved_ms(fns)      per-call times (ms) of argument-free functions, interleaved in bursts: what `auto`
                           compares its eager finalists with
  StepTimer                sums the time spent in a block of the training step, read only when the log asks
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

# The batch sizes speed is reported at and served models are prepared for by default (small and large: the
# host-bound and the GPU-bound ends); the export config, serving and the benchmarks take them from here.
BATCH_SIZES = (1, 8, 32, 256)


def time_cuda(fn, budget_ms: float = 3.0, repeats: int = 3) -> float:
    """Median over `repeats` batches of the mean time of fn() in ms (CUDA events); fn is run once first."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    est = max(start.elapsed_time(end), 1e-3)
    reps = int(min(max(budget_ms / est, 2), 50))
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def capture_graph(
    fn: Callable[[], Any],
    reps: int = 1,
    *,
    warmups: int = 1,
    pool: Any = None,
    device: torch.device | int | None = None,
    on_warm: Callable[[], None] | None = None,
) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `reps` calls of fn(), captured after `warmups` calls on a side stream (so that lazy
    initialisation, compilation and allocator growth happen outside the capture), with a cuBLAS workspace of its
    own (own_cublas_workspace). `pool`: share an earlier graph's memory pool (graph.pool()); `on_warm()` runs between
    the warm-up and the capture (the warm-up finished on the device). The one way this package captures a graph:
    the tuner's and benchmarks' timing graphs and the served model's graphs."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if on_warm is not None:
        torch.cuda.synchronize(device)
        on_warm()
    graph = torch.cuda.CUDAGraph()
    with own_cublas_workspace(), torch.cuda.graph(graph, pool=pool):
        for _ in range(reps):
            fn()
    return graph


@contextlib.contextmanager
def own_cublas_workspace() -> Iterator[None]:
    """Make a CUDA graph captured inside this block use a cuBLAS workspace of its own, allocated in its memory pool.

    cuBLAS keeps one workspace per (handle, stream), and every capture runs on the same capture stream: without
    this, a graph reuses whatever workspace that stream got first, often memory of an earlier, since destroyed,
    graph's pool. Once something frees it (torch.compile's "reduce-overhead" mode clears cuBLAS workspaces before
    it records; the next capture's empty_cache() hands the memory back to the driver), the graph's GEMMs write to
    unmapped memory: an illegal memory access when several models are served in one process. Clearing the
    workspaces before the capture makes the graph allocate one in its own pool, where it lives as long as the
    graph; clearing after keeps the next capture from borrowing it. torch.compile's CUDA-graph trees do the same."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    try:
        yield
    finally:
        if clear is not None:
            clear()


def time_graph(fn, budget_ms: float = 2.0, repeats: int = 3) -> float:
    """GPU time of fn() in ms, without host launch overhead: replays of a CUDA graph of several calls.

    Picks among launch configurations of one kernel, where host overhead is the same for all and would
    hide the differences at small token counts. fn must not allocate (pass preallocated outputs)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = int(min(max(budget_ms / max(start.elapsed_time(end), 1e-3), 2), 20))
    return replay_ms(capture_graph(fn, reps), reps, repeats)


def replay_ms(graph: torch.cuda.CUDAGraph, calls: int, repeats: int = 3) -> float:
    """GPU time per call in ms of a captured graph of `calls` calls: the median of `repeats` timed replays, after
    one untimed replay."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def host_us(fn: Callable[[], Any], reps: int = 200, warmup: int = 10, burst: int = 20) -> float:
    """CPU time of the calling thread per call of fn() in us (time.thread_time: waiting for the GPU is not counted,
    so this is the host cost of a call, the floor of an eager call's latency when the GPU is faster).

    Calls run in bursts of `burst` with a device sync between bursts, outside the timed region: a long run of
    launches ahead of a slower GPU fills the launch queue, and the driver's wait for room (a spin) would count as
    host time."""
    for _ in range(warmup):
        fn()
    total, done = 0.0, 0
    while done < reps:
        n = min(burst, reps - done)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        total += time.thread_time() - t0
        done += n
    return total / reps * 1e6


def wall_ms(fn: Callable[[Any], Any], x: Any, reps: int) -> float:
    """Mean wall time of reps calls fn(x) in ms, synchronised at both ends (host launch time counts)."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x)
    _sync(device)
    return (time.perf_counter() - t0) / reps * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(
    fn: Callable[[Any], Any], inputs: Sequence[Any], device: torch.device, n: int, offset: int, burst: int = 1
) -> list:
    """n samples of the time per call (ms) of `burst` calls issued back to back, cycling through inputs so no call
    reuses the previous call's input in cache."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for i, (start, end) in enumerate(events):
            start.record()
            for j in range(burst):
                fn(inputs[(offset + i * burst + j) % len(inputs)])
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / burst for start, end in events]
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        for j in range(burst):
            fn(inputs[(offset + i * burst + j) % len(inputs)])
        times.append((time.perf_counter() - t0) * 1e3 / burst)
    return times


# no_grad, not inference_mode: torch's CPU BSR matmul fails inside inference_mode on a sparse weight built outside
# it ("Cannot set version_counter for inference tensor"), and the kernels cache that weight across calls.
@torch.no_grad()
def compare_latency(
    fns: dict[str, Callable[[Any], Any]],
    inputs: Sequence[Any],
    device: torch.device,
    warmup: int = 3,
    repeats: int = 20,
    rounds: int = 3,
    burst: int = 1,
    progress: Callable[[], None] | None = None,
) -> dict[str, dict[str, float]]:
    """{name: {median_ms, min_ms, p90_ms, n}} per function, measured interleaved in `rounds` rounds.

    Interleaving (a round of each function, then the next round) spreads clock and thermal drift evenly over the
    functions, so their ratio is fair. Each round takes `repeats // rounds` timed samples after `warmup` untimed
    calls. A sample is one call (`burst=1`: its latency as issued after the previous one) or the time per call of
    `burst` calls back to back: what a caller running one layer after another sees. Use bursts to compare a
    host-bound call with a GPU-bound one: a single call's sample of a host-bound function that found the GPU idle
    holds its host time before the launch plus its GPU time, where back to back it costs the larger of the two.
    `progress` is called after each function's round, outside the timed calls (a progress display's update).
    """
    per_round = max(1, repeats // max(1, rounds))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(1, rounds)):
        for name, fn in fns.items():
            for i in range(warmup if r == 0 else 1):
                fn(inputs[i % len(inputs)])
            _sync(device)
            samples[name] += _time_calls(fn, inputs, device, per_round, r * per_round * burst, burst)
            if progress is not None:
                progress()
    return {name: _stats(ts) for name, ts in samples.items()}


def interleaved_ms(
    fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int = 3, samples: int = 4, burst: int = 8
) -> dict[str, float]:
    """{name: ms per call} of argument-free functions: the median of `rounds` x `samples` bursts of `burst`
    back-to-back calls, the functions interleaved round by round (compare_latency). A host that changes speed
    during the measurement slows every function's samples alike instead of deciding between them, and a call
    that needs more host than GPU time costs its host time, as it does for a caller running one layer after
    another."""
    stats = compare_latency(
        {name: (lambda _x, f=fn: f()) for name, fn in fns.items()},
        [None],
        device,
        warmup=2,
        repeats=rounds * samples,
        rounds=rounds,
        burst=burst,
    )
    return {name: s["median_ms"] for name, s in stats.items()}


def _stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered),
        "min_ms": ordered[0],
        "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "n": len(ordered),
    }


class StepTimer:
    """Context manager summing the time spent inside it; `pop_ms()` returns the sum since the last pop (ms).

    On CUDA, events are recorded around the block and read at `pop_ms()` (the logging step syncs anyway); on the
    CPU, wall-clock time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> StepTimer:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, end))
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._events[-1][1].record()
        else:
            self._seconds += time.perf_counter() - self._start

    def pop_ms(self) -> float:
        if self.cuda:
            if self._events:
                self._events[-1][1].synchronize()
            ms = sum(start.elapsed_time(end) for start, end in self._events)
            self._events.clear()
            return ms
        ms, self._seconds = 1000.0 * self._seconds, 0.0
        return ms
