"""sparsity.select=output_error: the refit chooses its own tiles, removing the one that costs least each time."""

from __future__ import annotations

import pytest
import torch

from superblock import sparsify
from superblock.sparsity import get_controller, iter_block_masks
from superblock.sparsity.blocks import expand_blocks
from superblock.sparsity.reconstruct import DAMPING, reconstruct_weights, refit_rows
from superblock.sparsity.select import RowRemovals, reorder_scores, select_tiles

from .test_reconstruct import Stack, _correlated, _sparse_stack


def _damped(gram: torch.Tensor) -> torch.Tensor:
    h = gram.double().clone()
    h.diagonal().add_(DAMPING * gram.double().diagonal().mean())
    return h


def _best_refit(w0: torch.Tensor, h: torch.Tensor, cols: list[int]) -> tuple[torch.Tensor, float]:
    """Brute force: the rows' weights on `cols` that minimise (w - w0) H (w - w0)^T with every other input zero."""
    k = torch.tensor(cols, dtype=torch.long)
    w = torch.zeros_like(w0)
    w[:, k] = torch.linalg.solve(h[k][:, k], (w0 @ h[:, k]).T).T
    d = w - w0
    return w, float(((d @ h) * d).sum())


def test_a_rows_removals_are_the_brute_force_greedy_and_cost_the_error_they_add():
    """Each step removes the tile whose removal, after the best refit of the rest, leaves the least error; its cost
    is that error's increase. Two block rows at once, each against its own brute force."""
    torch.manual_seed(0)
    w0, x = torch.randn(8, 12, dtype=torch.float64), _correlated(300, 12).double()
    h = _damped(x.T @ x)
    removals = RowRemovals(w0, torch.linalg.inv(h), (4, 3))
    for _ in range(4):
        removals.step()
    for r in range(2):
        gone: list[int] = []
        _, err = _best_refit(w0[4 * r : 4 * r + 4], h, list(range(12)))
        for step in range(4):
            tries = {}
            for c in (c for c in range(4) if c not in gone):
                tries[c] = _best_refit(w0[4 * r : 4 * r + 4], h, [i for i in range(12) if i // 3 not in {*gone, c}])[1]
            best = min(tries, key=tries.get)
            assert removals.tiles[r][step] == best
            assert removals.costs[r][step] == pytest.approx(tries[best] - err, rel=1e-6, abs=1e-9)
            gone.append(best)
            err = tries[best]


@pytest.mark.parametrize("shape", [(8, 16), (10, 14)])  # whole tiles, and edge tiles past the weight's end
def test_the_selection_keeps_the_count_and_leaves_the_refit_of_what_it_keeps(shape):
    torch.manual_seed(1)
    out_f, in_f = shape
    w, x = torch.randn(out_f, in_f), _correlated(400, in_f, seed=1)
    tiles = torch.ones(-(-out_f // 4), -(-in_f // 4))
    tiles.view(-1)[: tiles.numel() // 2] = 0  # the count to keep: half the tiles
    kept, step = select_tiles(w, tiles, (4, 4), x.double().T @ x.double(), DAMPING)
    new = refit_rows(w, kept, (4, 4), x.double().T @ x.double(), toward_dense=True)
    assert kept.sum() == tiles.sum() and kept.dtype == tiles.dtype
    assert sorted(step[step > 0].tolist()) == list(range(1, int((kept == 0).sum()) + 1))
    assert torch.equal(step == 0, kept.bool())
    keep = expand_blocks(kept.bool(), w.shape, (4, 4))
    assert torch.equal(new[~keep], w.double()[~keep])  # removed tiles keep their weights (the mask zeroes them)
    h = torch.zeros(tiles.shape[1] * 4, tiles.shape[1] * 4, dtype=torch.float64)
    h[:in_f, :in_f] = x.double().T @ x.double()
    h.diagonal().add_(DAMPING * (x.double().T @ x.double()).diagonal().mean())
    for r in range(tiles.shape[0]):  # each block row: the damped least-squares refit of its kept inputs
        rows = slice(4 * r, min(4 * r + 4, out_f))
        cols = [i for i in range(in_f) if kept[r, i // 4]]
        w0 = torch.zeros(rows.stop - rows.start, h.shape[0], dtype=torch.float64)
        w0[:, :in_f] = w[rows].double()
        expect, _ = _best_refit(w0, h, cols)
        torch.testing.assert_close(new[rows][keep[rows]], expect[:, :in_f][keep[rows]])


def test_the_selection_drops_a_large_tile_whose_inputs_another_tile_repeats():
    """Inputs 0-3 repeated as 4-7: the two tiles on them are the largest, so the scores keep both and cut the small
    third; the refit's own choice cuts one of the twins (the other takes its place) and loses almost nothing."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(500, 4, generator=g, dtype=torch.float64)
    x = torch.cat([base, base + 1e-3 * torch.randn(500, 4, generator=g, dtype=torch.float64),
                   torch.randn(500, 4, generator=g, dtype=torch.float64)], dim=1)  # fmt: skip
    w = torch.cat([3 * torch.ones(4, 8), 0.5 * torch.ones(4, 4)], dim=1).double()
    gram = x.T @ x
    by_scores = torch.tensor([[1.0, 1.0, 0.0]])
    kept, _ = select_tiles(w, by_scores, (4, 4), gram, DAMPING)
    assert kept[0, 2] == 1 and kept[0, :2].sum() == 1
    new = refit_rows(w, kept, (4, 4), gram, toward_dense=True) * expand_blocks(kept.bool(), w.shape, (4, 4))

    def error(v: torch.Tensor) -> float:
        d = v - w
        return float(((d @ gram) * d).sum() / ((w @ gram) * w).sum())

    refit_of_scores, _ = _best_refit(w, _damped(gram), list(range(8)))
    assert error(new) < 0.01 * error(refit_of_scores)


def test_reordered_scores_keep_the_layers_values_and_select_exactly_the_kept_tiles():
    g = torch.Generator().manual_seed(3)
    for ties in (False, True):
        scores = torch.randn(6, 5, generator=g)
        if ties:
            scores = scores.round()  # many equal values
        kept = torch.zeros(6, 5)
        kept.view(-1)[torch.randperm(30, generator=g)[:11]] = 1
        step = torch.zeros(6, 5, dtype=torch.long)
        step[kept == 0] = torch.randperm(19, generator=g) + 1
        out = reorder_scores(scores, kept, step)
        top = torch.zeros(30)
        top[torch.argsort(out.view(-1), descending=True, stable=True)[:11]] = 1
        assert torch.equal(top.view(6, 5), kept)
        by_step = out[kept == 0][torch.argsort(step[kept == 0])]
        assert torch.all(by_step[1:] >= by_step[:-1])  # the later removed, the higher the score
        if not ties:
            torch.testing.assert_close(torch.sort(out.view(-1)).values, torch.sort(scores.view(-1)).values)


def test_reconstruct_with_output_error_selection_refits_better_and_the_masks_hold():
    batches = [(_correlated(64, 32, seed=s),) for s in range(3)]
    dense, by_scores = _sparse_stack()
    reconstruct_weights(by_scores, batches, lambda m, b: m(b[0]))
    _, model = _sparse_stack()
    follower = Stack()
    sparsify(follower, sparsity=0.5, block_size=(16, 8), targets=["*.0.weight", "*.2.weight"], schedule="constant")
    done = reconstruct_weights(model, batches, lambda m, b: m(b[0]), followers=[follower], select="output_error")
    assert done.select == "output_error" and "output error their removal" in str(done)
    before = [m.mask.clone() for *_, m in iter_block_masks(by_scores)]
    chosen = [m.mask.clone() for *_, m in iter_block_masks(model)]
    assert any(not torch.equal(a, b) for a, b in zip(before, chosen, strict=True))
    assert all(a.sum() == b.sum() for a, b in zip(before, chosen, strict=True))
    get_controller(model).refresh(force=True)  # the scores now give the chosen tiles back
    for (*_, m), c, (*_, f) in zip(iter_block_masks(model), chosen, iter_block_masks(follower), strict=True):
        assert torch.equal(m.mask, c) and torch.equal(f.mask, c) and torch.equal(f.scores, m.scores)
    x = torch.cat([b[0] for b in batches]).double()
    target = dense.layers[0][0].weight.detach().double()

    def first_layer_error(net: Stack) -> float:  # layers.0.0 reads x itself: the same inputs in both models
        d = net.layers[0][0].weight.detach().double() - target  # the masked weight
        return float(((d @ (x.T @ x)) * d).sum())

    assert first_layer_error(model) < first_layer_error(by_scores)
    with pytest.raises(ValueError, match="unknown tile selection"):
        reconstruct_weights(model, batches, lambda m, b: m(b[0]), select="magnitude")


def test_a_weight_too_large_to_select_fails_before_any_pass(monkeypatch):
    import superblock.sparsity.select as select

    _, model = _sparse_stack()
    calls = []
    monkeypatch.setattr(select, "MEMORY_LIMIT", 2 * 64 * 64 * 8 - 1)  # layers.*.2 (32 x 64): 2 rows of 64 inputs
    with pytest.raises(ValueError, match="use sparsity.select=scores"):
        reconstruct_weights(model, [(torch.randn(4, 32),)], lambda m, b: calls.append(m(b[0])), select="output_error")
    assert not calls


def test_the_selection_benchmark_times_each_shape_and_counts_its_removals(capsys):
    from benchmarks import select_tiles as bench

    rows = bench.main(["--shapes", "40x48,48x40", "--blocks", "8x4,8", "--levels", "0.5", "--tokens", "128",
                       "--reps", "1"])  # fmt: skip
    assert [(r["shape"], r["block"]) for r in rows] == [((40, 48), (8, 4)), ((40, 48), (8, 8)),
                                                        ((48, 40), (8, 4)), ((48, 40), (8, 8))]  # fmt: skip
    assert rows[0]["removals"] == 30 and rows[1]["removals"] == 15 and all(r["seconds"] > 0 for r in rows)
    assert "| 48 x 40 | 8 x 8 | 50% | 15 |" in capsys.readouterr().out


def test_a_block_row_of_zeros_is_emptied_first_and_the_others_keep_the_rest():
    """A row whose every removal costs nothing loses all its tiles (its sequence runs out; the merge goes on with
    the other rows), and the count kept is still the mask's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 32, generator=g)
    w = torch.randn(24, 32, generator=g)
    w[8:16] = 0
    tiles = torch.zeros(3, 8)
    tiles.view(-1)[:10] = 1
    kept, step = select_tiles(w, tiles, (8, 4), x.T @ x, DAMPING)
    assert kept[1].sum() == 0 and kept.sum() == 10
    assert sorted(step[1].tolist()) == list(range(1, 9))  # the zero row's tiles are the first eight removed
