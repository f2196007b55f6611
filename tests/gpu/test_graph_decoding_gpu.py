"""graph_decoding on a GPU: the step is captured and replayed (run on the device: python -m pytest -m gpu tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from superblock.export import graph_decoding, load_sparse
from tests.integration.test_hf_export import LLAMA, export, hf_run

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_step_replays_a_graph_and_decodes_what_the_eager_loop_decodes(tmp_path):
    config = {**LLAMA, "hidden_size": 256, "intermediate_size": 512, "max_position_embeddings": 256}
    hf_run(tmp_path / "run", "llama", config, num_classes=512, block_size=32)
    export(tmp_path / "run", tmp_path / "exp", device="cuda")
    model = load_sparse(tmp_path / "exp", device="cuda")  # fp32: the replayed step computes what the eager one does
    prompt = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    kw = {"max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False, "cache_implementation": "static",
          "pad_token_id": 0}  # fmt: skip
    want = model.generate(prompt, **kw)
    for compile_step in (False, True):
        got = model.generate(prompt, custom_generate=graph_decoding, compile_step=compile_step, **kw)
        steps = [s for s in model.__dict__["_superblock_step_graphs"].values() if s.graph is not None]
        assert steps and got.shape == want.shape == (2, 36)
        if compile_step:  # inductor's fused kernels round differently: the first new token, and most of the rest
            assert torch.equal(got[:, :13], want[:, :13]) and (got == want).float().mean() >= 0.9
        else:
            assert torch.equal(got, want)
