"""Training progress: tqdm's bar on a terminal; plain lines (no carriage-return frames) in a log or a pipe."""

from __future__ import annotations

import io

from tqdm import tqdm

from superblock.progress import ProgressLines, epoch_progress, is_terminal, progress_iter


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_epoch(every_s: float, batches: int = 10, seconds_per_batch: float = 4.0) -> list[str]:
    out, clock, step = io.StringIO(), Clock(), [100]
    bar = ProgressLines(batches, 0, "epoch 2/3", every_s, lambda: step[0], file=out, clock=clock)
    for i in range(batches):
        clock.t += seconds_per_batch
        step[0] += 1
        bar.update(1)
        if i == 4:
            bar.set_postfix({"loss": "2.301", "lr": "1.00e-03"})
    bar.close()
    return out.getvalue().splitlines()


def test_one_line_per_epoch_when_the_interval_is_longer_than_the_epoch():
    lines = run_epoch(every_s=60.0)  # a 40 s epoch
    assert lines == [
        "epoch 2/3: 10/10 batches (100%), step 110, 0.25 batch/s, elapsed 00:40, ETA 00:00, loss=2.301, lr=1.00e-03"
    ]


def test_at_most_one_line_per_interval_within_an_epoch():
    lines = run_epoch(every_s=10.0)  # a line after 12 s, 24 s, 36 s, then the epoch's end at 40 s
    assert [ln.split(",")[0] for ln in lines] == [
        "epoch 2/3: 3/10 batches (30%)",
        "epoch 2/3: 6/10 batches (60%)",
        "epoch 2/3: 9/10 batches (90%)",
        "epoch 2/3: 10/10 batches (100%)",
    ]
    assert "step 103" in lines[0] and "ETA 00:28" in lines[0] and "loss=" not in lines[0] and "loss=2.301" in lines[1]
    assert len(run_epoch(every_s=0.0)) == 1  # 0: the epoch's end only


def test_a_resumed_epoch_counts_its_rate_from_where_it_resumed():
    out, clock = io.StringIO(), Clock()
    bar = ProgressLines(10, 6, "epoch 1/1", 30.0, lambda: 6, file=out, clock=clock)
    for t in (1.0, 1.5, 2.0, 2.5):
        clock.t = t
        bar.update(1)
    bar.close()
    bar.close()  # nothing new: no second line
    assert out.getvalue().splitlines() == [
        "epoch 1/1: 10/10 batches (100%), step 6, 2.00 batch/s, elapsed 00:02, ETA 00:00"
    ]


def test_a_slow_first_batch_does_not_set_the_rate():
    """The first batch of a compiled run takes the compile (minutes): the rate and ETA count from its end, and until a
    second batch ends the line says how long the first took rather than an ETA of hours."""
    out, clock = io.StringIO(), Clock()
    bar = ProgressLines(635, 0, "epoch 1/10", 30.0, lambda: 0, file=out, clock=clock)
    clock.t = 94.0
    bar.update(1)
    assert bar.line() == "epoch 1/10: 1/635 batches (0%), step 0, ? batch/s (first batch 01:34), elapsed 01:34, ETA ?"
    for _ in range(99):
        clock.t += 0.125
        bar.update(1)
    assert "8.00 batch/s" in bar.line() and "ETA 01:06" in bar.line()  # 535 batches left at 8 a second


def test_bar_on_a_terminal_lines_elsewhere():
    assert isinstance(epoch_progress(5, 0, "e", enabled=True, every_s=30, step=lambda: 0, stream=Terminal()), tqdm)
    lines = epoch_progress(5, 0, "e", enabled=True, every_s=30, step=lambda: 0, stream=io.StringIO())
    assert isinstance(lines, ProgressLines)
    off = epoch_progress(5, 0, "e", enabled=False, every_s=30, step=lambda: 0, stream=io.StringIO())
    assert isinstance(off, tqdm) and off.disable  # other ranks: nothing at all
    assert is_terminal(Terminal()) and not is_terminal(io.StringIO()) and not is_terminal(object())


def test_progress_over_items_is_plain_lines_in_a_log_and_a_bar_on_a_terminal():
    """The one-shot refit's progress over a model's blocks: in a log, lines that name blocks (no optimizer step),
    not the frames of a bar; on a terminal, tqdm's bar; nothing at all when disabled."""
    log = io.StringIO()
    assert list(progress_iter(range(3), 3, "refit", "block", enabled=True, every_s=0.0, stream=log)) == [0, 1, 2]
    (line,) = log.getvalue().splitlines()
    assert line.startswith("refit: 3/3 blocks (100%), ") and "block/s" in line and "step" not in line
    assert "\r" not in log.getvalue()
    term = Terminal()
    assert list(progress_iter(range(3), 3, "refit", "block", enabled=True, stream=term)) == [0, 1, 2]
    assert "\r" in term.getvalue()  # tqdm drew (and cleared) its bar
    off = io.StringIO()
    assert list(progress_iter(iter("ab"), 2, "refit", "block", enabled=False, stream=off)) == ["a", "b"]
    assert off.getvalue() == ""
