"""Time a part of the training step without a host sync per step: CUDA events read only when the log asks."""

from __future__ import annotations

import time

import torch


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
