"""sparsity.score_init=activation: tile scores from the weights times the norms of the inputs they multiply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from superblock import sparsify
from superblock.sparsity import iter_block_masks
from superblock.sparsity.calibrate import activation_scores, attention_context, calibrate_scores, input_norms


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8, bias=False)
        self.fc2 = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _model() -> TwoLayers:
    torch.manual_seed(0)
    model = TwoLayers()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.eye(8))  # fc2 sees x itself
        model.fc2.weight.fill_(1.0)
        model.fc2.weight[:, :4] = 2.0  # by magnitude the first half of fc2's columns wins
    return model


def test_activation_scores_keep_the_tiles_that_multiply_large_inputs():
    model = _model()
    sparsify(model, sparsity=0.5, block_size=(4, 4), targets=["fc2.weight"], score_init="activation")
    (mask,) = [m for *_, m in iter_block_masks(model)]
    assert mask.scores[0, 0] > mask.scores[0, 1]  # before calibration: magnitude
    x = torch.ones(16, 8)
    x[:, 4:] = 10.0  # the second half of the inputs is 10x larger
    batches = [(x[:8],), (x[8:],)]
    n = calibrate_scores(model, batches, lambda m, b: m(b[0]))
    assert n == 1 and mask.scores[0, 1] > mask.scores[0, 0]
    # the score is the RMS of weight * input norm over the tile: 2 * sqrt(16) vs 1 * sqrt(1600)
    torch.testing.assert_close(mask.scores, torch.tensor([[8.0, 40.0]]))
    y = model(torch.ones(1, 8))
    torch.testing.assert_close(y, torch.full((1, 4), 4.0))  # the kept tile is the second: 4 inputs x weight 1


def test_input_norms_sum_every_token_and_follow_a_transposed_store():
    model = _model()
    sparsify(model, sparsity=0.5, block_size=(4, 4), targets=["fc1.weight", "fc2.weight"])
    x = torch.arange(24.0).view(3, 8)
    sums = input_norms(model, [x], lambda m, b: m(b), reduce=lambda t: t.mul_(2))  # e.g. two ranks alike
    torch.testing.assert_close(sums["fc1.weight"], 2 * x.pow(2).sum(0))
    w = torch.randn(8, 4)  # (in, out), as GPT-2's Conv1D stores it
    scores_t = activation_scores(w, (4, 4), torch.arange(8.0), dim=0)
    scores = activation_scores(w.t().contiguous(), (4, 4), torch.arange(8.0), dim=1)
    torch.testing.assert_close(scores_t, scores.t())


def test_a_square_conv1d_is_scaled_along_its_stored_input_dimension():
    """GPT-2's attention out-projection is a square Conv1D: its input features are the stored rows, not columns."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = nn.Sequential(conv1d(8, 8))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    sparsify(model, sparsity=0.5, block_size=(8, 4), targets=["0.weight"], score_init="activation")
    x = torch.ones(4, 8)
    x[:, 4:] = 10.0  # inputs 4..7 are large: the tile holding them (stored rows 4..7) must win
    calibrate_scores(model, [x], lambda m, b: m(b))
    (mask,) = [m for *_, m in iter_block_masks(model)]
    assert mask.scores.shape == (2, 1) and mask.scores[1, 0] > mask.scores[0, 0]
    torch.testing.assert_close(model(torch.ones(1, 8)), torch.full((1, 8), 4.0))  # only inputs 4..7 kept


