"""superblock.timing on the CPU: what a sample of compare_latency holds, and host_us's bursts."""

from __future__ import annotations

import time

import torch

from superblock import timing


def test_a_burst_sample_is_the_time_per_call_of_back_to_back_calls():
    calls = []

    def fn(x):
        calls.append(x)
        time.sleep(0.002)

    inputs = [torch.zeros(1), torch.ones(1)]
    stats = timing.compare_latency({"f": fn}, inputs, torch.device("cpu"), warmup=1, repeats=4, rounds=2, burst=3)
    assert stats["f"]["n"] == 4  # samples, not calls
    assert len(calls) == 1 + 1 + 4 * 3  # warm-up (1 in the first round, 1 in the next) and 3 calls per sample
    assert 1.5 <= stats["f"]["median_ms"] < 6.0  # per call (~2 ms), not per burst (~6 ms)
    # successive calls cycle through the inputs
    assert [float(x) for x in calls[1:5]] == [0.0, 1.0, 0.0, 1.0]


def test_a_single_call_sample_is_the_default():
    n = []
    stats = timing.compare_latency({"f": lambda x: n.append(1)}, [torch.zeros(1)], torch.device("cpu"), 0, 6, 2)
    assert stats["f"]["n"] == 6 and len(n) == 6 + 1  # and one warm-up call before the second round


def test_progress_is_reported_after_each_functions_round_outside_its_timed_calls():
    events = []
    fns = {name: (lambda _x, name=name: events.append(name)) for name in ("a", "b")}
    timing.compare_latency(fns, [None], torch.device("cpu"), 1, 4, 2, progress=lambda: events.append("|"))
    round_ = ["a"] * 3 + ["|"] + ["b"] * 3 + ["|"]  # 1 untimed call (warm-up, then one per round) and 2 timed
    assert events == round_ * 2


def test_host_us_counts_every_call_once_across_bursts():
    n = []
    us = timing.host_us(lambda: n.append(1), reps=45, warmup=5, burst=20)
    assert len(n) == 50 and us >= 0.0


def test_interleaved_ms_takes_bursts_of_each_function_round_by_round():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    ms = timing.interleaved_ms(fns, torch.device("cpu"), rounds=3, samples=2, burst=4)
    assert set(ms) == {"a", "b"} and all(v >= 0.0 for v in ms.values())
    runs = []  # the call sequence as (name, length) runs
    for name in order:
        if runs and runs[-1][0] == name:
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    # two warm-up calls before the first round, one before each later round, then 2 samples of 4 calls each
    assert runs == [["a", 2 + 8], ["b", 2 + 8], ["a", 1 + 8], ["b", 1 + 8], ["a", 1 + 8], ["b", 1 + 8]]
