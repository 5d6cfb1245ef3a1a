"""The run context every stage runs in: inputs checked first, run_dir and config.yaml written, and what the stage
opened closed at the end - newest first, all of them even when one fails or the stage raises."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from r1.config.validate import ConfigError
from r1.run_context import RunContext
from tests.conftest import TINY, compose


def test_what_a_stage_opened_is_closed_newest_first_even_when_a_close_or_the_stage_fails(tmp_path):
    cfg = compose([*TINY, f"run_dir={tmp_path / 'run'}"])
    closed = []

    def close(name):
        closed.append(name)
        if name == "logger":
            raise OSError("disk full while flushing")

    with pytest.raises(OSError, match="disk full"), RunContext(cfg) as ctx:
        for name in ("train pool", "rollout pool", "logger", "ledger"):
            ctx.closing(name, close)
        raise KeyError("the stage failed")  # (chained below the close's error: neither is lost)
    assert closed == ["ledger", "logger", "rollout pool", "train pool"]
    assert OmegaConf.load(tmp_path / "run" / "config.yaml") == cfg


def test_missing_inputs_fail_before_anything_is_made(tmp_path):
    cfg = compose([*TINY, f"run_dir={tmp_path / 'run'}", "data.generator=null", "data.train_path=/nope.jsonl",
                   "data.eval_path=/nope.jsonl"])
    with pytest.raises(ConfigError, match="data.train_path=/nope.jsonl does not exist"), RunContext(cfg):
        pass
    assert not (tmp_path / "run").exists()
