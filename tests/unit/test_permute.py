"""sparsity.permute: permutations of hidden units / attention dims that fit the tiles, the function unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from superblock.config import ConfigError, to_config
from superblock.models import build_model
from superblock.sparsity import fold_masks, iter_block_masks, sparsify
from superblock.sparsity.permute import (
    _Problem,
    apply_permutations,
    find_couplings,
    permute_model,
    reset_scores,
    search,
    stored,
)

TEXT = {"task": "causal_lm", "config": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32}}


@torch.no_grad()
def _uneven(model: nn.Module, seed: int = 0) -> None:
    """Trained weights are not i.i.d.: rows of very different norms, so that where they sit in the grid matters."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 2:
            p.mul_(torch.rand(p.shape[0], 1, generator=g).pow(3) * 3)
        elif not p.any():
            p.normal_(0.0, 0.1, generator=g)


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    if name.startswith("hf:"):
        pytest.importorskip("transformers")
        config = (
            {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 32}
            if name == "hf:gpt2"
            else {
                "num_hidden_layers": 1,
                "hidden_size": 64,
                "intermediate_size": 96,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "max_position_embeddings": 32,
            }
        )
        model = build_model(name, num_classes=97, task="causal_lm", config=config)
        return model.eval(), torch.randint(0, 97, (2, 12))
    kwargs = {"depth": 2, "embed_dim": 64, "num_heads": 2} if name.startswith("timm:") else {}
    model = build_model(name, num_classes=10, image_size=32, **kwargs)
    return model.eval(), torch.randn(2, 3, 32, 32)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("name", ["micro_vit", "timm:vit_tiny_patch16_224", "hf:gpt2", "hf:llama"])
@pytest.mark.parametrize("block", [8, 16, 64])
def test_function_unchanged_and_more_magnitude_kept(name: str, block: int) -> None:
    torch.set_num_threads(1)
    model, x = _model(name)
    _uneven(model)
    before = copy.deepcopy(model)
    report = permute_model(
        model,
        "mlp+heads",
        block_size=(block, block),
        sparsity=0.8,
        targets=["all_linear"] if name == "hf:llama" else ["mlp", "attn"],
    )
    assert report.couplings > 0
    torch.testing.assert_close(_logits(model, x), _logits(before, x), rtol=1e-5, atol=1e-5)
    assert report.kept_after >= report.kept_before
    if block < 64:  # with rows of uneven norms there is always something to gather at small blocks
        assert report.permuted > 0 and report.kept_after > report.kept_before + 1e-3
        changed = [
            n for (n, p), q in zip(model.named_parameters(), before.parameters(), strict=True) if not torch.equal(p, q)
        ]
        assert changed, "a permutation was reported but no weight moved"


def test_couplings_of_each_layout() -> None:
    model, _ = _model("micro_vit")
    names = [c.name for c in find_couplings(model, "mlp+heads", (8, 8))[0]]
    assert "encoder.layers.encoder_layer_0.mlp" in names
    assert "encoder.layers.encoder_layer_0.self_attention:qk" in names  # head dim 32 holds whole 8-tiles
    heads = [c.name for c in find_couplings(model, "mlp+heads", (64, 64))[0]]
    assert "encoder.layers.encoder_layer_0.self_attention:heads" in heads  # a 64-tile spans two 32-wide heads
    assert all(":" not in n for n in (c.name for c in find_couplings(model, "mlp", (8, 8))[0]))
    assert find_couplings(model, "none", (8, 8)) == ([], [])
    with pytest.raises(ValueError, match="mlp\\+heads"):
        find_couplings(model, "everything", (8, 8))


def _mlp_holder(hidden: int = 100, seed: int = 0) -> tuple[nn.Module, nn.Sequential]:
    mlp = nn.Sequential()
    mlp.fc1, mlp.act, mlp.fc2 = nn.Linear(40, hidden), nn.GELU(), nn.Linear(hidden, 36)
    holder = nn.Module()
    holder.mlp = mlp
    _uneven(holder, seed)
    return holder, mlp


@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 32), (48, 16)])
@pytest.mark.parametrize("seed", range(3))
def test_search_never_loses_magnitude_even_on_ragged_shapes(seed: int, block: tuple[int, int]) -> None:
    """100 hidden units: a ragged edge tile; tall and wide tiles group fc1's rows and fc2's columns differently."""
    torch.manual_seed(seed)
    holder, mlp = _mlp_holder(100, seed)
    [coupling], _ = find_couplings(holder, "mlp", block)
    targeted = {(id(mlp.fc1), "weight"): block, (id(mlp.fc2), "weight"): block}
    before, after, perm = search(_Problem(coupling, targeted, 0.75))
    assert after >= before and sorted(perm.tolist()) == list(range(100))


