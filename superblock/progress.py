"""Progress on the console (training epochs, the one-shot refit): tqdm's bar on a terminal, plain lines anywhere else.

A bar redraws itself with carriage returns; written to a file or a pipe (a job's log, `... 2>&1 | tee`), every
redraw becomes a frame in the log. When its stream is not a terminal, `epoch_progress` returns `ProgressLines`
instead: the same fields (epoch, batches, optimizer step, rate, elapsed, ETA and the bar's postfix: loss, lr,
sparsity, images/s) as one plain line at the end of every epoch and at most one every `every_s` seconds within it.
Its rate and ETA count from the end of the epoch's first batch: that batch also carries the loader's start and, in a
compiled run, the compile (minutes for a language model), which would otherwise put the ETA at hours; until a second
batch ends, the line says how long the first has taken instead (the refit's lines likewise count blocks).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is an interactive terminal (False for files, pipes and streams without isatty)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class ProgressLines:
    """The progress bar's interface (update / set_postfix / close) writing plain lines to `file` (default: stderr,
    where the bar would draw): one when closed (the epoch's end, or where it stopped) and, within the epoch, at most
    one every `every_s` seconds (0: none). `step()` is the current optimizer step (None: not shown); `unit` names
    what is counted."""

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        every_s: float,
        step: Callable[[], int] | None,
        file: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "batch",
    ) -> None:
        self.total, self.n, self.desc, self.every_s, self.unit = total, initial, desc, every_s, unit
        self.step, self.file, self.clock = step, file, clock
        self.postfix: dict[str, Any] = {}
        self._start = clock()
        self._last_time, self._last_n = self._start, None
        self._first: tuple[int, float] | None = None  # (count, time) at the end of the first update

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._first is None:
            self._first = (self.n, self.clock())
        if self.every_s > 0 and self.n < self.total and self.clock() - self._last_time >= self.every_s:
            self._write()

    def set_postfix(self, postfix: dict[str, Any]) -> None:
        self.postfix = dict(postfix)

    def close(self) -> None:
        if self.n != self._last_n:
            self._write()

    def line(self) -> str:
        now = self.clock()
        elapsed = now - self._start
        rate, speed = None, f"? {self.unit}/s"
        if self._first is not None:
            first_n, first_t = self._first
            if self.n > first_n and now > first_t:
                rate = (self.n - first_n) / (now - first_t)
                speed = f"{rate:.2f} {self.unit}/s"
            else:
                speed += f" (first {self.unit} {tqdm.format_interval(first_t - self._start)})"
        eta = tqdm.format_interval((self.total - self.n) / rate) if rate else ("00:00" if self.n >= self.total else "?")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        plural = self.unit + ("es" if self.unit.endswith(("s", "ch", "sh", "x")) else "s")
        fields = [f"{self.n}/{self.total} {plural} ({pct:.0f}%)"]
        fields += [] if self.step is None else [f"step {self.step()}"]
        fields += [
            speed,
            f"elapsed {tqdm.format_interval(elapsed)}",
            f"ETA {eta}",
        ]
        fields += [f"{k}={v}" for k, v in self.postfix.items()]
        return f"{self.desc}: " + ", ".join(fields)

    def _write(self) -> None:
        file = self.file if self.file is not None else sys.stderr
        print(self.line(), file=file, flush=True)
        self._last_time, self._last_n = self.clock(), self.n


def epoch_progress(
    total: int,
    initial: int,
    desc: str,
    *,
    enabled: bool,
    every_s: float,
    step: Callable[[], int] | None,
    stream: TextIO | None = None,
    unit: str = "batch",
    leave: bool = True,
) -> tqdm | ProgressLines:
    """The progress display of one epoch (or any count of `unit`s): tqdm's bar (disabled when not `enabled`, e.g. on
    ranks other than 0; cleared at the end unless `leave`) when `stream` (default stderr, tqdm's) is a terminal, else
    ProgressLines."""
    if enabled and not is_terminal(stream if stream is not None else sys.stderr):
        return ProgressLines(total, initial, desc, every_s, step, file=stream, unit=unit)
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        dynamic_ncols=True,
        leave=leave,
        file=stream,
    )


def progress_iter(
    items: Iterable[T],
    total: int,
    desc: str,
    unit: str,
    *,
    enabled: bool,
    every_s: float = 30.0,
    stream: TextIO | None = None,
) -> Iterator[T]:
    """`items` with progress shown as it is consumed (`epoch_progress`'s display, no optimizer step): tqdm's bar on a
    terminal (cleared at the end), else a line at most every `every_s` seconds and one at the end; nothing when not
    `enabled`."""
    bar = epoch_progress(
        total, 0, desc, enabled=enabled, every_s=every_s, step=None, stream=stream, unit=unit, leave=False
    )
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
