"""kernels.tune / kernels.cache_dir: the tuning knobs are config keys of export.py and evaluate.py."""

import pytest
import torch
from omegaconf import OmegaConf

from superblock.cli import run_cli
from superblock.config import ConfigError, to_evaluate_config, to_export_config
from superblock.kernels import tuning


@pytest.fixture
def knobs():
    saved = (tuning.STATE.tune, tuning.STATE.cache_dir)
    yield
    tuning.STATE.tune, tuning.STATE.cache_dir = saved
    tuning.clear_tuning()


def test_configure_moves_the_cache_and_turns_measuring_off(tmp_path, knobs):
    tuning.configure(cache_dir=tmp_path / "t")
    assert tuning.cache_path() == tmp_path / "t" / "tuning.json"
    tuning.configure(tune=False)
    assert not tuning._can_measure(torch.zeros(1))  # the knob is read first: no CUDA query on this path
    tuning.configure(tune=True)
    assert tuning.STATE.tune is True


def test_export_and_evaluate_configs_carry_kernel_keys_and_the_cli_applies_them(tmp_path, knobs):
    conf = to_export_config(OmegaConf.create({"checkpoint": "run", "kernels": {"tune": False, "cache_dir": "x"}}))
    assert conf.kernels.tune is False and conf.kernels.cache_dir == "x"
    assert to_evaluate_config(OmegaConf.create({"checkpoint": "run"})).kernels.tune is True
    with pytest.raises(ConfigError, match="kernels"):
        to_export_config(OmegaConf.create({"checkpoint": "run", "kernels": {"tunes": False}}))
    seen = {}
    run_cli(lambda **kw: seen.update(kw), {"a": 1, "kernels": {"tune": False, "cache_dir": str(tmp_path)}})
    assert seen == {"a": 1} and (tuning.STATE.tune, tuning.STATE.cache_dir) == (False, str(tmp_path))


def test_the_tuning_state_reads_the_environment_when_used_not_at_import(monkeypatch, knobs, tmp_path):
    """One object holds what `auto` remembers; knobs left unset follow the environment at the moment of use."""
    tuning.configure(cache_dir=tmp_path)
    saved = tuning.STATE.target
    try:
        tuning.STATE.target = None
        monkeypatch.setenv("SUPERBLOCK_TUNE_FOR", "graph")
        assert tuning.get_tuning_target() == "graph"
        tuning.set_tuning_target("eager")  # an explicit setting wins over the environment
        assert tuning.get_tuning_target() == "eager"
    finally:
        tuning.STATE.target = saved
    tuning.STATE.tune = None
    monkeypatch.setenv("SUPERBLOCK_TUNE", "0")
    assert not tuning.STATE.may_measure()
    before = tuning.generation()
    tuning.record("scope", "key", {"backend": "dense"}, persist=False)
    assert tuning.generation() == before + 1 and tuning.lookup("scope", "key") == {"backend": "dense"}
    tuning.clear_tuning()
    assert tuning.STATE.table == {} and tuning.generation() == before + 2


def test_an_env_var_reader_follows_the_environment_as_it_changes(monkeypatch):
    var = tuning.EnvVar("SUPERBLOCK_TEST_READER")
    monkeypatch.delenv("SUPERBLOCK_TEST_READER", raising=False)
    assert var.get("unset") == "unset"
    monkeypatch.setenv("SUPERBLOCK_TEST_READER", "graph")
    assert var.get("unset") == "graph" and var.get("unset") == "graph"
    monkeypatch.setenv("SUPERBLOCK_TEST_READER", "eager")
    assert var.get("unset") == "eager"
    monkeypatch.delenv("SUPERBLOCK_TEST_READER")
    assert var.get("unset") == "unset"
