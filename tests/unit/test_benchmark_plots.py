"""The speed benchmarks' report half runs without a GPU: saved rows give the markdown table and the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import vit_e2e  # noqa: E402

ROWS = Path(__file__).resolve().parents[2] / "docs" / "data" / "vit_e2e_2026-11-29.jsonl"


def test_replot_draws_the_table_and_plot_of_saved_rows(tmp_path, capsys):
    vit_e2e.main(["--replot", str(ROWS), "--out", str(tmp_path), "--tag", "t"])
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    table = (tmp_path / "t.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| bf16") or line.startswith("| fp32")]
    assert len(body) == len({(r["dtype"], r["block"], r["runtime"]) for r in rows})
    compile_row = next(line for line in body if "| compile |" in line)
    assert "1.83x (23.61/12.89)" in compile_row  # b256 of the saved compile rows
    assert "| fp32 | 64 | cudagraph | 1.09x (2.07/1.91) | - |" in table[-1]  # fp32 was not run at batch 8
    png = (tmp_path / "t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "compile" in capsys.readouterr().out


def test_lm_layers_replot_draws_saved_rows(tmp_path):
    from benchmarks import lm_layers

    saved = ROWS.parent / "lm_layers_2026-11-29.json"
    lm_layers.main(["--replot", str(saved), "--out", str(tmp_path)])
    png = (tmp_path / "lm_layers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_vit_e2e_takes_tile_shapes_on_one_pattern():
    """--blocks 64,64x16,32: one random pattern at a tile all of them divide, so every shape keeps the same weights."""
    import torch

    blocks = vit_e2e.parse_blocks("32,64x16,64")
    assert blocks == [(64, 64), (64, 16), (32, 32)] and vit_e2e.pattern_block(blocks) == (64, 64)
    assert vit_e2e.pattern_block(vit_e2e.parse_blocks("64x16,16x64")) == (64, 64)
    assert [vit_e2e.block_name(b) for b in blocks] == ["64", "64x16", "32"]
    w = torch.ones(256, 512)
    vit_e2e.zero_random_blocks(w, (64, 64), 0.75, torch.Generator().manual_seed(0))
    kept = w.view(4, 64, 8, 64).amax(dim=(1, 3))
    assert kept.sum() == 8 and bool((w.view(4, 64, 8, 64).amin(dim=(1, 3)) == kept).all())  # whole 64 x 64 blocks


def test_lm_layers_masks_keep_exactly_their_share_and_skew_rows_on_request():
    from benchmarks import lm_layers

    even = lm_layers.random_block_mask(64, 64, 0.9, torch.Generator().manual_seed(0))
    skewed = lm_layers.random_block_mask(64, 64, 0.9, torch.Generator().manual_seed(0), row_skew=1.0)
    assert even.sum() == skewed.sum() == round(0.1 * 64 * 64)
    # uneven rows: the longest block row of the skewed mask holds far more than the even mask's
    assert skewed.sum(1).max() > 2 * even.sum(1).max() and skewed.sum(1).float().std() > 2 * even.sum(1).float().std()


def test_lm_e2e_times_generate_beside_its_own_decode_loop(tmp_path):
    """lm_e2e --generate on a tiny Llama on the CPU: both models get a generate() rate (eager here; the static
    cache and reduce-overhead on a GPU), and the table has the row beside the loop's."""
    from benchmarks import lm_e2e

    tiny = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2"]
    tiny += ["--vocab", "1000", "--prefill", "64", "--prompt", "8", "--new-tokens", "4", "--device", "cpu"]
    lm_e2e.main([*tiny, "--generate", "--rounds", "1", "--reps", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "lm_e2e.json").read_text())["rows"]
    assert set(rows) == {"dense", "sparse"}
    assert all(r["generate_tok_s"] > 0 and r["generate_runtime"] == "generate(), eager" for r in rows.values())
    assert all(r["graph_tok_s"] > 0 and "graph_decoding" in r["graph_runtime"] for r in rows.values())
    table = (tmp_path / "lm_e2e.md").read_text()
    assert "| greedy decode through generate(), batch 1 (tokens/s) | sparse |" in table
    assert "| greedy decode through generate() with graph_decoding, batch 1 (tokens/s) | sparse |" in table
    # the loop timed as generate() is, prompt included: slower than the steps alone
    assert all(0 < r["decode_with_prompt_tok_s"] < r["decode_tok_s"] for r in rows.values())
    assert "| greedy decode, the loop with its prompt's prefill (tokens/s, as generate() is timed) | sparse |" in table


