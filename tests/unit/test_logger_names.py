"""logger.name: one list (superblock.logging.LOGGERS) that the config check and build_logger both use."""

from __future__ import annotations

import json

import pytest

from superblock.config import LOGGERS as CONFIG_LOGGERS
from superblock.logging import LOGGERS, build_logger


def test_one_list_of_logger_names():
    assert CONFIG_LOGGERS is LOGGERS and "console" in LOGGERS


def test_build_logger_refuses_an_unknown_name_and_writes_metrics(tmp_path):
    with pytest.raises(ValueError, match="unknown logger 'tensorboard'"):
        build_logger("tensorboard", tmp_path, True, {})
    logger = build_logger("console", tmp_path, True, {})
    logger.log({"loss": 1.5}, 3)
    logger.finish()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[0]["loss"] == 1.5