@pytest.mark.parametrize("block", [(64, 16), (16, 64), (32, 8), (16, 16)])
def test_the_search_scores_tall_tiles_as_the_weights_are_tiled(block: tuple[int, int]) -> None:
    """What the search believes it keeps (fine slots, the coarser grouping a union of them) is what the permuted
    weights' own top-k tiles keep, and it is more than before: a tall tile is (out rows, in cols) in fc1 and fc2."""
    holder, mlp = _mlp_holder(128, seed=3)
    x = torch.randn(5, 40)
    want = holder.mlp(x)
    report = permute_model(holder, "mlp", block_size=block, sparsity=0.75, targets=["mlp.fc1.weight", "mlp.fc2.weight"])
    torch.testing.assert_close(holder.mlp(x), want, rtol=1e-5, atol=1e-5)
    assert report.permuted == 1 and report.kept_after > report.kept_before + 1e-3
    [coupling], _ = find_couplings(holder, "mlp", block)
    targeted = {(id(mlp.fc1), "weight"): block, (id(mlp.fc2), "weight"): block}
    problem = _Problem(coupling, targeted, 0.75)
    assert problem.fine == min(block) and problem.slots == 128 // min(block)
    identity = problem.evaluate(torch.arange(128))[0] / problem.total()
    assert identity == pytest.approx(report.kept_after, rel=1e-9)  # the weights moved: identity is now the best


def test_tiles_that_do_not_nest_along_the_units_are_left_alone() -> None:
    holder, _ = _mlp_holder(96)
    targets = ["mlp.fc1.weight", "mlp.fc2.weight"]
    report = permute_model(holder, "mlp", block_size=(24, 16), sparsity=0.75, targets=targets)
    assert report.permuted == 0 and any("do not nest" in why for why in report.skipped)


@pytest.mark.parametrize("name", ["micro_vit", "timm:vit_tiny_patch16_224", "hf:gpt2", "hf:llama"])
@pytest.mark.parametrize("block", [(32, 8), (8, 32)])
def test_rectangular_tiles_permute_attention_and_mlp(name: str, block: tuple[int, int]) -> None:
    torch.set_num_threads(1)
    model, x = _model(name)
    _uneven(model)
    before = copy.deepcopy(model)
    targets = ["all_linear"] if name == "hf:llama" else ["mlp", "attn"]
    report = permute_model(model, "mlp+heads", block_size=block, sparsity=0.8, targets=targets)
    torch.testing.assert_close(_logits(model, x), _logits(before, x), rtol=1e-5, atol=1e-5)
    couplings, _ = find_couplings(model, "mlp+heads", block)
    assert not report.skipped
    if name != "hf:llama":  # Llama's separate q/k/v projections are not coupled (its MLP is)
        assert any(c.name.endswith(":v") for c in couplings)
    assert report.permuted > 0 and report.kept_after > report.kept_before + 1e-3


def test_optimizer_state_is_permuted_with_the_weights() -> None:
    """Training on after a permutation equals permuting after training on: Adam's moments moved with the weights."""
    model, x = _model("micro_vit")
    _uneven(model)
    model.train()
    # eps: gradients that are exactly 0 in theory (attention's k bias) are float noise that Adam would blow up to lr
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3)

    def step(m: nn.Module, o: torch.optim.Optimizer) -> None:
        torch.manual_seed(1)
        m(x).square().mean().backward()
        o.step()
        o.zero_grad()

    step(model, opt)
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, eps=1e-3)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own step counters
    report = permute_model(model, "mlp+heads", block_size=(8, 8), sparsity=0.8, optimizers=[opt])
    assert report.permuted > 0
    step(model, opt)  # permuted, then a step
    step(twin, twin_opt)  # a step, then the same permutation
    apply_permutations(twin, report.perms, (8, 8), "mlp+heads", [twin_opt])
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], twin_opt.state[q][key], rtol=1e-4, atol=1e-9)


def test_a_masked_model_folds_to_the_unpermuted_model_under_the_same_masks() -> None:
    """Export needs nothing to undo: the folded permuted model computes what the dense, unpermuted model computes
    with the same (un-permuted) element masks."""
    model, x = _model("micro_vit")
    _uneven(model)
    dense = copy.deepcopy(model)
    report = permute_model(model, "mlp+heads", block_size=(8, 8), sparsity=0.8)
    sparsify(model, sparsity=0.8, block_size=8, score_init="magnitude")
    folded = fold_masks(copy.deepcopy(model))
    torch.testing.assert_close(_logits(folded, x), _logits(model, x), rtol=1e-5, atol=1e-5)
    inverse = {k: torch.argsort(p) for k, p in report.perms.items()}
    apply_permutations(folded, inverse, (8, 8), "mlp+heads")  # back to the dense model's order
    originals = dict(dense.named_parameters())
    for name, p in folded.named_parameters():
        torch.testing.assert_close(p, originals[name] * (p != 0), msg=name)  # the dense weights, masked
    assert any((p == 0).any() for p in folded.parameters())
    torch.testing.assert_close(_logits(folded, x), _logits(model, x), rtol=1e-5, atol=1e-5)


