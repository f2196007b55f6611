"""superblock.artifacts: rebuilding a model from a saved spec."""

from __future__ import annotations

import pytest
import torch

from superblock.artifacts.checkpoint import load_checkpoint
from superblock.artifacts.spec import build_from_spec
from superblock.sparsity import get_controller
from tests.unit.test_export_helpers import logits, make_run, probe


@pytest.mark.parametrize("sparsity", [0.75, None])
def test_build_from_spec_takes_the_state_saved_with_the_spec(tmp_path, sparsity):
    model = make_run(tmp_path / "run", sparsity=sparsity)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    rebuilt = build_from_spec(state["model_spec"], state["sparsity_spec"])
    assert (get_controller(rebuilt) is not None) == (sparsity is not None)
    rebuilt.load_state_dict(state["model"])  # strict: every key of the saved model, nothing more
    x = probe()
    torch.testing.assert_close(logits(rebuilt.eval(), x), logits(model, x), rtol=0, atol=0)


def test_build_from_spec_never_reads_the_pretrained_file(tmp_path):
    make_run(tmp_path / "run", sparsity=None)
    spec = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model_spec"]
    model = build_from_spec({**spec, "pretrained": str(tmp_path / "gone.safetensors")})
    assert sum(p.numel() for p in model.parameters()) > 0
