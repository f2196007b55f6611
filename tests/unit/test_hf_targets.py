"""Presets on tiny transformers models (BERT, GPT-2, Llama): exactly the expected weights get masks, the heads and
embeddings stay dense, and the masked model computes what its folded copy computes."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from superblock.sparsity import block_sparsity, fold_masks, iter_block_masks, select_targets, sparsify
from superblock.sparsity.targets import is_conv1d

transformers = pytest.importorskip("transformers")

from tests.helpers.hf import CONFIGS  # noqa: E402

VOCAB = 61

PER_BLOCK = {
    "bert": {
        "attn": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
        "mlp": ["intermediate.dense", "output.dense"],
    },
    "gpt2": {"attn": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
    "llama": {
        "attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    },
}
PREFIX = {"bert": "bert.encoder.layer", "gpt2": "transformer.h", "llama": "model.layers"}


def build(model_type: str, task: str = "causal_lm") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **CONFIGS[model_type])
    if task == "causal_lm":
        if model_type == "bert":
            config.is_decoder = True
        return transformers.AutoModelForCausalLM.from_config(config).eval()
    config.num_labels = 3
    config.pad_token_id = 0
    return transformers.AutoModelForSequenceClassification.from_config(config).eval()


def expected(model_type: str, presets: list[str]) -> list[str]:
    names = []
    for i in range(2):
        for preset in ("attn", "mlp"):
            if preset in presets:
                names += [f"{PREFIX[model_type]}.{i}.{m}.weight" for m in PER_BLOCK[model_type][preset]]
    return names


def tokens(n: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("presets", [["mlp"], ["attn"], ["mlp", "attn"]])
def test_presets_select_the_block_projections(model_type, presets):
    for task in ("causal_lm", "sequence_classification"):
        model = build(model_type, task)
        got = [t.name for t in select_targets(model, presets)]
        assert sorted(got) == sorted(expected(model_type, presets)), task


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_all_linear_leaves_heads_poolers_and_embeddings_dense(model_type):
    for task in ("causal_lm", "sequence_classification"):
        model = build(model_type, task)
        got = {t.name for t in select_targets(model, "all_linear")}
        assert got == set(expected(model_type, ["attn", "mlp"])), task
        # without skip_head the heads are linear weights like any other (GPT-2's tied lm_head included)
        more = {t.name for t in select_targets(model, "all_linear", skip_head=False)} - got
        heads = {
            "bert": {"cls.predictions.transform.dense.weight", "cls.predictions.decoder.weight"},
            "gpt2": {"lm_head.weight"},
            "llama": {"lm_head.weight"},
        }[model_type]
        if task == "sequence_classification":
            heads = {"bert": {"bert.pooler.dense.weight", "classifier.weight"}}.get(model_type, {"score.weight"})
        assert more == heads, task


def test_gpt2_conv1d_tiles_are_out_rows_by_in_cols_whatever_the_stored_layout():
    """A block size is (output rows, input columns) for every module: a Conv1D stores (in, out), so its stored tile
    is the transpose, and a tall tile stays tall when the weight is served as (out, in)."""
    model = build("gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc
    assert is_conv1d(c_fc) and tuple(c_fc.weight.shape) == (32, 128)  # stored (in, out)
    report = sparsify(model, sparsity=0.5, block_size=(8, 32), targets=["mlp", "attn"], seed=0)
    row = dict(zip(report.names, report.rows, strict=True))["transformer.h.0.mlp.c_fc.weight"]
    assert row.shape == (128, 32) and row.block == (8, 32) and row.total == (128 // 8) * (32 // 32)
    assert is_conv1d(model.transformer.h[0].mlp.c_fc)  # still recognised once parametrized
    masks = {name: m for name, _, _, m in iter_block_masks(model)}
    mask = masks["transformer.h.0.mlp.c_fc.weight"]
    assert mask.block == (32, 8) and tuple(mask.mask.shape) == (1, 16)  # the stored (32, 128) in (32, 8) tiles
    # the size check reads (out, in): 64 input columns do not fit c_attn's 32 inputs (its 96 outputs would)
    with pytest.raises(ValueError, match=r"larger than weight transformer\.h\.0\.attn\.c_attn\.weight \(96, 32\)"):
        sparsify(build("gpt2"), block_size=(8, 64), targets=["attn"])
    sparsify(build("gpt2"), block_size=(64, 8), targets=["*.c_attn.weight"])  # 64 of its 96 output rows: fits


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_masked_output_equals_folded_output(model_type):
    model = build(model_type)
    sparsify(model, sparsity=0.6, block_size=8, targets=["mlp", "attn"], seed=0)
    x = tokens()
    with torch.no_grad():
        masked = model(x).logits
        folded_model = fold_masks(copy.deepcopy(model))
        folded = folded_model(x).logits
        dense_model = build(model_type)  # same seed: the unmasked weights
        dense = dense_model(x).logits
    torch.testing.assert_close(folded, masked, rtol=0, atol=1e-6)
    assert not torch.allclose(masked, dense, atol=1e-3)  # the masks do change the model
    zeros = block_sparsity(folded_model, 8)
    for name in expected(model_type, ["attn", "mlp"]):
        assert zeros[name] == pytest.approx(0.6, abs=0.13), name
    dense_names = [n for n in zeros if n not in expected(model_type, ["attn", "mlp"])]
    assert dense_names and all(zeros[n] == 0.0 for n in dense_names)
    # embeddings (and every other unmasked tensor) are the dense model's, untouched
    dense_state = dense_model.state_dict()
    masked_modules = {name.rpartition(".")[0] for name in expected(model_type, ["attn", "mlp"])}
    untouched = [k for k in dense_state if k.rpartition(".")[0] not in masked_modules]
    assert any("embed" in k or "wte" in k for k in untouched)
    assert all(torch.equal(folded_model.state_dict()[k], dense_state[k]) for k in untouched)


def test_patterns_still_reach_heads_and_name_conv1d_modules():
    model = build("gpt2")
    assert [t.name for t in select_targets(model, "transformer.h.1.mlp.c_proj")] == [
        "transformer.h.1.mlp.c_proj.weight"
    ]
    assert [t.name for t in select_targets(build("llama"), ["lm_head"])] == ["lm_head.weight"]
    with pytest.raises(ValueError, match="matches no"):
        select_targets(model, "transformer.h.*.mlp.fc1")


# ------------------------------------------------------------------------------------------------ hf: model names

TINY_GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}


def test_hf_model_type_builds_the_plain_transformers_model():
    from superblock.models import build_model, model_spec

    spec = model_spec("hf:gpt2", num_classes=VOCAB, image_size=224, config=TINY_GPT2)
    assert spec == {
        "name": "hf:gpt2",
        "num_classes": VOCAB,
        "image_size": None,
        "pretrained": None,
        "task": "causal_lm",
        "config": TINY_GPT2,
    }
    model = build_model(**spec)
    assert isinstance(model, transformers.GPT2LMHeadModel) and len(model.transformer.h) == 2
    assert model.config.vocab_size == VOCAB and model.lm_head.out_features == VOCAB  # the tokenizer's vocabulary
    assert model.config.eos_token_id is None  # GPT-2's 50256 is no token of a 61-token vocabulary
    assert next(model.parameters()).dtype == torch.float32
    out = model.eval().generate(tokens(1, 4), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)

    clf = build_model("hf:bert", 3, task="sequence_classification", config=CONFIGS["bert"])
    assert isinstance(clf, transformers.BertForSequenceClassification) and clf.classifier.out_features == 3


def test_hf_local_directory_config_and_weights(tmp_path):
    from superblock.models import build_model, model_spec

    source = build("llama")
    source.save_pretrained(tmp_path / "tiny")
    spec = model_spec(f"hf:{tmp_path / 'tiny'}", num_classes=VOCAB)
    # spelled out, so that a checkpoint rebuilds without the directory; its weights are the pretrained ones
    assert spec["name"] == "hf:llama" and spec["pretrained"] == str(tmp_path / "tiny")
    assert spec["config"]["num_key_value_heads"] == 2 and spec["image_size"] is None
    x = tokens()
    with torch.no_grad():
        want = source(x).logits
        torch.testing.assert_close(build_model(**spec).eval()(x).logits, want)
        torch.testing.assert_close(build_model(f"hf:{tmp_path / 'tiny'}", VOCAB).eval()(x).logits, want)
        fresh = build_model(**{**spec, "pretrained": None}).eval()
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in source.parameters()]
    # a vocabulary that is not the weights' resizes the embeddings (and the lm_head)
    bigger = build_model("hf:llama", VOCAB + 3, pretrained=str(tmp_path / "tiny"), config=CONFIGS["llama"])
    assert bigger.lm_head.out_features == VOCAB + 3
    # weights saved in bf16 train in fp32 (the export casts to the serving dtype)
    source.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in build_model(f"hf:{tmp_path / 'bf16'}", VOCAB).parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "hf:gtp2"}, r"unknown transformers model type 'gtp2'.*did you mean hf:gpt2"),
        ({"name": "hf:gpt2", "config": {"n_layers": 2}}, r"GPT2Config has no field 'n_layers' \(did you mean n_layer"),
        ({"name": "hf:gpt2", "task": "seq2seq"}, r"task='seq2seq' is not one of"),
        ({"name": "hf:gpt2", "patch_size": 4}, r"does not take \['patch_size'\]"),
        ({"name": "hf:openai-community/gpt2"}, r"is not a local directory. Models are never downloaded"),
        ({"name": "hf:vit"}, r"has no causal_lm head"),
        ({"name": "hf:gpt2", "num_classes": 0}, r"num_classes must be >= 1"),
        ({"name": "hf:gpt2", "pretrained": "gpt2.safetensors"}, r"must be a local directory with transformers"),
    ],
)
def test_hf_model_errors_name_the_fix(kwargs, message):
    from superblock.models import build_model

    with pytest.raises(ValueError, match=message):
        build_model(**{"num_classes": 5, **kwargs})


def test_missing_transformers_says_how_to_install(monkeypatch, tmp_path):
    from superblock.hf_models import TransformersMissing
    from superblock.models import build_model, model_spec

    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when not installed
    for call in (lambda: build_model("hf:gpt2", 5), lambda: model_spec(f"hf:{tmp_path}", 5)):
        with pytest.raises(TransformersMissing, match=r"transformers is not installed: pip install -e '\.\[lm\]'"):
            call()
    assert issubclass(TransformersMissing, ImportError) and issubclass(TransformersMissing, ValueError)