def test_permuting_a_masked_model_and_drawing_its_scores_again() -> None:
    model, x = _model("micro_vit")
    _uneven(model)
    sparsify(model, sparsity=0.8, block_size=8, score_init="magnitude")
    originals = {n: stored(m, p).clone() for n, m, p, _ in iter_block_masks(model)}
    permute_model(model, "mlp", block_size=(8, 8), sparsity=0.8)
    reset_scores(model, "magnitude")
    for name, module, pname, mask in iter_block_masks(model):
        fresh = stored(module, pname)
        if not torch.equal(fresh, originals[name]):
            from superblock.sparsity.mask import init_scores

            torch.testing.assert_close(mask.scores, init_scores(fresh, (8, 8), "magnitude"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"permute": "all"}, "sparsity.permute"),
        ({"permute": "mlp", "block_overrides": [{"match": "*.fc1", "block": [16, 0]}]}, "block_overrides"),
    ],
)
def test_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        to_config({"sparsity": overrides})
    with pytest.raises(ConfigError, match="FSDP"):
        to_config({"sparsity": {"permute": "mlp"}, "trainer": {"strategy": "fsdp"}})


def test_the_permutation_happens_when_tiles_are_first_cut() -> None:
    from superblock.engine.permutation import first_cut

    assert first_cut({"schedule": "cubic", "start_step": 40, "initial_sparsity": 0.0}) == 40  # after a dense warm-up
    assert first_cut({"schedule": "cubic", "start_step": 40, "initial_sparsity": 0.5}) == 0  # cut from the start
    assert first_cut({"schedule": "constant", "start_step": 40}) == 0


def test_a_permutation_at_the_ramp_measures_activation_scores_again() -> None:
    """sparsity.score_init=activation with a later ramp start: the permutation hook re-measures the scores through
    the permuted model (its `rescore`), not magnitude scores of the permuted weights."""
    from superblock.engine.permutation import schedule_permutation
    from superblock.sparsity import get_controller
    from superblock.sparsity.calibrate import activation_scores, calibrate_scores, input_dim, input_norms
    from superblock.sparsity.mask import init_scores

    model, x = _model("micro_vit")
    _uneven(model)
    x = x * torch.linspace(0.1, 10.0, 32)  # inputs of uneven scale: activation and magnitude scores differ
    spec = {"block_size": [8, 8], "sparsity": 0.8, "schedule": "linear", "start_step": 2, "score_init": "activation"}
    spec["targets"] = ["mlp"]
    sparsify(model, sparsity=0.8, block_size=8, schedule="linear", start_step=2, ramp_steps=4, score_init="activation",
             targets=["mlp"])  # fmt: skip

    def forward(m: nn.Module, batch: torch.Tensor) -> None:
        m(batch)

    calls = []

    def rescore() -> None:
        calls.append(get_controller(model).step_count)
        calibrate_scores(model, [x], forward)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule_permutation(model, "mlp", spec, opt, None, seed=0, announce=False, rescore=rescore)
    controller = get_controller(model)
    controller.step()
    assert calls == [] and controller.permutation is None
    controller.step()  # the ramp's first step: permuted, then measured again
    assert calls == [1] and controller.permutation["permuted"] > 0
    squares = input_norms(model, [x], forward)
    differs = False
    for name, module, pname, mask in iter_block_masks(model):
        weight = stored(module, pname)
        torch.testing.assert_close(mask.scores, activation_scores(weight, mask.block, squares[name], input_dim(module)))
        differs |= not torch.allclose(mask.scores, init_scores(weight, mask.block, "magnitude"))
    assert differs


def test_the_search_runs_on_one_thread_and_gives_the_callers_count_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small steps: several intra-op threads per run (and several runs on one host) made SmolLM2's 30 MLPs
    take minutes. The search sees one thread; the caller's count is back afterwards, also after an error."""
    import superblock.sparsity.permute as permute

    seen: list[int] = []
    real = permute.search

    def spy(problem):
        seen.append(torch.get_num_threads())
        return real(problem)

    monkeypatch.setattr(permute, "search", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, _ = _model("micro_vit")
        permute_model(model, "mlp", block_size=16, sparsity=0.75)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(permute, "search", lambda problem: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            permute_model(model, "mlp", block_size=16, sparsity=0.75)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
