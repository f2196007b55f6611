"""The decode kernel's dispatch on CPU: its launch configurations (SPLIT), how they travel through the custom op's
config list, how tuning offers them for few tokens, and (slow, Triton interpreter) its numbers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from superblock.kernels import BlockSparseLinear, _runners
from superblock.kernels import tuning as tuning_mod
from tests.helpers.kernels import run_in_interpreter

REPO = Path(__file__).resolve().parents[2]


def test_config_lists_carry_split_and_keep_old_lists():
    tiled = {"BLOCK_M": 64, "G": 1, "num_warps": 4, "num_stages": 3, "TMA": False}
    assert _runners.config_to_list(tiled) == [64, 1, 4, 3, 0]  # five entries: earlier tables and exports
    assert "SPLIT" not in _runners.config_from_list([64, 1, 4, 3, 0])
    decode = {**tiled, "BLOCK_M": 16, "SPLIT": 8}
    assert _runners.config_to_list(decode) == [16, 1, 4, 3, 0, 8]
    assert _runners.config_from_list([16, 1, 4, 3, 0, 8]) == decode
    assert "SPLIT" not in _runners.config_from_list([16, 1, 4, 3, 0, 0])
    balanced = {**decode, "BAL": 2}
    assert _runners.config_to_list(balanced) == [16, 1, 4, 3, 0, 8, 0, 1, 2]
    assert _runners.config_from_list([16, 1, 4, 3, 0, 8, 0, 1, 2]) == balanced
    with pytest.raises(ValueError, match="BAL"):  # balancing is the decode kernel's
        _runners.config_from_list([64, 1, 4, 3, 0, 0, 0, 1, 2])
    with pytest.raises(ValueError, match="entries"):
        _runners.config_from_list([16, 1, 4, 3, 0, 8, 0, 1, 1, 1])


def test_balanced_work_gives_each_row_programs_by_its_kept_blocks():
    from superblock.kernels._triton_bsr import WORK_WIDTH, balanced_work

    crow = torch.tensor([0, 5, 5, 7, 20], dtype=torch.int32)  # rows of 5, 0, 2 and 13 kept blocks
    work = balanced_work(crow, 20, 4)
    assert work.dtype == torch.int32 and work.shape == (4 + 20 // 4, WORK_WIDTH)  # the length follows from shapes
    live = [tuple(r[:5]) for r in work.tolist() if r[0] >= 0]  # (row, s, split, start, end)
    assert live == [(0, 0, 2, 0, 5), (0, 1, 2, 0, 5), (1, 0, 1, 5, 5), (2, 0, 1, 5, 7)] + [
        (3, s, 4, 7, 20) for s in range(4)
    ]
    assert all(r[:7] == [-1] * 7 for r in work.tolist()[len(live) :])
    # no program reads more than 4 blocks: row r's program s takes blocks start + s, start + s + split, ...
    assert max(len(range(a + s, b, split)) for _r, s, split, a, b in live) <= 4
    # a gated pair [gate; up] (two halves of 2 rows): a row's programs cover the longer of its gate and up rows, and
    # each entry carries both spans
    glu = [tuple(r[:7]) for r in balanced_work(crow, 20, 4, gated=True).tolist() if r[0] >= 0]
    assert glu == [(0, 0, 2, 0, 5, 5, 7), (0, 1, 2, 0, 5, 5, 7)] + [(1, s, 4, 5, 5, 7, 20) for s in range(4)]


def test_a_balanced_plan_keeps_its_work_list_and_a_trace_falls_back_to_split():
    layer = _sparse_layer(per_row=3)
    x2d = torch.randn(1, layer.in_features)
    cfg = {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False, "SPLIT": 4, "BAL": 2}
    plan = layer._build({"backend": "triton", "config": cfg, "precision": "ieee"}, x2d, traced=False)
    assert plan.config[-1] == 2 and plan.tensors[2] == "_balanced2"
    work = layer._buffers["_balanced2"]
    assert work.shape[0] == 4 + layer.values.shape[0] // 2 and (work[:, 0] >= 0).sum() == 4 * 2  # 3 blocks: 2 each
    fresh = _sparse_layer(per_row=3)  # never prepared: inside a trace the work list cannot be built
    traced = fresh._build({"backend": "triton", "config": cfg, "precision": "ieee"}, x2d, traced=True)
    assert traced.tensors[2] is None and _runners.config_from_list(traced.config)["SPLIT"] == 4
    assert "BAL" not in _runners.config_from_list(traced.config)


def test_config_lists_of_the_removed_x_stationary_kernel_say_where_it_went():
    """A seventh entry was XS (the x-stationary kernel's row chunks): tables and exports of older versions could hold
    such a list; the kernel now lives in experiments/xstat, outside the package."""
    with pytest.raises(ValueError, match=r"x-stationary kernel \(XS\) is no longer in the package") as err:
        _runners.config_from_list([64, 1, 4, 8, 0, 0, 2])
    assert "experiments/xstat" in str(err.value)


def test_decode_kernel_needs_plain_block_rows():
    x, values = torch.zeros(1, 64), torch.zeros(1, 32, 32)
    crow, col = torch.tensor([0, 1, 1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    cfg = {"BLOCK_M": 16, "G": 2, "num_warps": 4, "num_stages": 2, "TMA": False, "SPLIT": 2}
    with pytest.raises(ValueError, match="G == 1"):
        _runners.run_triton(x, values, crow, col, None, None, 64, None, "ieee", cfg)


@pytest.mark.parametrize("per_row", [1.0, 6.4, 22.4, 200.0])
def test_decode_configs_split_block_rows(per_row):
    cands = tuning_mod.decode_configs(1, 64, 64, per_row)
    splits = [c["SPLIT"] for c in cands]
    assert all(s >= 1 and s & (s - 1) == 0 and s <= 64 for s in splits)
    assert all(c["G"] == 1 and c["BLOCK_M"] == 16 for c in cands)
    # the most split configuration leaves about one kept block per program (capped at 64 programs per row)
    assert max(splits) == min(64, 1 << max(0, (int(-(-per_row // 1)) - 1).bit_length()))
    assert [c["BLOCK_M"] for c in tuning_mod.decode_configs(17, 64, 64, per_row)] == [32] * 6
    assert [c["BLOCK_M"] for c in tuning_mod.decode_configs(64, 64, 64, per_row)] == [64] * 6
    assert sorted(c["BAL"] for c in cands if "BAL" in c) == [2, 4]  # the balanced split competes too
    thin = tuning_mod.decode_configs(1, 64, 16, per_row)
    assert any(c.get("BAL") and c.get("KB", 1) > 1 for c in thin)


def test_candidates_add_decode_only_for_few_tokens():
    for target in ("eager", "graph"):
        base = tuning_mod.candidate_configs(8, 64, 64, torch.bfloat16, "ieee", target)
        few = tuning_mod.candidate_configs(8, 64, 64, torch.bfloat16, "ieee", target, blocks_per_row=22.4)
        assert few[0] == base[0]  # the default (static choice inside traces) is unchanged
        assert [c for c in few if "SPLIT" not in c] == base
        assert any(c.get("SPLIT", 0) >= 1 for c in few)
        many = tuning_mod.candidate_configs(2048, 64, 64, torch.bfloat16, "ieee", target, blocks_per_row=22.4)
        assert not any("SPLIT" in c for c in many)


def _sparse_layer(out_f=256, in_f=1024, block=64, per_row=8):
    gen = torch.Generator().manual_seed(0)
    rows, cols = out_f // block, in_f // block
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        keep[r, torch.randperm(cols, generator=gen)[:per_row]] = True
    w = torch.randn(out_f, in_f, generator=gen) * keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return BlockSparseLinear.from_dense(w, torch.randn(out_f), block_size=block)


@pytest.mark.parametrize("target", ["eager", "graph"])
def test_measure_offers_the_decode_kernel_and_records_it(monkeypatch, target):
    """Tuning hands the decode configurations (with the layer's blocks per row) to the timing, and a decode
    configuration that wins is what the entry, the module's plan and the op's config list carry."""
    seen = {}

    def fake_time_triton(args, precision, candidates):
        seen["candidates"] = candidates
        configs = {f"triton:{i}": c for i, c in enumerate(candidates)}
        gpu = {k: (0.25 if c.get("SPLIT") == 8 else 1.0) for k, c in configs.items()}
        return gpu, configs, lambda cfg, out=None: None

    monkeypatch.setattr(tuning_mod, "_time_triton", fake_time_triton)
    monkeypatch.setattr(_runners, "triton_usable", lambda *a: True)
    # eager: the triton winner 0.5 ms, dense 1 ms (interleaved); graph: dense 1 ms, triton its GPU time
    monkeypatch.setattr(
        tuning_mod,
        "interleaved_ms",
        lambda fns, device, **k: {n: (f(), 1.0 if n == "dense" else 0.5)[1] for n, f in fns.items()},
    )
    monkeypatch.setattr(tuning_mod, "time_graph", lambda fn, *a, **k: (fn(), 1.0)[1])
    monkeypatch.setattr(tuning_mod, "replays_as_called", lambda fn: True)  # no graphs on a CPU
    layer = _sparse_layer()
    x2d = torch.randn(1, layer.in_features)
    args = (x2d, layer.values, layer.crow_indices, layer.col_indices, layer.shape, layer.bias, None)
    times, entry = tuning_mod.measure(args, "ieee", backends=("triton", "dense"), target=target)
    assert any(c.get("SPLIT") == 8 for c in seen["candidates"])  # 8 kept blocks per row: one per program
    assert times["dense"] == 1.0
    assert entry["backend"] == "triton" and entry["config"]["SPLIT"] == 8
    assert entry["triton_config"]["SPLIT"] == 8
    plan = layer._build({"backend": "triton", "config": entry["config"], "precision": "ieee"}, x2d, traced=False)
    assert plan.config[-1] == 8 and len(plan.config) == _runners.CONFIG_KEYS.index("SPLIT") + 1


def test_measure_keeps_dense_when_decode_is_not_faster(monkeypatch):
    def fake_time_triton(args, precision, candidates):
        configs = {f"triton:{i}": c for i, c in enumerate(candidates)}
        return dict.fromkeys(configs, 1.0), configs, lambda cfg, out=None: None

    monkeypatch.setattr(tuning_mod, "_time_triton", fake_time_triton)
    monkeypatch.setattr(_runners, "triton_usable", lambda *a: True)
    monkeypatch.setattr(tuning_mod, "time_graph", lambda fn, *a, **k: (fn(), 1.0)[1])
    monkeypatch.setattr(tuning_mod, "replays_as_called", lambda fn: True)  # no graphs on a CPU
    layer = _sparse_layer()
    x2d = torch.randn(1, layer.in_features)
    args = (x2d, layer.values, layer.crow_indices, layer.col_indices, layer.shape, layer.bias, None)
    _, entry = tuning_mod.measure(args, "ieee", backends=("triton", "dense"), target="graph")
    assert entry["backend"] == "dense"  # within DENSE_MARGIN of dense: dense


_INTERP_SCRIPT = textwrap.dedent(
    """
    import torch, sys
    from tests.helpers.kernels import random_block_sparse, reference, rel_err
    from superblock.kernels import BlockSparseLinear, _triton_bsr, bsr_linear, dense_to_bsr
    torch.manual_seed(0)
    # (out, in), block: ragged N and K (not block multiples), a 16x32 block; random_block_sparse empties a row.
    # SPLIT 1: one program per row; 2, 3: the shared zeroed workspace (one launch); "4r": fp32 partials reduced
    # by a second kernel (what runs when no workspace can be had)
    for (out_f, in_f), block in (((96, 64), (32, 32)), ((100, 70), (16, 16)), ((130, 96), (32, 16))):
        for split, block_m in ((1, 16), (2, 16), (3, 32), ("4r", 16)):
            _triton_bsr.WORKSPACE_MAX = 0 if split == "4r" else 64 * 32768
            split = 4 if split == "4r" else split
            cfg = {"BLOCK_M": block_m, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False, "SPLIT": split}
            for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
                w = random_block_sparse(out_f, in_f, block, 0.5, dtype)
                values, crow, col = dense_to_bsr(w, block)
                for m in (1, 3, 17):
                    x, b = torch.randn(m, in_f).to(dtype), torch.randn(out_f).to(dtype)
                    for bias, act in ((None, None), (b, "gelu"), (b, None)):
                        y = bsr_linear(x, values, crow, col, (out_f, in_f), bias, act, backend="triton", config=cfg)
                        err = rel_err(y, reference(x, w, bias, act))
                        assert err < tol, (out_f, in_f, block, split, m, dtype, act, err)
    sums, counters = _triton_bsr._workspaces[-1]
    assert sums.abs().sum() == 0 and counters.abs().sum() == 0, "the workspace must be left zeroed"
    layer = BlockSparseLinear.from_dense(random_block_sparse(96, 64, (32, 32), 0.5), torch.randn(96), block_size=32)
    layer.dispatch[16] = {"backend": "triton", "config": {**cfg, "BLOCK_M": 16}, "precision": "ieee"}
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        err = rel_err(layer(x), reference(x, layer.to_dense_weight(), layer.bias))
    assert err < 1e-5, err
    print("decode interpreter ok")
    """
)


@pytest.mark.slow
def test_decode_kernel_in_interpreter():
    run_in_interpreter(_INTERP_SCRIPT, expect="decode interpreter ok")


_BALANCED_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from tests.helpers.kernels import random_block_sparse, reference, rel_err
    from superblock.kernels import BlockSparseLinear, _runners, _triton_bsr, bsr_linear, dense_to_bsr
    torch.manual_seed(0)

    def skewed(out_f, in_f, block, dtype):  # block row 0 keeps every block, row 1 none, the rest about half
        w = random_block_sparse(out_f, in_f, block, 0.5, dtype)
        w[: block[0]] = torch.randn(block[0], in_f).to(dtype)
        w[block[0] : 2 * block[0]] = 0
        return w

    # BAL 1 and 2 in the shared workspace (one launch), 3 with fp32 partials reduced by a second kernel; a thin tile
    # with KB = 2; ragged shapes; a gated pair through the runner with the work list in gidx's place
    for (out_f, in_f), block, kb in (((96, 160), (32, 32), 1), ((100, 70), (16, 16), 1), ((128, 96), (32, 16), 2)):
        for bal, ws in ((1, True), (2, True), (3, False)):
            _triton_bsr.WORKSPACE_MAX = 64 * 32768 if ws else 0
            cfg = {"BLOCK_M": 16, "G": 1, "num_warps": 4, "num_stages": 2, "TMA": False, "SPLIT": 2, "BAL": bal}
            if kb > 1:
                cfg["KB"] = kb
            for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
                w = skewed(out_f, in_f, block, dtype)
                values, crow, col = dense_to_bsr(w, block)
                for m in (1, 5):
                    x, b = torch.randn(m, in_f).to(dtype), torch.randn(out_f).to(dtype)
                    for bias, act in ((None, None), (b, "gelu")):
                        y = bsr_linear(x, values, crow, col, (out_f, in_f), bias, act, backend="triton", config=cfg)
                        err = rel_err(y, reference(x, w, bias, act))
                        assert err < tol, (out_f, in_f, block, bal, m, dtype, act, err)
                if out_f % (2 * block[0]) == 0:
                    work = _triton_bsr.balanced_work(crow, values.shape[0], bal, gated=True)
                    x = torch.randn(3, in_f).to(dtype)
                    y = _runners.run_triton(x, values, crow.int(), col.int(), work, None, out_f, "silu_mul", "ieee",
                                            cfg)
                    full = reference(x, w, None, None)
                    err = rel_err(y, F.silu(full[:, : out_f // 2]) * full[:, out_f // 2 :])
                    assert err < tol, ("silu_mul", out_f, block, bal, dtype, err)
    sums, counters = _triton_bsr._workspaces[-1]
    assert sums.abs().sum() == 0 and counters.abs().sum() == 0, "the workspace must be left zeroed"
    layer = BlockSparseLinear.from_dense(skewed(96, 160, (32, 32), torch.float32), torch.randn(96), block_size=32)
    layer.dispatch[16] = {"backend": "triton", "config": {**cfg, "KB": 1, "BAL": 2}, "precision": "ieee"}
    x = torch.randn(2, 3, 160)
    with torch.no_grad():
        err = rel_err(layer(x), reference(x, layer.to_dense_weight(), layer.bias))
    assert err < 1e-5 and "_balanced2" in layer._buffers, (err, list(layer._buffers))
    print("balanced decode ok")
    """
)


@pytest.mark.slow
def test_balanced_decode_kernel_in_interpreter():
    run_in_interpreter(_BALANCED_SCRIPT, expect="balanced decode ok")


def test_kept_workspaces_are_allocated_off_the_calling_thread(monkeypatch):
    """torch.compile's reduce-overhead warm-up routes every allocation of the calling thread into its CUDA-graph
    pool; a workspace kept across calls must come from the ordinary pool, so it is made on a thread of its own.
    (CUDA's device and stream calls are stood in for here: the mechanism is what is checked.)"""
    import contextlib
    import threading

    from superblock.kernels import _triton_bsr

    class _Stream:
        synced = 0

        def synchronize(self):
            _Stream.synced += 1

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    caller = threading.current_thread()
    seen = []
    made = _triton_bsr.outside_graph_pools(
        lambda: seen.append(threading.current_thread()) or "ws", torch.device("cuda")
    )
    assert made == "ws" and seen and seen[0] is not caller and _Stream.synced == 1

    def fails():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # an error on the worker reaches the caller
        _triton_bsr.outside_graph_pools(fails, torch.device("cuda"))
    assert _triton_bsr.outside_graph_pools(lambda: threading.current_thread(), torch.device("cpu")) is caller


def test_tuning_runs_balanced_candidates_with_their_work_list(monkeypatch):
    """The tuner times each candidate as a plan would run it: a balanced decode config gets its work list (without
    it the launch refuses, and a refused candidate is silently left out of the measurement)."""
    from superblock.kernels._triton_bsr import WORK_WIDTH

    seen = []

    def fake_run_triton(x2d, values, crow, col, gidx, bias, out_f, activation, precision, cfg, y=None, wrap=None):
        _runners._check_config(out_f, values, gidx, activation, cfg)  # what the real launch checks first
        seen.append((dict(cfg), gidx))
        return y

    monkeypatch.setattr(_runners, "run_triton", fake_run_triton)
    monkeypatch.setattr(tuning_mod, "time_graph", lambda fn, *a, **k: (fn(), 1.0)[1])
    monkeypatch.setattr(tuning_mod, "replays_as_called", lambda fn: True)  # no graphs on a CPU
    layer = _sparse_layer(per_row=3)
    x2d = torch.randn(1, layer.in_features)
    args = (x2d, layer.values, layer.crow_indices, layer.col_indices, layer.shape, layer.bias, None)
    cands = tuning_mod.decode_configs(1, 64, 64, 3.0)
    gpu_ms, configs, _ = tuning_mod._time_triton(args, "ieee", cands)
    assert len(configs) == len({tuple(sorted(c.items())) for c in cands})  # none refused
    balanced = [(c, g) for c, g in seen if c.get("BAL")]
    assert {c["BAL"] for c, _ in balanced} == {2, 4}
    for c, work in balanced:
        assert work.shape == (4 + layer.values.shape[0] // c["BAL"], WORK_WIDTH)
    assert all(g is None for c, g in seen if not c.get("BAL"))


def test_graph_times_leave_out_a_finalist_whose_replay_differs(monkeypatch):
    """For the CUDA-graph target a finalist that replays something else than it computes is not timed (so never
    chosen), with a warning; the others are timed as before."""

    def torch_call():
        return None

    def dense_call():
        return None

    monkeypatch.setattr(tuning_mod, "time_graph", lambda fn, *a, **k: 1.0)
    monkeypatch.setattr(tuning_mod, "replays_as_called", lambda fn: fn is not torch_call)
    with pytest.warns(RuntimeWarning, match="torch's CUDA-graph replay differs"):
        times = tuning_mod._graph_times({"torch": torch_call, "dense": dense_call}, {})
    assert times == {"dense": 1.0}
