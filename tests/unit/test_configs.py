"""Every YAML under configs/ composes and validates (recursively: every group option and experiment)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from superblock.config import ConfigError, to_config, to_evaluate_config, to_export_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TOP_LEVEL = {p.stem for p in CONFIGS.glob("*.yaml")}
GROUP_FILES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS and "hydra" not in p.parts)
NEEDS_ROOT = ("data.root=/tmp/dataset",)
# Options that only make sense with a partner: token data trains language models (and they read tokens).
PARTNERS = {"data/text": ("model.name=hf:gpt2", "model.source=hf"), "model/hf": ("data=text",)}


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_there_are_configs_to_check():
    assert "train" in TOP_LEVEL and len(GROUP_FILES) >= 15


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_group_option_composes_and_validates(path):
    group = path.parent.relative_to(CONFIGS).as_posix()
    partners = PARTNERS.get(f"{group}/{path.stem}", ())
    cfg = _compose("train", [f"{group}={path.stem}", *NEEDS_ROOT, *partners])
    if group == "sweep":
        return  # sweep configs only switch Hydra to multirun with a grid; the job config is checked above
    conf = to_config(cfg)
    assert conf.model.name and conf.data.batch_size > 0


SCHEMAS = {"train": (to_config, []), "export": (to_export_config, ["checkpoint=outputs/run"]),
           "evaluate": (to_evaluate_config, ["checkpoint=outputs/run"])}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TOP_LEVEL))
def test_every_top_level_config_composes_and_validates(name):
    assert name in SCHEMAS, f"configs/{name}.yaml has no schema here: add its to_*_config"
    to_schema, required = SCHEMAS[name]
    typed = to_schema(_compose(name, required))
    assert type(typed).__name__.lower().startswith(name)  # TrainConfig, ExportConfig, EvaluateConfig
    if required:  # the one required key: without it, a clear error at start-up
        with pytest.raises(ConfigError, match="checkpoint=<path> is required"):
            to_schema(_compose(name, []))


def test_default_config_is_the_embedded_run():
    conf = to_config(_compose("train", []))
    assert conf.model.name == "tiny_vit" and conf.data.name == "synthetic"
    assert conf.sparsity.enabled and conf.sparsity.level >= 0.5 and conf.sparsity.targets == ["mlp", "attn"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sparsity.level=1.5"], "sparsity.level"),
        (["trainer.strategy=zero3"], "trainer.strategy"),
        (["trainer.strategy=fsdp", "trainer.ema_decay=0.99"], "trainer.ema_decay"),
        (["data=text"], "data=text needs a language model"),
        (["sparsity.schedule=cubic", "sparsity.ramp_epochs=0", "sparsity.ramp_fraction=null"], "ramp_epochs"),
        (["sparsity.ramp_fraction=1.5"], "sparsity.ramp_fraction"),
        (["data=imagefolder"], "data.root is required"),
        (["trainer.precision=fp8"], "trainer.precision"),
        (["trainer.fault_at_step=0"], "trainer.fault_at_step must be > 0"),
        (["logger.mode=sometimes"], "logger.mode"),
        (["+model.unknown_key=1"], "unknown_key"),
        (["data.augment.scale=[0.5,2.0]"], "data.augment.scale"),
        (["data.augment.hflip=1.5"], "data.augment.hflip"),
        (["data.augment.crop_pct=0"], "data.augment.crop_pct"),
        (["data.augment.interpolation=lanczos9"], "data.augment.interpolation"),
        (["sparsity.level_overrides=[{match:'*.fc1',level:1.2}]"], "level must be a sparsity"),
        (["sparsity.level_overrides=[{match:'*.fc1',level:0.3}]", "sparsity.allocation=global"], "layerwise"),
        (
            ["sparsity.reconstruct=true"],
            "sparsity.schedule=constant",
        ),  # the default ramps: step 0's masks are not final
        (["sparsity=oneshot", "sparsity.start_epoch=1"], "sparsity.start_epoch=0"),
        (["sparsity=oneshot", "sparsity.score_init=magnitude", "trainer.strategy=fsdp"], "refits whole weights"),
        (["sparsity=oneshot", "sparsity.select=best"], "sparsity.select"),
    ],
)
def test_validation_messages(overrides, message):
    with pytest.raises(ConfigError, match=message):
        to_config(_compose("train", overrides))


def test_experiments_carry_launch_command_and_expected_result():
    for path in (CONFIGS / "experiment").glob("*.yaml"):
        text = path.read_text()
        assert text.startswith("# @package _global_"), path
        assert "python train.py" in text or "torchrun" in text, path
        assert "Expected" in text, path


LAUNCHERS = sorted((CONFIGS / "hydra" / "launcher").glob("*.yaml"))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_every_launcher_composes(path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra/launcher={path.stem}"], return_hydra_config=True)
    assert "Launcher" in cfg.hydra.launcher._target_


def test_sweep_configs_switch_to_multirun():
    for path in (CONFIGS / "sweep").glob("*.yaml"):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"sweep={path.stem}"], return_hydra_config=True)
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweeper.params, path


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "defaults":
                yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


@pytest.mark.parametrize("path", sorted((CONFIGS / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_value_an_experiment_sets_survives_composition(path):
    """train.yaml's own keys are merged last (_self_): a key it spelled would silently override every experiment
    (distill.teacher did: sparse fine-tuning ran without its teacher). Group defaults belong in groups."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    overrides = [*NEEDS_ROOT, f"experiment={path.stem}", "model.pretrained=/tmp/dense_run"]
    cfg = OmegaConf.to_container(_compose("train", overrides), resolve=True)
    for key, value in _leaves(raw):
        got = cfg
        for part in key.split("."):
            got = got[part]
        if isinstance(value, str) and "${" in value:  # interpolated: resolved from another key
            continue
        if value == "???" or key == "model.pretrained":  # "???" is required; model.pretrained is this test's input
            continue
        assert got == value, f"{path.name}: {key} = {value!r} became {got!r}"
    if path.stem == "sparse_finetune":
        assert cfg["distill"]["teacher"] == "/tmp/dense_run" and cfg["sparsity"]["score_init"] == "magnitude"


