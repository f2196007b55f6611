"""Export and serving of transformers models (tiny GPT-2, Llama and BERT twins, CPU): BSR safetensors + manifest,
the equivalence check on token ids, load_sparse -> the transformers model with block-sparse linears, generate()."""

from __future__ import annotations

import pytest
import torch

from superblock.export import export_checkpoint, load_folded, load_sparse, make_runtime, read_manifest
from superblock.export.serving import LM_SAMPLE_TOKENS, SampleInput, check_against_dense
from superblock.export.writer import fold_copy
from superblock.kernels import BlockSparseLinear, token_bucket
from superblock.models import build_model
from tests.helpers.hf import CONFIGS
from tests.helpers.runs import make_run

transformers = pytest.importorskip("transformers")

VOCAB = 61
GPT2, LLAMA, BERT = CONFIGS["gpt2"], CONFIGS["llama"], CONFIGS["bert"]  # the tiny twins of the target tests


def quiet(_: str) -> None:
    pass


def hf_run(path, model_type: str, config: dict, task: str = "causal_lm", num_classes: int = VOCAB, **kw):
    return make_run(
        path,
        f"hf:{model_type}",
        num_classes=num_classes,
        model_kwargs={"task": task, "config": config},
        block_size=kw.pop("block_size", 8),
        sparsity=kw.pop("sparsity", 0.75),
        **kw,
    )


def export(run, out, **kw):
    return export_checkpoint(run, out, **{"device": "cpu", "layout": "bsr", "probe_batch": 2, "echo": quiet, **kw})