def test_a_weight_the_batches_never_reach_is_an_error():
    model = _model()
    sparsify(model, sparsity=0.5, block_size=(4, 4), targets=["fc2.weight"], score_init="activation")
    with pytest.raises(ValueError, match="never ran"):
        calibrate_scores(model, [], lambda m, b: m(b))


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_context_is_what_out_proj_multiplies(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    ctx = attention_context(mha, {"query": x, "key": x, "value": x})  # sequence first, like torch's kernel
    out = nn.functional.linear(ctx, mha.out_proj.weight, mha.out_proj.bias)
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(out.transpose(0, 1) if batch_first else out, expected, rtol=1e-5, atol=1e-5)


def test_torchvision_attention_weights_are_calibrated_from_the_attentions_own_call():
    """torchvision's MultiheadAttention reads in_proj_weight and out_proj.weight itself (out_proj's forward never
    runs): in_proj gets the attention's input, out_proj the attention context (the default ViT targets calibrate)."""
    from superblock.models import build_model

    model = build_model("micro_vit", num_classes=10, image_size=32).eval()
    sparsify(model, sparsity=0.5, block_size=8, score_init="activation")  # attention and MLP
    attn = model.encoder.layers[0].self_attention
    seen = []
    attn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    x = torch.randn(3, 3, 32, 32)
    squares = input_norms(model, [x], lambda m, b: m(b))
    prefix = "encoder.layers.encoder_layer_0.self_attention."
    (q,) = seen
    torch.testing.assert_close(squares[prefix + "in_proj_weight"], q.reshape(-1, q.shape[-1]).pow(2).sum(0))
    ctx = attention_context(attn, {"query": q, "key": q, "value": q})
    torch.testing.assert_close(squares[prefix + "out_proj.weight"], ctx.reshape(-1, ctx.shape[-1]).pow(2).sum(0))
    assert calibrate_scores(model, [x], lambda m, b: m(b)) == 8


def test_oneshot_benchmark_runs_both_scores_on_a_tiny_llama(tmp_path):
    """benchmarks/oneshot_lm.py on a converted-like folder: dense, then each score at each tile and sparsity."""
    pytest.importorskip("transformers")
    import json
    import sys
    from pathlib import Path

    from superblock.gguf import save_checked
    from tests.helpers.llama import tiny_llama

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import oneshot_lm

    model, tokenizer = tiny_llama()
    save_checked(model, tokenizer, tmp_path / "tiny", echo=lambda _: None)
    oneshot_lm.main(["--model", str(tmp_path / "tiny"), "--levels", "0.5", "--blocks", "16,16x8", "--seq-len", "16",
                     "--windows", "4", "--calibration", "4", "--out", str(tmp_path / "out")])  # fmt: skip
    rows = json.loads((tmp_path / "out" / "oneshot_lm.json").read_text())["rows"]
    assert [(r["score"], r["block"]) for r in rows] == [("dense", None), ("magnitude", "16"), ("activation", "16"),
                                                        ("magnitude", "16x8"), ("activation", "16x8")]  # fmt: skip
    assert all(r["ppl"] > 1 and r["ppl_byte"] > 1 for r in rows)
    assert rows[1]["ppl"] != rows[0]["ppl"]  # the masks are on
    assert all(r["zeroed"] == pytest.approx(0.5, abs=0.01) for r in rows[1:])
    oneshot_lm.main(["--model", str(tmp_path / "tiny"), "--levels", "0.5", "--blocks", "16", "--seq-len", "16",
                     "--windows", "4", "--calibration", "4", "--scores", "magnitude", "--out", str(tmp_path / "lv"),
                     "--level-overrides", '{"*.up_proj.weight": 0.0}'])  # fmt: skip
    (_, row) = json.loads((tmp_path / "lv" / "oneshot_lm.json").read_text())["rows"]
    assert 0.2 < row["zeroed"] < 0.45  # up_proj kept whole: less than half of all masked weights zeroed
    oneshot_lm.main(["--model", str(tmp_path / "tiny"), "--levels", "0.5", "--blocks", "16", "--seq-len", "16",
                     "--windows", "4", "--calibration", "4", "--scores", "magnitude", "--out", str(tmp_path / "lt"),
                     "--level-overrides", '{"*.up_proj.weight": 0.0}', "--level-total"])  # fmt: skip
    (_, row) = json.loads((tmp_path / "lt" / "oneshot_lm.json").read_text())["rows"]
    assert row["zeroed"] == pytest.approx(0.5, abs=0.04)  # the others make up up_proj's share (16 x 16 tiles round)
    oneshot_lm.main(["--model", str(tmp_path / "tiny"), "--levels", "0.5", "--blocks", "16", "--seq-len", "16",
                     "--windows", "4", "--calibration", "4", "--scores", "magnitude", "--out", str(tmp_path / "bo"),
                     "--block-overrides", '{"*.down_proj.weight": "8x16"}'])  # fmt: skip
    (_, row) = json.loads((tmp_path / "bo" / "oneshot_lm.json").read_text())["rows"]
    assert row["ppl"] != rows[1]["ppl"]  # the same run as rows[1] but down_proj's tiles: another mask
    assert "tile overrides {'*.down_proj.weight': '8x16'}" in (tmp_path / "bo" / "oneshot_lm.md").read_text()
    oneshot_lm.main(["--model", str(tmp_path / "tiny"), "--levels", "0.5", "--blocks", "16", "--seq-len", "16",
                     "--windows", "4", "--calibration", "4", "--scores", "activation+refit,activation+select",
                     "--out", str(tmp_path / "sel")])  # fmt: skip
    _, refit, chosen = json.loads((tmp_path / "sel" / "oneshot_lm.json").read_text())["rows"]
    assert chosen["score"] == "activation+select" and chosen["ppl"] != refit["ppl"]  # other tiles, other weights
    assert chosen["zeroed"] == pytest.approx(refit["zeroed"])  # as many tiles kept
    with pytest.raises(SystemExit, match="refit or select"):
        oneshot_lm.main(["--model", str(tmp_path / "tiny"), "--scores", "activation+obs", "--out", str(tmp_path / "x")])
    # the two runs' rows in one table and plot (one dense row), the override named on its row
    oneshot_lm.main(["--model", "unused", "--replot", f"{tmp_path / 'out' / 'oneshot_lm.json'},"
                     f"{tmp_path / 'bo' / 'oneshot_lm.json'}", "--out", str(tmp_path / "both")])  # fmt: skip
    table = (tmp_path / "both" / "oneshot_lm.md").read_text()
    assert sum(line.startswith("| dense |") for line in table.splitlines()) == 1
    assert table.count("| 16x16") == 3 and "16x16, down_proj 8x16" in table
    assert (tmp_path / "both" / "oneshot_lm.png").read_bytes()[:4] == b"\x89PNG"