def test_freeze_after_ramp_reaches_sparsify_only_when_set():
    """sparsity.freeze_after_ramp=true reaches sparsify(); unset, the spec stays what runs from before the option
    stored (so they still resume: a spec mismatch refuses a checkpoint)."""
    from superblock.engine.builders import sparsity_spec

    plain = sparsity_spec(to_config(_compose("train", [])).sparsity, steps_per_epoch=10, total_steps=100)
    frozen = sparsity_spec(to_config(_compose("train", ["sparsity.freeze_after_ramp=true"])).sparsity, 10, 100)
    assert "freeze_after_ramp" not in plain and frozen == {**plain, "freeze_after_ramp": True}


def test_level_overrides_reach_sparsify_only_when_set():
    from superblock.engine.builders import sparsity_spec

    plain = sparsity_spec(to_config(_compose("train", [])).sparsity, steps_per_epoch=10, total_steps=100)
    set_ = ["sparsity.level_overrides=[{match:'*.mlp.*',level:0.3}]"]
    spec = sparsity_spec(to_config(_compose("train", set_)).sparsity, 10, 100)
    assert "level_overrides" not in plain
    assert spec == {**plain, "level_overrides": [{"match": "*.mlp.*", "level": 0.3}]}
    total = sparsity_spec(to_config(_compose("train", [*set_, "sparsity.level_total=true"])).sparsity, 10, 100)
    assert total == {**spec, "level_total": True} and "level_total" not in plain  # old runs' specs stay equal


def test_val_max_bytes_reaches_the_text_data_only_when_set():
    from superblock.engine.builders import dataset_options

    lm = ["model=hf", "model.name=hf:llama", "data=text"]
    plain = dataset_options(to_config(_compose("train", lm)).data)
    fixed = dataset_options(to_config(_compose("train", [*lm, "data.val_max_bytes=200000"])).data)
    assert "val_max_bytes" not in plain and fixed == {**plain, "val_max_bytes": 200_000}
    with pytest.raises(ConfigError, match="data.val_max_bytes"):
        to_config(_compose("train", [*lm, "data.val_max_bytes=0"]))
