"""Config loading: strict keys with suggestions, types, invariants, dotted overrides."""

import pytest

from ppow_plugin.config import Config, config_to_dict, load_config
from ppow_plugin.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_match_paper_values():
    cfg = load_config(None)
    assert (cfg.rollout.group_size, cfg.rollout.window, cfg.reward.gamma) == (8, 10, 0.12)
    # eta below R_speedup(1) = 1/1.12 so a near miss never beats one accepted token
    assert cfg.reward.eta < 1 / (1 + cfg.reward.gamma)


def test_unknown_key_suggests_nearest(tmp_path):
    p = write(tmp_path, "rollout:\n  group_sise: 4\n")
    with pytest.raises(UserError, match=r"unknown config key 'rollout.group_sise'; did you mean 'rollout.group_size'"):
        load_config(p)


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(UserError, match="did you mean 'reward'"):
        load_config(write(tmp_path, "rewards:\n  gamma: 0.1\n"))


def test_type_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="rollout.window must be an integer"):
        load_config(write(tmp_path, "rollout:\n  window: ten\n"))
    with pytest.raises(UserError, match="dist.dtype must be one of fp32, bf16, got 'bf61'; did you mean 'bf16'"):
        load_config(write(tmp_path, "dist:\n  dtype: bf61\n"))
    with pytest.raises(UserError, match="run.resume must be true or false"):
        load_config(write(tmp_path, "run:\n  resume: 3\n"))


def test_invariants(tmp_path):
    with pytest.raises(UserError, match="group_size .1. must be >= 2"):
        load_config(None, ["rollout.group_size=1"])
    with pytest.raises(UserError, match="zero_stage"):
        load_config(None, ["dist.zero_stage=4"])


def test_overrides_parse_yaml_scalars(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 1e-5\nrun:\n  max_steps: 3\n")
    cfg = load_config(p, ["run.max_steps=7", "model.drafter=null", "optim.betas=[0.8, 0.9]", "reward.gamma=1"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.run.max_steps == 7 and cfg.model.drafter is None
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.reward.gamma == 1.0 and isinstance(cfg.reward.gamma, float)


def test_bad_override_syntax():
    with pytest.raises(UserError, match="section.field=value"):
        load_config(None, ["run.max_steps"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_roundtrip_dict():
    d = config_to_dict(Config())
    assert d["optim"]["betas"] == [0.9, 0.95]
    assert d["rollout"]["group_size"] == 8
