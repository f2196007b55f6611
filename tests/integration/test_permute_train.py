"""sparsity.permute through train.py: applied once (at step 0 or at the ramp's start), kept by resume, folded by
export."""

from __future__ import annotations

import pytest
import torch

from superblock.artifacts.checkpoint import load_checkpoint, model_from_checkpoint
from superblock.export import export_checkpoint, load_sparse
from superblock.sparsity import iter_block_masks
from tests.helpers.train import SMOKE, fault_at, run_train, summary_of

PERMUTED = [
    *SMOKE,
    "sparsity.permute=mlp+heads",
    "sparsity.block_size=16",
    "sparsity.score_init=magnitude",
    "trainer.max_epochs=2",
    "trainer.checkpoint_every_steps=4",
    "trainer.log_every_steps=1",
]


def _permutation_record(run_dir) -> dict:
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    extra = next(v for k, v in state.items() if k.endswith("_extra_state"))
    return extra["permutation"]


TALL = ["sparsity.block_size=[32,8]", 'sparsity.block_overrides=[{match:"*.mlp.3",block:[16,16]}]']


@pytest.mark.parametrize(
    ("start_epoch", "step", "tiles"),
    # smoke: 8 steps an epoch; tall tiles with a per-layer override (they permute at step 0 too: the plain step-0
    # case runs with the slow tests)
    [pytest.param(0, 0, [], marks=pytest.mark.slow), (1, 8, []), (0, 0, TALL)],
    ids=["at-step-0", "at-the-ramp", "tall-tiles"],
)
def test_permuted_run_resumes_without_permuting_again_and_exports(
    tmp_path, start_epoch: int, step: int, tiles: list[str]
) -> None:
    common = [*PERMUTED, f"sparsity.start_epoch={start_epoch}", *tiles]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_train(*common, f"hydra.run.dir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"permutation (mlp+heads) at step {step}" in proc.stdout or f"step {step}: permutation" in proc.stdout
    record = _permutation_record(straight)
    assert record["step"] == step and record["permuted"] > 0 and record["kept_after"] > record["kept_before"]

    proc = run_train(*common, f"hydra.run.dir={killed}", fault_at(10))  # last checkpoint: step 8
    assert proc.returncode == -9, proc.stderr[-2000:]
    proc = run_train(*common, "trainer.resume=true", f"hydra.run.dir={killed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "permutation" not in proc.stdout  # in the weights already: not announced, not applied again
    assert _permutation_record(killed) == record
    a, b = summary_of(straight), summary_of(killed)
    for key in ("val_top1", "steps", "mask_digest"):
        assert a[key] == b[key], key
    wa = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(killed / "checkpoints" / "last.pt")["model"]
    for k in wa:
        if isinstance(wa[k], torch.Tensor):
            assert torch.equal(wa[k], wb[k]), k

    # export folds the permuted weights as they are: the exported model is the masked training model
    result = export_checkpoint(
        straight, tmp_path / "export", layout="bsr", device="cpu", batch_sizes=[2], echo=lambda _line: None
    )
    masked = model_from_checkpoint(load_checkpoint(straight / "checkpoints" / "last.pt")).eval()
    assert result.path == tmp_path / "export"
    assert len(result.manifest["layers"]) == len(list(iter_block_masks(masked)))  # every masked weight exported
    if tiles:  # the tiles trained are the tiles served: (out rows, in cols), the override on mlp.3
        blocks = {d["name"].split(".")[-2]: tuple(d["block"]) for d in result.manifest["layers"]}
        assert blocks == {"self_attention": (32, 8), "out_proj": (32, 8), "0": (32, 8), "3": (16, 16)}
        assert summary_of(straight)["mean_block_sparsity"] == pytest.approx(0.8, abs=0.02)
    served = load_sparse(tmp_path / "export").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(served(x), masked(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # two training subprocesses (~20 s)
def test_a_permutation_at_the_ramp_measures_activation_scores_again_and_resumes(tmp_path) -> None:
    """score_init=activation with a dense warm-up: calibrated before step 0 and again right after the permutation at
    the ramp's start (not magnitude scores of the permuted weights); the calibration batches move nothing of the
    run, so a run killed after the permutation resumes to the same masks and metrics."""
    common = [*PERMUTED, "sparsity.start_epoch=1", "sparsity.score_init=activation", "sparsity.calibration_batches=2",
              "sparsity.targets=[mlp]"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_train(*common, f"hydra.run.dir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = "scores of 4 masked weights from activation-aware magnitudes (2 batches)"
    out = proc.stdout
    assert out.count(line) == 2 and out.index(line) < out.index("step 8: permutation") < out.rindex(line), out[-3000:]
    assert run_train(*common, f"hydra.run.dir={killed}", fault_at(12)).returncode == -9
    proc = run_train(*common, "trainer.resume=true", f"hydra.run.dir={killed}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert line not in proc.stdout
    a, b = summary_of(straight), summary_of(killed)
    for key in ("val_top1", "steps", "mask_digest"):
        assert a[key] == b[key], key
