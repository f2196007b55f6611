"""What tuning's eager time of a Triton winner holds (CPU, the launches replaced by counters): the call layers and the
functional op make, a launch bound to the weight once, so the host cost in the time is the cost callers pay."""

from __future__ import annotations

import torch

from superblock.kernels import _runners, dense_to_bsr
from superblock.kernels import tuning as tuning_mod


def test_the_eager_time_of_the_winner_is_of_its_bound_launch(monkeypatch):
    calls = {"bind": [], "bound": 0, "unbound_into_out": 0, "unbound_alloc": 0}

    def fake_bind(values, crow, col, gidx, has_bias, shape, activation, precision, config):
        calls["bind"].append(dict(config))

        def run(x, bias, out=None):
            calls["bound"] += 1
            return torch.empty(x.shape[0], shape[0])

        return run

    def fake_run_triton(x2d, values, crow, col, gidx, bias, out_f, activation, precision, config, y=None, wrap=None):
        calls["unbound_into_out" if y is not None else "unbound_alloc"] += 1
        return y

    gpu = iter([2.0, 1.0])  # the second candidate is faster on the GPU
    monkeypatch.setattr(_runners, "triton_usable", lambda *a: True)
    monkeypatch.setattr(_runners, "bindable", lambda device: True)
    monkeypatch.setattr(_runners, "bind_triton", fake_bind)
    monkeypatch.setattr(_runners, "run_triton", fake_run_triton)
    monkeypatch.setattr(tuning_mod, "time_graph", lambda fn, *a, **k: (fn(), next(gpu))[1])
    monkeypatch.setattr(tuning_mod, "replays_as_called", lambda fn: True)  # no graphs on a CPU
    eager = {"dense": 1.0}  # the triton winner's eager time 0.5 ms, dense's 1 ms

    def fake_interleaved(fns, device, **kw):
        assert set(fns) == {"dense", *[k for k in fns if k.startswith("triton:")]} and len(fns) == 2
        return {name: ([fn() for _ in range(5)], eager.get(name, 0.5))[1] for name, fn in fns.items()}

    monkeypatch.setattr(tuning_mod, "interleaved_ms", fake_interleaved)
    w = torch.zeros(128, 64)
    w[:64, :32] = 1.0
    values, crow, col = dense_to_bsr(w, 32)
    x2d = torch.randn(8, 64)
    cands = [
        {"BLOCK_M": 64, "G": 1, "num_warps": 4, "num_stages": 3, "TMA": False},
        {"BLOCK_M": 128, "G": 1, "num_warps": 8, "num_stages": 3, "TMA": False},
    ]
    args = (x2d, values, crow, col, (128, 64), None, None)
    times, entry = tuning_mod.measure(args, "ieee", candidates=cands, backends=("triton", "dense"), target="eager")
    assert entry["backend"] == "triton" and entry["config"] == cands[1]
    assert calls["bind"] == [cands[1]]  # bound once, the winner only
    assert calls["bound"] == 5  # every timed eager call went through it
    assert calls["unbound_alloc"] == 0
    assert calls["unbound_into_out"] == 2 * 2  # GPU times: a first run and the timed run of each candidate
