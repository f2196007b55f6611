"""superblock.models: every name builds, local pretrained weights load, no network is ever touched."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from superblock.models import MODEL_NAMES, build_model, model_spec

TIMM_TINY = "timm:vit_tiny_patch16_224"


def _logits(model: nn.Module, image_size: int, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size)
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", ["tiny_vit", "micro_vit"])
def test_tiny_models_forward(name: str) -> None:
    model = build_model(name, num_classes=7)
    assert _logits(model, 32).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "image_size"),
    [
        ("vit_b_16", 32),
        ("vit_b_32", 32),
        ("vit_l_16", 32),
        ("vit_h_14", 28),
        (TIMM_TINY, 32),
        ("timm:deit_small_patch16_224", 32),
    ],
)
def test_big_models_build_with_right_logit_shape(name: str, image_size: int) -> None:
    # The meta device gives shapes without allocating the weights: ViT-H builds in well under a second.
    with torch.device("meta"):
        model = build_model(name, num_classes=7, image_size=image_size)
        logits = model(torch.empty(3, 3, image_size, image_size))
    assert logits.shape == (3, 7)


def test_timm_model_real_forward() -> None:
    model = build_model(TIMM_TINY, num_classes=5, image_size=32, depth=2)
    assert _logits(model, 32).shape == (2, 5)


def test_tiny_vit_has_torchvision_vit_layout() -> None:
    model = build_model("tiny_vit", num_classes=10)
    modules = dict(model.named_modules())
    assert isinstance(modules["encoder.layers.encoder_layer_0.mlp.0"], nn.Linear)
    assert isinstance(modules["encoder.layers.encoder_layer_0.mlp.3"], nn.Linear)
    assert isinstance(modules["encoder.layers.encoder_layer_0.self_attention"], nn.MultiheadAttention)
    assert modules["heads.head"].out_features == 10


def test_tiny_vit_overrides() -> None:
    model = build_model("tiny_vit", num_classes=3, num_layers=2, hidden_dim=64, mlp_dim=128, patch_size=8)
    assert len(model.encoder.layers) == 2
    assert model.hidden_dim == 64 and model.patch_size == 8
    assert _logits(model, 32).shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"depth": 3}, "does not take"), ({"patch_size": 5}, "not divisible"), ({"num_heads": 5}, "num_heads")],
)
def test_bad_overrides_are_value_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model("tiny_vit", num_classes=3, **kwargs)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="tiny_vit.*vit_b_16"):
        build_model("vit_tiny_typo", num_classes=3)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model("timm:not_a_model_xyz", num_classes=3)
    assert "tiny_vit" in MODEL_NAMES and "vit_h_14" in MODEL_NAMES


def test_model_spec_is_json_and_rebuilds() -> None:
    spec = model_spec("micro_vit", num_classes=4, num_layers=1)
    assert spec["image_size"] == 32  # resolved, not None
    model = build_model(**json.loads(json.dumps(spec)))
    assert len(model.encoder.layers) == 1
    with pytest.raises(ValueError, match="JSON"):
        model_spec("micro_vit", num_classes=4, dropout=object())


# ------------------------------------------------------------------------------------------- pretrained


@pytest.mark.parametrize("wrap", ["safetensors", "raw", "model", "state_dict"])
def test_pretrained_round_trip(tmp_path, wrap: str) -> None:
    torch.manual_seed(1)
    source = build_model("micro_vit", num_classes=6)
    state = source.state_dict()
    if wrap == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save(state if wrap == "raw" else {wrap: state, "epoch": 3}, path)
    torch.manual_seed(2)  # a different init, so equal logits mean the weights really loaded
    loaded = build_model("micro_vit", num_classes=6, pretrained=str(path))
    torch.testing.assert_close(_logits(loaded, 32), _logits(source, 32))


def test_pretrained_strips_ddp_prefix(tmp_path) -> None:
    source = build_model("micro_vit", num_classes=6)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.pth")
    loaded = build_model("micro_vit", num_classes=6, pretrained=str(tmp_path / "w.pth"))
    torch.testing.assert_close(_logits(loaded, 32), _logits(source, 32))


def test_pretrained_head_with_other_num_classes_is_reinitialised(tmp_path, caplog) -> None:
    source = build_model("micro_vit", num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    with caplog.at_level(logging.WARNING, logger="superblock.models"):
        model = build_model("micro_vit", num_classes=4, pretrained=str(tmp_path / "w.pt"))
    assert "heads.head.weight" in caplog.text
    assert model.heads.head.weight.shape == (4, 64)
    torch.testing.assert_close(model.conv_proj.weight, source.conv_proj.weight)
    assert _logits(model, 32).shape == (2, 4)


def test_pretrained_position_embedding_is_resampled(tmp_path) -> None:
    source = build_model("micro_vit", num_classes=5, image_size=32)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_model("micro_vit", num_classes=5, image_size=64, pretrained=str(tmp_path / "w.pt"))
    assert model.encoder.pos_embedding.shape == (1, 1 + 16 * 16, 64)
    # The class token's embedding is kept as is; the patch grid is interpolated.
    torch.testing.assert_close(model.encoder.pos_embedding[:, 0], source.encoder.pos_embedding[:, 0])
    assert _logits(model, 64).shape == (2, 5)


def test_timm_pretrained_round_trip_and_resample(tmp_path) -> None:
    source = build_model(TIMM_TINY, num_classes=3, image_size=32, depth=2)  # depth: kwargs reach timm
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "t.safetensors"))
    weights = str(tmp_path / "t.safetensors")
    same = build_model(TIMM_TINY, num_classes=3, image_size=32, depth=2, pretrained=weights)
    torch.testing.assert_close(_logits(same, 32), _logits(source, 32))
    bigger = build_model(TIMM_TINY, num_classes=7, image_size=48, depth=2, pretrained=weights)
    assert bigger.pos_embed.shape == (1, 1 + 3 * 3, 192)
    assert bigger.head.weight.shape == (7, 192)


@pytest.mark.parametrize(
    "name",
    [
        "https://example.com/vit.pth",
        "hf-hub:timm/vit_tiny_patch16_224",
        "timm/vit_tiny_patch16_224.augreg",
        "IMAGENET1K_V1",
    ],
)
def test_remote_pretrained_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="must be a local file"):
        build_model("micro_vit", num_classes=3, pretrained=name)


def test_missing_pretrained_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        build_model("micro_vit", num_classes=3, pretrained=str(tmp_path / "missing.safetensors"))


def test_pretrained_for_another_architecture_is_a_clear_error(tmp_path) -> None:
    torch.save(build_model("micro_vit", num_classes=3).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="do not fit this model"):
        build_model("micro_vit", num_classes=3, num_layers=3, pretrained=str(tmp_path / "w.pt"))


def test_masked_state_dict_is_refused(tmp_path) -> None:
    state = build_model("micro_vit", num_classes=3).state_dict()
    weight = state.pop("encoder.layers.encoder_layer_0.mlp.0.weight")
    state["encoder.layers.encoder_layer_0.mlp.0.parametrizations.weight.original"] = weight
    torch.save(state, tmp_path / "masked.pt")
    with pytest.raises(ValueError, match="fold the masks"):
        build_model("micro_vit", num_classes=3, pretrained=str(tmp_path / "masked.pt"))


def test_starts_pretrained_knows_a_weights_file_and_an_hf_dir_with_weights(tmp_path):
    from superblock.models import starts_pretrained

    assert starts_pretrained("micro_vit", "some/weights.pt")
    assert not starts_pretrained("micro_vit", None)
    assert not starts_pretrained("hf:gpt2", None)  # an architecture: a fresh initialisation
    (tmp_path / "config.json").write_text("{}")
    assert not starts_pretrained(f"hf:{tmp_path}", None)  # a config, no weights
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert starts_pretrained(f"hf:{tmp_path}", None)