def ids(n: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def count(model: torch.nn.Module, name: str) -> int:
    return sum(type(m).__name__ == name for m in model.modules())


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    masked = hf_run(root / "run", "gpt2", GPT2, block_size=(8, 16))
    result = export(root / "run", root / "exp")
    return masked, root, result


def test_gpt2_export_load_sparse_logits_equal_the_masked_model(gpt2):
    masked, root, result = gpt2
    model = load_sparse(root / "exp")
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert count(model, "BlockSparseLinear") == 8 and count(model, "Conv1D") == 0  # every Conv1D became BSR
    x = ids()
    with torch.no_grad():
        want = masked(x).logits
        torch.testing.assert_close(model(x).logits, want, rtol=1e-5, atol=1e-5)
        # the folded dense state dict (a plain GPT-2, Conv1D and tied lm_head included) computes the same
        dense = load_folded(root / "exp")
        assert count(dense, "Conv1D") == 8 and dense.lm_head.weight is dense.transformer.wte.weight
        torch.testing.assert_close(dense(x).logits, want, rtol=1e-5, atol=1e-5)
        # and so does build_model with that file as pretrained weights (the tied lm_head filled from the embedding)
        spec = {**result.manifest["model_spec"], "pretrained": str(root / "exp" / "dense_state_dict.safetensors")}
        torch.testing.assert_close(build_model(**spec).eval()(x).logits, want, rtol=1e-5, atol=1e-5)
    eq = result.manifest["equivalence"]
    assert eq["passed"] and eq["max_rel_err"] < 1e-5 and eq["top1_agreement"] == 1.0


def test_gpt2_export_is_a_verified_distillation_teacher(gpt2, tmp_path):
    """distill.teacher=<export dir>: the folded model (tied lm_head put back) with the folded model's logits; an
    export whose weights file was edited is refused, not loaded."""
    import shutil

    from superblock.engine.distill import load_teacher

    masked, root, _ = gpt2
    spec = read_manifest(root / "exp")["model_spec"]
    teacher = load_teacher(root / "exp", spec, torch.device("cpu"))
    assert not any(p.requires_grad for p in teacher.parameters())
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x).logits, load_folded(root / "exp")(x).logits)
    edited = tmp_path / "edited"
    shutil.copytree(root / "exp", edited)
    with (edited / "dense_state_dict.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="sha256 differs"):
        load_teacher(edited, spec, torch.device("cpu"))


def test_gpt2_conv1d_is_stored_as_the_transposed_out_in_weight(gpt2):
    masked, root, _ = gpt2
    manifest = read_manifest(root / "exp")
    layers = {d["name"]: d for d in manifest["layers"]}
    c_fc = layers["transformer.h.0.mlp.c_fc.weight"]
    # block_size=(8, 16) means 8 output rows by 16 inputs whatever the module stores: the Conv1D's (in, out) weight
    # is masked in (16, 8) tiles and exported as the (out, in) weight in (8, 16) tiles
    assert c_fc["transposed"] and c_fc["shape"] == [128, 32] and c_fc["block"] == [8, 16]
    stored_mask = masked.transformer.h[0].mlp.c_fc.parametrizations.weight[0]
    assert stored_mask.block == (16, 8) and tuple(stored_mask.scores.shape) == (2, 16)
    assert manifest["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert manifest["sample_input"] == {"shape": [LM_SAMPLE_TOKENS], "vocab_size": VOCAB}
    model = load_sparse(root / "exp")
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, BlockSparseLinear) and layer.shape == (128, 32) and layer.block_size == (8, 16)
    folded = fold_copy(masked).transformer.h[0].mlp.c_fc.weight  # (in, out)
    torch.testing.assert_close(layer.to_dense_weight(), folded.t())
    assert layer.density == pytest.approx(c_fc["density"]) and layer.density < 0.5


def test_llama_load_sparse_generates_what_the_folded_model_generates(tmp_path):
    masked = hf_run(tmp_path / "run", "llama", LLAMA)
    export(tmp_path / "run", tmp_path / "exp")
    model = load_sparse(tmp_path / "exp")
    assert isinstance(model, transformers.LlamaForCausalLM)
    # 14 block-sparse weights, loaded fused: q/k/v one product, gate/up one (silu * up fused), o, down
    assert count(model, "BlockSparseLinear") == 6 and count(model, "FusedGateUpLinear") == 2
    assert isinstance(model.lm_head, torch.nn.Linear)  # the head stays dense
    folded = fold_copy(masked).eval()
    prompt = ids(1, 6, seed=3)
    want = folded.generate(prompt, max_new_tokens=5, do_sample=False)
    assert want.shape == (1, 11)
    torch.testing.assert_close(model.generate(prompt, max_new_tokens=5, do_sample=False), want, rtol=0, atol=0)
    # a static KV cache (what CUDA graphs replay) runs through the block-sparse layers too
    static = model.generate(prompt, max_new_tokens=5, do_sample=False, cache_implementation="static")
    torch.testing.assert_close(static, want, rtol=0, atol=0)


def test_layout_auto_and_runtimes_feed_token_ids(tmp_path):
    hf_run(tmp_path / "run", "llama", LLAMA)
    result = export(tmp_path / "run", tmp_path / "exp", layout="auto", batch_sizes=[1, 2])
    for d in result.manifest["layers"]:
        rows = d["timing"]["per_batch"]
        assert [(r["batch"], r["tokens"]) for r in rows] == [(1, LM_SAMPLE_TOKENS), (2, 2 * LM_SAMPLE_TOKENS)]
        assert d["layout"] in ("bsr", "dense") and (d["layout"] == "bsr") == (d["reason"] is None)
    # warmed up on token ids (a language model's default sample input): every layer chose a kernel for them, and
    # for one token per sequence (the decode steps: 1 and 2 tokens, one bucket)
    export(tmp_path / "run", tmp_path / "bsr")
    model = make_runtime(load_sparse(tmp_path / "bsr"), "eager", batch_sizes=[1, 2])
    layers = [m for m in model.modules() if isinstance(m, BlockSparseLinear)]
    buckets = {token_bucket(m) for m in (1, 2, LM_SAMPLE_TOKENS, 2 * LM_SAMPLE_TOKENS)}
    assert len(buckets) == 3 and layers and all(set(m.dispatch) == buckets for m in layers)
    # the whole-model check against dense kernels times the model on token ids (floats would fail in the embedding)
    report = check_against_dense(model, [2], SampleInput((7,), VOCAB), rounds=1, reps=1)
    assert set(report) == {2} and report[2]["kept"] in ("dense", "tuned")


def test_bert_sequence_classifier_exports_with_its_head_dense(tmp_path):
    masked = hf_run(tmp_path / "run", "bert", BERT, task="sequence_classification", num_classes=3)
    result = export(tmp_path / "run", tmp_path / "exp")
    assert len(result.manifest["layers"]) == 12 and result.manifest["equivalence"]["passed"]
    model = load_sparse(tmp_path / "exp")
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert isinstance(model.classifier, torch.nn.Linear) and isinstance(model.bert.pooler.dense, torch.nn.Linear)
    x = ids(3, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llama_on_cuda_bf16_generates_eagerly_with_a_static_cache_and_under_cuda_graphs(tmp_path):
    """Run on the device machine: python -m pytest -m gpu tests/integration/test_hf_export.py"""
    config = {**LLAMA, "hidden_size": 256, "intermediate_size": 512, "max_position_embeddings": 256}
    masked = hf_run(tmp_path / "run", "llama", config, num_classes=512, block_size=32)
    result = export(tmp_path / "run", tmp_path / "exp", dtype="bf16", device="cuda")
    assert result.manifest["equivalence"]["passed"]
    model = load_sparse(tmp_path / "exp", device="cuda", dtype="bf16")
    assert count(model, "BlockSparseLinear") == 6 and count(model, "FusedGateUpLinear") == 2  # fused q/k/v, gate/up
    prompt = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        want = fold_copy(masked).to("cuda", torch.bfloat16).eval()(prompt).logits.float()
        got = model(prompt).logits.float()
    assert (got - want).abs().max() <= 6e-2 * want.abs().max()
    eager = model.generate(prompt, max_new_tokens=8, do_sample=False)
    static = model.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static")
    assert eager.shape == (1, 20) and torch.equal(static, eager)
    served = load_sparse(
        tmp_path / "exp", device="cuda", dtype="bf16", runtime="cudagraph", batch_sizes=[1, 4], compile_options=False
    )
    x = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        torch.testing.assert_close(served(x).logits, model(x).logits, rtol=0, atol=2e-2)
