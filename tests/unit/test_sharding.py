"""Which modules FSDP2 shards one by one (superblock.engine.sharding.transformer_blocks)."""

from __future__ import annotations

import pytest
from torch import nn

from superblock.engine.sharding import transformer_blocks
from superblock.models import build_model


def test_torchvision_vit_shards_its_encoder_layers():
    model = build_model("micro_vit", 10)
    blocks = transformer_blocks(model)
    assert blocks == list(model.encoder.layers)


def test_transformers_models_shard_the_classes_they_name_unsplittable():
    pytest.importorskip("transformers")
    model = build_model("hf:gpt2", 257, task="causal_lm", config={"n_layer": 3, "n_embd": 32, "n_head": 2})
    assert transformer_blocks(model) == list(model.transformer.h)


def test_blocks_inside_chosen_blocks_are_not_sharded_twice():
    inner = [nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]) for _ in range(3)]
    model = nn.Sequential(nn.ModuleList(inner), nn.Linear(4, 2))
    blocks = transformer_blocks(model)
    assert blocks == inner  # the outer list's elements; their own Linear pairs go with them
    frozen = nn.ModuleList([nn.Linear(4, 4).requires_grad_(False) for _ in range(2)])
    assert transformer_blocks(nn.Sequential(frozen, nn.Linear(4, 2))) == []