def test_lm_e2e_stopped_part_way_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """The table and JSON are written after every row: a run stopped while it builds the sparse model (a device
    call's time limit) keeps the dense row."""
    from benchmarks import lm_e2e

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_e2e, "to_sparse", stopped)
    tiny = ["--layers", "1", "--hidden", "128", "--intermediate", "256", "--heads", "2", "--kv-heads", "1"]
    tiny += ["--vocab", "100", "--prefill", "16", "--prompt", "4", "--new-tokens", "2", "--device", "cpu"]
    with pytest.raises(KeyboardInterrupt):
        lm_e2e.main([*tiny, "--rounds", "1", "--reps", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "lm_e2e.json").read_text())["rows"]
    assert set(rows) == {"dense"} and rows["dense"]["decode_tok_s"] > 0
    assert "| dense |" in (tmp_path / "lm_e2e.md").read_text()


def test_lm_e2e_decodes_a_batch(tmp_path):
    """--batch 3: three prompts decoded at once (the loop, generate() and graph_decoding), tokens/s counting every
    sequence's tokens, each step checked against a cache-free forward of the three sequences."""
    from benchmarks import lm_e2e

    tiny = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2"]
    tiny += ["--vocab", "1000", "--prefill", "64", "--prompt", "8", "--new-tokens", "4", "--device", "cpu"]
    lm_e2e.main([*tiny, "--batch", "3", "--generate", "--rounds", "1", "--reps", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "lm_e2e.json").read_text())["rows"]
    assert lm_e2e.decode_prompt(lm_e2e.parse_args([*tiny, "--batch", "3"])).shape == (3, 8)
    for row in rows.values():
        assert row["checks"]["step_vs_cache_free"] < 5e-2  # bf16 on a CPU
        assert row["decode_tok_s"] > 0 and row["generate_tok_s"] > 0 and row["graph_tok_s"] > 0
    table = (tmp_path / "lm_e2e.md").read_text()
    assert "| greedy decode, batch 3 (tokens/s; prompt 8, 4 new) | sparse |" in table
    assert "| greedy decode through generate() with graph_decoding, batch 3 (tokens/s) | sparse |" in table


def test_lm_e2e_measures_one_sparse_model_per_level_and_plots_them(tmp_path, monkeypatch):
    """--sparsity 0.5,0.9: one sparse row per level, each keeping its share of blocks, beside one dense row; the
    table labels the levels and the plot is drawn. A measured model may hold what cannot be copied (on a GPU, the
    CUDA graphs of graph_decoding): the sparse models are built, not copied from it."""
    import threading

    from benchmarks import lm_e2e

    measure = lm_e2e.measure

    def measured(model, args):
        row = measure(model, args)
        model.uncopyable = threading.Lock()  # as a CUDAGraph: deepcopy raises on it
        return row

    monkeypatch.setattr(lm_e2e, "measure", measured)
    tiny = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2"]
    tiny += ["--vocab", "1000", "--prefill", "64", "--prompt", "8", "--new-tokens", "4", "--device", "cpu"]
    lm_e2e.main([*tiny, "--sparsity", "0.5,0.9", "--rounds", "1", "--reps", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "lm_e2e.json").read_text())["rows"]
    assert set(rows) == {"dense", "sparse@0.5", "sparse@0.9"}
    assert abs(rows["sparse@0.5"]["kept_fraction"] - 0.5) < 0.02
    assert abs(rows["sparse@0.9"]["kept_fraction"] - 0.1) < 0.02
    assert all(r["decode_tok_s"] > 0 and r["prefill_ms"] > 0 for r in rows.values())
    assert "choices" not in rows["dense"] and sum(rows["sparse@0.9"]["choices"]["16"].values()) == 2 * 7
    table = (tmp_path / "lm_e2e.md").read_text()
    assert "`auto` in sparse@0.9 (layers per backend / kernel, per token bucket): up to 16 tokens: " in table
    assert "| sparse, 50% |" in table and "| sparse, 90% |" in table and "sparsity 0.5, 0.9 block 64" in table
    assert (tmp_path / "lm_e2e_sparsity.png").stat().st_size > 10_000
    for bad in (["--sparsity", "0.5,1.2"], ["--sparsity", "0.5,0.9", "--dense-weights", "zeroed"]):
        with pytest.raises(SystemExit):
            lm_e2e.parse_args(bad)
    args = lm_e2e.parse_args([*tiny, "--sparsity", "0.75"])
    dense = lm_e2e.zero_blocks(lm_e2e.build_dense(args), args, 0.75)  # --dense-weights zeroed: the sparse model's
    w = dense.model.layers[1].mlp.down_proj.weight  # zeros, the same blocks as to_sparse's at that level
    kept = lm_e2e.to_sparse(args, 0.75).model.layers[1].mlp.down_proj.to_dense_weight()
    assert (w.reshape(4, 64, 8, 64).abs().sum((1, 3)) > 0).float().mean() == 0.25 and torch.equal(kept, w)


