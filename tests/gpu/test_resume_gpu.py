"""Runs on the GPU resume as they do on the CPU: a checkpoint written from CUDA tensors (its random states among
them) is read back and the run goes on where it stopped (run on the device: python -m pytest -m gpu tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.train import fault_at, metrics_of, run_train, summary_of
from tests.integration.test_lm_train import LM_TINY

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def test_a_distilled_causal_lm_on_cuda_resumes_after_sigkill_where_it_stopped(tmp_path):
    """The route that failed: a language model on CUDA, with a teacher, killed after its first checkpoint, resumed
    with trainer.resume=true (it raised on reading the random states back). The resumed run ends where the
    uninterrupted one does: the same steps and masks, the same losses and perplexity up to GPU rounding."""
    teacher = tmp_path / "teacher"
    assert run_train(*LM_TINY, "sparsity=none", "trainer.device=cuda", f"hydra.run.dir={teacher}").returncode == 0
    common = [*LM_TINY, "trainer.device=cuda", "trainer.checkpoint_every_steps=2", "trainer.log_every_steps=1",
              f"distill.teacher={teacher}"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_train(*common, f"hydra.run.dir={straight}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_train(*common, f"hydra.run.dir={killed}", fault_at(3)).returncode != 0
    resumed = run_train(*common, "trainer.resume=true", f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    a, b = summary_of(straight), summary_of(killed)
    assert (b["steps"], b["mask_digest"]) == (a["steps"], a["mask_digest"])
    assert b["val_perplexity"] == pytest.approx(a["val_perplexity"], rel=1e-3)
    loss = {m["step"]: m["train_loss"] for m in metrics_of(straight) if "train_loss" in m}
    loss_resumed = {m["step"]: m["train_loss"] for m in metrics_of(killed) if "train_loss" in m}
    assert loss_resumed == pytest.approx(loss, rel=1e-3)
