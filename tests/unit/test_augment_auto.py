"""data/augment=auto, the image-folder default: transforms that fit the image size, explicit choices winning."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from superblock.config import ConfigError, to_config
from superblock.data import AUGMENT_RECIPES, SMALL_IMAGE_MAX, build_datasets, resolve_augment
from superblock.engine.builders import dataset_options

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return to_config(compose(config_name="train", overrides=overrides))


def _tree(root: Path) -> None:
    for split in ("train", "val"):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (28, 28), (100 * c + i, 50, 150)).save(root / split / name / f"{i}.png")


def _names(transform) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def test_the_yaml_recipes_are_the_ones_the_code_applies() -> None:
    for recipe, values in AUGMENT_RECIPES.items():
        raw = yaml.safe_load((CONFIGS / "data" / "augment" / f"{recipe}.yaml").read_text())
        assert raw.pop("recipe") == recipe
        assert set(raw) == set(values)
        for key, value in values.items():
            mine = list(value) if isinstance(value, tuple) else value
            assert mine == (raw[key] if isinstance(raw[key], str | None) else pytest.approx(raw[key], rel=1e-6)), key
    auto = yaml.safe_load((CONFIGS / "data" / "augment" / "auto.yaml").read_text())
    assert auto.pop("recipe") == "auto" and set(auto) == set(AUGMENT_RECIPES["small"]) and not any(auto.values())


def test_auto_picks_by_image_size_and_says_why() -> None:
    auto = {"recipe": "auto"}
    small, ra, note = resolve_augment(auto, "auto", SMALL_IMAGE_MAX)
    assert small == AUGMENT_RECIPES["small"] and ra is None
    assert "small recipe" in note and f"<= {SMALL_IMAGE_MAX}" in note and "RandAugment off" in note
    big, ra, note = resolve_augment(auto, "auto", SMALL_IMAGE_MAX + 1)
    assert big == AUGMENT_RECIPES["imagenet"] and ra == "rand-m9-mstd0.5-inc1" and "imagenet recipe" in note


def test_explicit_choices_win_over_auto() -> None:
    settings, ra, note = resolve_augment({"recipe": "auto", "hflip": 0.5, "scale": None}, None, 32)
    assert settings["hflip"] == 0.5 and settings["scale"] == AUGMENT_RECIPES["small"]["scale"] and ra is None
    assert "hflip=0.5" in note
    settings, ra, note = resolve_augment({"recipe": "imagenet"}, "auto", 32)  # a named recipe, small images
    assert settings == AUGMENT_RECIPES["imagenet"] and ra == "rand-m9-mstd0.5-inc1" and "chosen in the config" in note
    # configs from before the recipe key: ImageNet's values under the given fields, as they always were
    settings, ra, _ = resolve_augment({"crop_pct": 1.0}, "rand-m9-mstd0.5-inc1", 32)
    assert settings == {**AUGMENT_RECIPES["imagenet"], "crop_pct": 1.0} and ra == "rand-m9-mstd0.5-inc1"
    with pytest.raises(ValueError, match="recipe"):
        resolve_augment({"recipe": "fancy"}, None, 32)


def test_imagefolder_default_gives_small_images_the_small_recipe(tmp_path) -> None:
    _tree(tmp_path)
    conf = _compose(["data=imagefolder", f"data.root={tmp_path}", "data.image_size=32"])
    assert conf.data.augment.recipe == "auto" and conf.data.randaugment == "auto"
    bundle = build_datasets("imagefolder", **dataset_options(conf.data))
    assert "small recipe" in bundle.transforms and "image_size 32 <= 64" in bundle.transforms
    train = _names(bundle.train.transform)
    assert "RandomHorizontalFlip" not in train and "RandAugment" not in train
    assert bundle.train.transform.transforms[0].scale == (0.75, 1.0)
    assert bundle.val.transform.transforms[0].size == 32  # no centre-crop margin
    assert bundle.val[0][0].shape == (3, 32, 32)


def test_imagefolder_default_keeps_imagenets_recipe_for_large_images(tmp_path) -> None:
    _tree(tmp_path)
    conf = _compose(["data=imagefolder", f"data.root={tmp_path}", "data.image_size=96"])
    bundle = build_datasets("imagefolder", **dataset_options(conf.data))
    assert "imagenet recipe" in bundle.transforms and "image_size 96 > 64" in bundle.transforms
    train = _names(bundle.train.transform)
    assert "RandomHorizontalFlip" in train and "RandAugment" in train
    assert bundle.val.transform.transforms[0].size == int(96 / 0.875)


def test_explicit_overrides_on_the_command_line_win(tmp_path) -> None:
    _tree(tmp_path)
    conf = _compose(
        [
            "data=imagefolder",
            f"data.root={tmp_path}",
            "data.image_size=32",
            "data/augment=imagenet",
            "data.randaugment=null",
        ]
    )
    bundle = build_datasets("imagefolder", **dataset_options(conf.data))
    assert "imagenet recipe (chosen in the config)" in bundle.transforms
    assert "RandomHorizontalFlip" in _names(bundle.train.transform)
    conf = _compose(["data=imagefolder", f"data.root={tmp_path}", "data.image_size=32", "data.augment.hflip=0.5"])
    bundle = build_datasets("imagefolder", **dataset_options(conf.data))
    assert "small recipe" in bundle.transforms and "RandomHorizontalFlip" in _names(bundle.train.transform)
    with pytest.raises(ConfigError, match="data.augment.recipe"):
        _compose(["data=imagefolder", f"data.root={tmp_path}", "data.augment.recipe=huge"])