def test_recipe_ladder_draws_the_shipped_smollm2_rows(tmp_path, capsys):
    from benchmarks import recipe_ladder

    saved = ROWS.parent / "smollm2_ladder_h100.csv"
    out = tmp_path / "ladder.png"
    recipe_ladder.main([str(saved), "--within", "0.5=0.10,0.7=0.25", "--out", str(out)])
    table = capsys.readouterr().out
    best = next(line for line in table.splitlines() if line.startswith("| 50% | + lr 3e-4"))
    assert "16.06" in best and "+89%" in best and "<= 9.35" in best  # 8.503 x 1.10
    first2 = next(line for line in table.splitlines() if line.startswith("| 50% | + layers 0-1 dense"))
    assert "14.79" in first2 and "+74%" in first2
    assert "(330 steps)" in table  # a row shorter than the dense reference says so
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recipe_ladder_refuses_rows_without_a_dense_reference(tmp_path):
    from benchmarks import recipe_ladder

    bad = tmp_path / "rows.csv"
    bad.write_text("level,recipe,perplexity,std,seeds,per_byte,steps,source\n0.5,x,20,,1,2.0,600,\n")
    with pytest.raises(SystemExit, match="dense fine-tune"):
        recipe_ladder.main([str(bad), "--out", str(tmp_path / "p.png")])


def test_lm_e2e_replay_check_feeds_each_replay_the_eager_steps_token():
    """The replayed step is checked on the eager steps' own tokens: a replay whose argmax goes the other way on a
    near-tie (here: every token it picks is replaced) still matches the eager logits, and a replay that is really
    wrong (one that ignores its input token) is still far off."""
    from benchmarks import lm_e2e

    tiny = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2"]
    args = lm_e2e.parse_args([*tiny, "--vocab", "1000", "--prompt", "8", "--new-tokens", "4", "--device", "cpu",
                              "--batch", "3"])  # fmt: skip
    dec = lm_e2e.Decoder(lm_e2e.build_dense(args), args, lm_e2e.decode_prompt(args))

    class Replay:  # stands in for the captured graph: the step, with what a faulty replay would do around it
        def __init__(self, before=lambda: None, after=lambda: None):
            self.before, self.after = before, after

        def replay(self):
            self.before()
            dec.step()
            self.after()

    with torch.no_grad():
        toks, eager, full = lm_e2e.eager_steps(dec)
        flipped = lm_e2e.replay_checks(dec, Replay(after=lambda: dec.tok.add_(1).remainder_(1000)), toks, eager, full)
        baked = lm_e2e.replay_checks(dec, Replay(before=lambda: dec.tok.fill_(7)), toks, eager, full)  # input ignored
    assert flipped["graph_vs_eager"] < 1e-6 and flipped["graph_vs_cache_free"] < 5e-2
    assert baked["graph_vs_eager"] > 0.1 and baked["graph_vs_cache_free"] > 0.1
