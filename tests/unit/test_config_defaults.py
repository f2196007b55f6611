"""One source of config defaults: the YAML that train.py, export.py and evaluate.py compose with no overrides equals
the defaults of their dataclasses (superblock.config), key by key, and every YAML key is a dataclass field. A
changed default must change both, or this fails."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from superblock.config import (
    ConfigError,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    TrainConfig,
    to_evaluate_config,
    to_export_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SCHEMAS = {"train": TrainConfig, "export": ExportConfig, "evaluate": EvaluateConfig}
FREE_FORM = {"meta", "model.kwargs", "model.config"}  # dict fields whose keys are the user's


def _composed(name: str, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=False)


def differences(yaml: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Every YAML leaf that is not a dataclass field or whose value differs from the field's default (floats to
    1e-6 relative: YAML spells 4/3 as 1.3333333)."""
    out = []
    for key, value in yaml.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            out.append(f"{path}: in the YAML, not a field of the dataclass")
        elif isinstance(value, dict) and isinstance(defaults[key], dict) and path not in FREE_FORM:
            out.extend(differences(value, defaults[key], f"{path}."))
        elif not _same(value, defaults[key]):
            out.append(f"{path}: YAML {value!r} != dataclass {defaults[key]!r}")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_yaml_defaults_are_the_dataclass_defaults(name):
    yaml = {k: v for k, v in _composed(name).items() if k != "hydra"}
    defaults = asdict(SCHEMAS[name]())
    bad = differences(yaml, defaults)
    assert not bad, f"configs/{name}.yaml and its groups disagree with superblock.config:\n  " + "\n  ".join(bad)


def test_every_group_default_is_covered():
    """Each config group train.yaml picks by default sits under a dataclass field (none escapes the check)."""
    yaml = _composed("train")
    assert set(yaml) - {"hydra"} <= set(asdict(TrainConfig()))
    for group in ("model", "data", "sparsity", "optim", "trainer", "logger", "distill", "measure"):
        assert yaml[group] and not differences(yaml[group], asdict(TrainConfig())[group]), group


def test_the_check_catches_drift():
    defaults = asdict(TrainConfig())
    drifted = {"trainer": {**defaults["trainer"], "max_epochs": 7}, "sparsity": {"schedul": "cubic"}}
    bad = differences(drifted, defaults)
    assert any("trainer.max_epochs" in b for b in bad) and any("sparsity.schedul" in b for b in bad)
    assert not differences({"data": {"augment": {"ratio": [0.75, 1.3333333]}}}, defaults)


def test_evaluate_data_overrides_are_data_fields():
    """evaluate.py's `data:` node overrides the run's data config: its keys are DataConfig fields."""
    assert set(_composed("evaluate")["data"]) <= {f for f in asdict(DataConfig())}


@pytest.mark.parametrize(
    "convert,overrides,message",
    [
        (to_export_config, {}, "checkpoint=<path> is required"),
        (to_export_config, {"checkpoint": "run", "probe_batch": "abc"}, "probe_batch"),
        (to_export_config, {"checkpoint": "run", "layuot": "bsr"}, "layuot"),
        (to_export_config, {"checkpoint": "run", "backend": "cuda"}, "backend='cuda'"),
        (to_evaluate_config, {"checkpoint": "run", "latency": {"repeats": 0}}, "latency.repeats must be > 0"),
        (to_evaluate_config, {"checkpoint": "run", "latency": {"median": True}}, "median"),
        (to_evaluate_config, {"checkpoint": "run", "data": {"rooot": "/d"}}, "data.rooot is not a data option"),
        (to_evaluate_config, {"checkpoint": "run", "max_batches": -1}, "max_batches must be > 0"),
    ],
)
def test_export_and_evaluate_configs_reject_mistakes(convert, overrides, message):
    with pytest.raises(ConfigError, match=message):
        convert(overrides)


def test_export_and_evaluate_configs_type_the_composed_yaml():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        exp = compose(config_name="export", overrides=["checkpoint=runs/a", "batch_sizes=8", "dtype=bf16"])
        ev = compose(config_name="evaluate", overrides=["checkpoint=runs/a", "data=text", "latency.repeats=5"])
    e = to_export_config(exp)
    assert isinstance(e, ExportConfig) and e.batch_sizes == 8 and e.dtype == "bf16" and e.checkpoint == "runs/a"
    v = to_evaluate_config(ev)
    assert isinstance(v, EvaluateConfig) and v.latency.repeats == 5 and v.data["name"] == "text"
    assert asdict(v)["latency"] == {**asdict(EvaluateConfig().latency), "repeats": 5}


@pytest.mark.parametrize("flag", [False, True])
def test_trainer_fused_mask_sets_the_process_switch(tmp_path, flag):
    """trainer.fused_mask (once $SUPERBLOCK_FUSED_MASK) reaches the fused mask kernels' process-wide switch."""
    import torch

    from superblock.config import to_config
    from superblock.engine.distributed import DistInfo
    from superblock.engine.trainer import Trainer
    from superblock.sparsity import fused

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["debug=smoke", f"trainer.fused_mask={flag}"])
    fused.set_enabled(not flag)
    try:
        Trainer(to_config(cfg), tmp_path, DistInfo(0, 1, 0, torch.device("cpu")), {})
        assert fused._state["enabled"] is flag
    finally:
        fused.set_enabled(True)


def test_readme_lists_every_config_group_and_option():
    """README's table of config groups names every group folder and every option file under configs/."""
    readme = (CONFIGS.parent / "README.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line.split("|")[2]
        for line in readme.splitlines()
        if line.startswith("| `") and line.split("|")[1].strip().strip("`").endswith("/")
    }
    missing = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        if path.parent == CONFIGS:
            continue
        group = f"{path.parent.relative_to(CONFIGS).as_posix()}/"
        if group not in rows or path.stem not in rows[group].replace("*", "").replace(",", " ").split():
            missing.append(f"{group}{path.stem}")
    assert not missing, f"README's config group table misses: {missing}"
