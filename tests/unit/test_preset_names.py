"""Renamed options keep working for one release, with a warning: `sparsity=supermask` (which was never
the Supermask method; that is `sparsity=supermask_reference`) is now `sparsity=learned`; export.py's `batch_size=N` is
`batch_sizes=[N]`."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from superblock.cli import DEPRECATED_PRESETS, _hydra_choices, deprecated_presets

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _train(overrides: list[str], hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)


def _plain(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def test_the_old_name_composes_the_same_config_as_the_new_one():
    assert _plain(_train(["sparsity=supermask"])) == _plain(_train(["sparsity=learned"]))
    assert _plain(_train([])) == _plain(_train(["sparsity=learned"]))  # and it is the default


def test_only_the_old_name_gets_a_warning_naming_the_new_one():
    (message,) = deprecated_presets({"sparsity": "supermask", "model": "tiny_vit"})
    assert "sparsity=supermask is deprecated" in message and "sparsity=learned" in message
    assert deprecated_presets({"sparsity": "learned"}) == []
    assert deprecated_presets({"sparsity": "supermask_reference"}) == []


def test_the_warning_reads_what_hydra_chose():
    cfg = _train(["sparsity=supermask"], hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert _hydra_choices()["sparsity"] == "supermask"
        assert len(deprecated_presets(_hydra_choices())) == 1
    finally:
        HydraConfig.instance().cfg = None


def test_every_deprecated_option_still_has_its_file():
    for old in DEPRECATED_PRESETS:
        group, option = old.split("=")
        assert (CONFIGS / group / f"{option}.yaml").is_file(), old


def test_export_batch_size_is_the_deprecated_spelling_of_batch_sizes(capsys):
    from superblock.cli import export_args

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        old = compose(config_name="export", overrides=["checkpoint=runs/a", "batch_size=8"])
        new = compose(config_name="export", overrides=["checkpoint=runs/a", "batch_sizes=[8]"])
    assert export_args(old) == export_args(new)
    assert export_args(new)["batch_sizes"] == [8] and "batch_size" not in export_args(new)
    err = capsys.readouterr().err
    assert err.count("batch_size=8 is deprecated: use batch_sizes=[8]") == 1
