"""Side-by-side latency measurement: warm-up, rotated inputs, CUDA events on GPU / perf_counter on CPU, medians.

Used by `layout=auto` (one layer, BSR vs dense), `evaluate.py` (whole models) and benchmarks/bsr_baseline.py.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[Any], Any], inputs: Sequence[Any], device: torch.device, n: int, offset: int) -> list:
    """Time n calls (ms each), cycling through inputs so no call reuses the previous call's input in cache."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for i, (start, end) in enumerate(events):
            x = inputs[(offset + i) % len(inputs)]
            start.record()
            fn(x)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for i in range(n):
        x = inputs[(offset + i) % len(inputs)]
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
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
) -> dict[str, dict[str, float]]:
    """{name: {median_ms, min_ms, p90_ms, n}} per function, measured interleaved in `rounds` rounds.

    Interleaving (a round of each function, then the next round) spreads clock and thermal drift evenly over the
    functions, so their ratio is fair. Each round runs `repeats // rounds` timed calls after `warmup` untimed ones.
    """
    per_round = max(1, repeats // max(1, rounds))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(1, rounds)):
        for name, fn in fns.items():
            for i in range(warmup if r == 0 else 1):
                fn(inputs[i % len(inputs)])
            _sync(device)
            samples[name] += _time_calls(fn, inputs, device, per_round, offset=r * per_round)
    return {name: _stats(ts) for name, ts in samples.items()}


def _stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered),
        "min_ms": ordered[0],
        "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "n": len(ordered),
    }
