"""A small causal LM through train.py's real entry point: transformers GPT-2 twin, byte-level text, block masks."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from tests.helpers.train import ROOT, fault_at, metrics_of, run_train, summary_of

pytest.importorskip("transformers")

# experiment=lm_tiny at debug sizes: a 2-layer GPT-2, 32-token windows of the first 60 kB of the stdlib corpus.
LM_TINY = [
    "experiment=lm_tiny",
    "model.config.n_layer=2",
    "model.config.n_embd=64",
    "model.config.n_head=2",
    "model.config.n_positions=32",
    "data.seq_len=32",
    "data.max_bytes=60000",
    "data.val_size=16",
    "data.batch_size=8",
    "trainer.max_steps=6",
    "trainer.log_every_steps=2",
    "sparsity.block_size=16",
    "trainer.threads=1",
]


def test_tiny_causal_lm_trains_with_masks_on_attention_and_mlp(tmp_path):
    proc = run_train(*LM_TINY, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(tmp_path)
    assert s["status"] == "completed" and s["steps"] == 6
    # Byte-level: 257 symbols; a model that learned anything beats uniform guessing.
    assert s["val_perplexity"] is not None and math.isfinite(s["val_perplexity"]) and s["val_perplexity"] < 257
    assert s["val_perplexity"] == pytest.approx(math.exp(metrics_of(tmp_path)[-1]["val_loss"]), rel=1e-6)
    # per byte: bytes, save the end-of-document ids, are the tokens, so a little above per token
    assert s["val_perplexity"] <= s["val_perplexity_per_byte"] < s["val_perplexity"] * 1.1
    assert "val perplexity" in proc.stdout and "per byte" in proc.stdout
    # throughput in tokens, as language models report it: 8 windows of 32 tokens a step
    logged = [m for m in metrics_of(tmp_path) if "train_loss" in m]
    assert all(m["tokens_per_s"] == pytest.approx(32 * m["images_per_s"]) for m in logged)
    out = proc.stdout + proc.stderr  # the progress bar writes to stderr
    assert "tok_s=" in out and "img_s=" not in out
    assert s["tokens_per_s"] == pytest.approx(32 * s["images_per_s"], rel=1e-6)
    masked = set(s["block_sparsity"])
    assert masked == {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert s["mean_block_sparsity"] == pytest.approx(0.7, abs=0.03)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["model_spec"]["name"] == "hf:gpt2" and ckpt["model_spec"]["task"] == "causal_lm"
    assert ckpt["model_spec"]["num_classes"] == 257  # the byte vocabulary reached the model


def test_best_checkpoint_of_a_language_model_is_its_lowest_perplexity(tmp_path):
    """A language model's best.pt and summary.json's best_val_perplexity are the validation of lowest perplexity,
    not of highest next-token top-1; a learning rate of 0.05 overshoots, so the last epoch is not the best."""
    common = [a for a in LM_TINY if not a.startswith(("trainer.max_steps", "data.max_bytes"))]
    overrides = ["data.max_bytes=6000", "trainer.max_epochs=4", "trainer.min_steps=null", "optim.lr=0.05"]
    proc = run_train(*common, *overrides, "optim.warmup_epochs=0", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(tmp_path)
    validations = [m for m in metrics_of(tmp_path) if "val_perplexity" in m]
    assert len(validations) == 4
    lowest = min(validations, key=lambda m: m["val_perplexity"])
    assert s["val_perplexity"] > s["best_val_perplexity"] == pytest.approx(lowest["val_perplexity"], rel=1e-9)
    assert s["best_val_perplexity_per_byte"] == pytest.approx(lowest["val_perplexity_per_byte"], rel=1e-9)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["progress"]["epoch"] == lowest["epoch"]
    assert best["progress"]["last_metrics"]["val_perplexity"] == pytest.approx(lowest["val_perplexity"], rel=1e-9)


def test_zero_steps_validates_the_starting_model_only(tmp_path):
    """trainer.max_steps=0: the starting model's validation (a pretrained model as is), no optimizer step."""
    proc = run_train(*LM_TINY, "sparsity=none", "trainer.max_steps=0", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(tmp_path)
    assert s["status"] == "completed" and s["steps"] == 0 and s["epochs"] == 0
    assert math.isfinite(s["val_perplexity"]) and math.isfinite(s["val_perplexity_per_byte"])
    assert [m["step"] for m in metrics_of(tmp_path)] == [0]  # one validation, at step 0


@pytest.mark.slow  # three training subprocesses (~35 s); tests/unit/test_calibrate.py covers the scores
def test_activation_aware_scores_are_calibrated_once_before_the_first_step(tmp_path):
    """sparsity.score_init=activation on GPT-2 (Conv1D weights, stored transposed): calibrated on training batches
    before step 0 of a fresh run, not again on resume (the scores come from the checkpoint)."""
    common = [*LM_TINY, "sparsity.score_init=activation", "sparsity.calibration_batches=2", "trainer.max_steps=8",
              "trainer.checkpoint_every_steps=4"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_train(*common, f"hydra.run.dir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scores of 8 masked weights from activation-aware magnitudes (2 batches)" in proc.stdout
    assert run_train(*common, f"hydra.run.dir={killed}", fault_at(6)).returncode == -9
    proc = run_train(*common, "trainer.resume=true", f"hydra.run.dir={killed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "activation-aware" not in proc.stdout
    assert summary_of(straight)["mask_digest"] == summary_of(killed)["mask_digest"]


@pytest.mark.slow  # three training subprocesses (~25 s, compiled ~45 s); the image runs' resume tests are default
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_causal_lm_resumes_exactly_after_sigkill(tmp_path, compiled):
    """Compiled too (trainer.compile=true, the SmolLM2 experiment's default): the checkpoint holds the bare model's
    state, so either run resumes to the uninterrupted run's perplexity and losses."""
    common = [*LM_TINY, "trainer.checkpoint_every_steps=2", "trainer.log_every_steps=1"]
    common += ["trainer.compile=true"] if compiled else []
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_train(*common, f"hydra.run.dir={straight}").returncode == 0
    crashed = run_train(*common, f"hydra.run.dir={killed}", fault_at(3))
    assert crashed.returncode != 0
    resumed = run_train(*common, "trainer.resume=true", f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = summary_of(straight), summary_of(killed)
    assert b["val_perplexity"] == pytest.approx(a["val_perplexity"], rel=1e-5)
    assert b["mask_digest"] == a["mask_digest"]
    # throughput over the whole run, both processes' steady windows (tokens saved with the checkpoint like images)
    assert b["tokens_per_s"] == pytest.approx(32 * b["images_per_s"], rel=1e-6)
    loss = {m["step"]: m["train_loss"] for m in metrics_of(straight) if "train_loss" in m}
    loss_resumed = {m["step"]: m["train_loss"] for m in metrics_of(killed) if "train_loss" in m}
    assert loss_resumed == pytest.approx(loss, rel=1e-5)


def test_causal_lm_trains_under_two_process_ddp(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    proc = run_train(*LM_TINY, "trainer.device=cpu", f"hydra.run.dir={tmp_path}", cmd=cmd, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(tmp_path)
    assert s["world_size"] == 2 and s["masks_equal_across_ranks"] is True and s["steps"] == 6
    assert math.isfinite(s["val_perplexity"])


def _two_process(*args: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    return run_train(*LM_TINY, "trainer.device=cpu", *args, cmd=cmd, env={"OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow  # two processes (~20 s)
def test_activation_scores_under_two_process_ddp_are_one_set(tmp_path):
    """Each rank measures its own share of the calibration batches; the sums meet in an all-reduce, so both ranks
    start from the same scores and keep the same masks."""
    proc = _two_process("sparsity.score_init=activation", "sparsity.calibration_batches=2", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("from activation-aware magnitudes (2 batches)") == 1  # said once, by rank 0
    assert summary_of(tmp_path)["masks_equal_across_ranks"] is True


@pytest.mark.slow  # two processes (~20 s)
def test_oneshot_refit_under_two_process_ddp(tmp_path):
    """sparsity=oneshot with two ranks: each measures its share of the calibration batches, the Gram matrices
    (float64) meet in an all-reduce, and the refit is said once."""
    proc = _two_process("sparsity=oneshot", "sparsity.calibration_batches=2", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("refit 8 masked weights in 2 groups") == 1
    assert summary_of(tmp_path)["masks_equal_across_ranks"] is True


@pytest.mark.slow  # two ranks or a compile: tens of seconds on 2 cores; CI's slow run has it
def test_fsdp2_sharded_training_matches_ddp_and_writes_whole_checkpoints(tmp_path):
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert _two_process(f"hydra.run.dir={ddp}").returncode == 0
    proc = _two_process("trainer.strategy=fsdp", f"hydra.run.dir={fsdp}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = summary_of(ddp), summary_of(fsdp)
    assert b["masks_equal_across_ranks"] is True and b["mask_digest"] == a["mask_digest"]
    assert b["val_perplexity"] == pytest.approx(a["val_perplexity"], rel=1e-3)
    assert b["params_kept"] == a["params_kept"] and b["block_sparsity"] == pytest.approx(a["block_sparsity"])
    # The same checkpoint format as any run: whole tensors, so export / evaluate / a 1-process resume read it.
    ca = torch.load(ddp / "checkpoints" / "last.pt", weights_only=True)
    cb = torch.load(fsdp / "checkpoints" / "last.pt", weights_only=True)
    assert set(cb["model"]) == set(ca["model"])
    for name, tensor in ca["model"].items():
        if isinstance(tensor, torch.Tensor):
            assert cb["model"][name].shape == tensor.shape, name
            assert torch.allclose(cb["model"][name].float(), tensor.float(), atol=1e-4), name


@pytest.mark.slow  # two ranks or a compile: tens of seconds on 2 cores; CI's slow run has it
def test_fsdp2_resumes_exactly_after_sigkill(tmp_path):
    common = ["trainer.strategy=fsdp", "trainer.checkpoint_every_steps=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _two_process(*common, f"hydra.run.dir={straight}").returncode == 0
    assert _two_process(*common, f"hydra.run.dir={killed}", fault_at(3)).returncode != 0
    resumed = _two_process(*common, "trainer.resume=true", f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = summary_of(straight), summary_of(killed)
    assert b["val_perplexity"] == pytest.approx(a["val_perplexity"], rel=1e-5)
    assert b["mask_digest"] == a["mask_digest"]


def test_lm_run_exports_evaluates_loads_and_generates(tmp_path, monkeypatch, capsys):
    """The documented LM path: train.py -> export.py -> evaluate.py -> load_sparse(...).generate()."""
    from superblock.export import load_folded, load_sparse
    from tests.helpers.scripts import QUICK_EVAL, run

    run_dir, export_dir = tmp_path / "run", tmp_path / "exp"
    assert run_train(*LM_TINY, f"hydra.run.dir={run_dir}").returncode == 0
    out = run(
        "export.py",
        f"checkpoint={run_dir}",
        f"output={export_dir}",
        "layout=bsr",
        "device=cpu",
        "probe_batch=2",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    out = run("evaluate.py", f"checkpoint={export_dir}", "mode=all", *QUICK_EVAL, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((export_dir / "eval.json").read_text())
    acc = result["accuracy"]
    assert set(acc) == {"masked", "folded", "bsr"}
    # next-token predictions of one batch (8 x 32 tokens): the three forms agree, perplexity is reported
    assert acc["bsr"]["tokens"] == acc["masked"]["tokens"] > 0
    assert acc["bsr"]["perplexity"] == pytest.approx(acc["masked"]["perplexity"], rel=1e-3)
    assert acc["bsr"]["perplexity_per_byte"] >= acc["bsr"]["perplexity"]  # byte model: end-of-document ids spell none
    assert result["agreement"]["bsr"]["top1_agreement"] > 0.99
    sparse, dense = load_sparse(export_dir), load_folded(export_dir)
    prompt = torch.tensor([list(b"def main():\n    ")])
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 256}
    assert torch.equal(sparse.generate(prompt, **kwargs), dense.generate(prompt, **kwargs))

    # the served-generation benchmark on this export (CPU: eager, and graph_decoding with its step run eagerly):
    # greedy tokens agree, tokens/s are measured
    sys.path.insert(0, str(ROOT))
    from benchmarks import lm_generate

    gen = ["--device", "cpu", "--dtype", "fp32", "--runtimes", "eager,graph", "--batches", "1,2", "--prompt", "8"]
    gen += ["--new-tokens", "3", "--reps", "1", "--out", str(tmp_path / "gen")]
    lm_generate.main(["--export", str(export_dir), *gen])
    rows = json.loads((tmp_path / "gen" / "lm_generate.json").read_text())["rows"]
    if not torch.cuda.is_available():  # its default device is the GPU: here a one-line refusal, not a traceback
        with pytest.raises(SystemExit):
            lm_generate.parse_args(["--export", str(export_dir)])
        assert "--device cpu" in capsys.readouterr().err
    assert [(r["runtime"], r["batch"]) for r in rows] == [("eager", 1), ("eager", 2), ("graph", 1), ("graph", 2)]
    assert all(r["agree"] == 1.0 and r["dense_tok_s"] > 0 and r["sparse_tok_s"] > 0 for r in rows)
    layers = sum(type(m).__name__ == "BlockSparseLinear" for m in sparse.modules())
    assert all(sum(r["choices"]["16"].values()) == layers for r in rows)  # every layer's choice at the decode bucket
    assert "| eager | 2 |" in (tmp_path / "gen" / "lm_generate.md").read_text()

    # a run stopped part-way (the device call's time limit) keeps the rows it measured: written after every row
    real, calls = lm_generate.timed_generate, []

    def stopped_at_the_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # batch 2's dense model: batch 1's row is done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_generate, "timed_generate", stopped_at_the_third_call)
    cut = [*gen[:4], "--runtimes", "eager", *gen[6:-1], str(tmp_path / "cut")]
    with pytest.raises(KeyboardInterrupt):
        lm_generate.main(["--export", str(export_dir), *cut])
    rows = json.loads((tmp_path / "cut" / "lm_generate.json").read_text())["rows"]
    assert [(r["runtime"], r["batch"]) for r in rows] == [("eager", 1)]


def test_pretrained_transformers_directory_is_not_mistaken_for_a_run(tmp_path):
    from superblock.artifacts.resolve import resolve
    from superblock.engine.pretrained import names_run
    from superblock.models import build_model

    model = build_model("hf:gpt2", 257, task="causal_lm", config={"n_layer": 1, "n_embd": 32, "n_head": 2})
    model.save_pretrained(tmp_path / "hf")
    assert resolve(tmp_path / "hf").kind == "hf" and not names_run(tmp_path / "hf")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert names_run(tmp_path / "run")  # a run dir (its missing checkpoint is reported by the loader)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    (tmp_path / "run" / "config.json").write_text("{}")
    assert resolve(tmp_path / "run").kind == "run" and names_run(tmp_path / "run")
    built = build_model(
        "hf:gpt2",
        257,
        pretrained=str(tmp_path / "hf"),
        task="causal_lm",
        config={"n_layer": 1, "n_embd": 32, "n_head": 2},
    )
    assert torch.equal(built.transformer.wte.weight, model.transformer.wte.weight)


@pytest.mark.slow  # two ranks or a compile: tens of seconds on 2 cores; CI's slow run has it
def test_compiled_lm_distils_from_a_dense_lm(tmp_path):
    """trainer.compile and distill.teacher on a language model: per-token soft targets from a dense LM run, and each
    block's output against the teacher's (hooks on compiled blocks)."""
    dense, student = tmp_path / "dense", tmp_path / "student"
    assert run_train(*LM_TINY, "sparsity=none", f"hydra.run.dir={dense}").returncode == 0
    overrides = ("trainer.compile=true", f"distill.teacher={dense}", "distill.blocks=1.0", f"hydra.run.dir={student}")
    proc = run_train(*LM_TINY, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary_of(student)
    assert s["status"] == "completed" and math.isfinite(s["val_perplexity"])
    logged = [m for m in metrics_of(student) if "train_loss" in m]
    assert logged and all(m["teacher_ms"] > 0 for m in logged)
