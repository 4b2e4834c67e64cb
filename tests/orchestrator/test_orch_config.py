"""Config loading: YAML + dotted overrides into typed dataclasses, and every error path."""

import dataclasses
import re
from pathlib import Path

import pytest

from orchestrator.config import (
    CONFIG_DIR,
    ConfigError,
    GRPOConfig,
    RunConfig,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_configs_load():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig)
        assert cfg.name, path


def test_yaml_values_and_overrides_are_typed(tmp_path):
    p = write(tmp_path, "name: a\ngrpo:\n  group_size: 4\n  clip_high: 0.3\n")
    cfg = load_config(p, ["grpo.group_size=16", "rollout.temperature=0.7", "tracking.tags=[x, y]", "name=b"])
    assert cfg.name == "b"
    assert cfg.grpo.group_size == 16 and isinstance(cfg.grpo.group_size, int)
    assert cfg.grpo.clip_high == 0.3
    assert cfg.rollout.temperature == 0.7
    assert cfg.tracking.tags == ["x", "y"]
    # untouched sections keep their dataclass defaults
    assert cfg.pretrain == type(cfg.pretrain)()


def test_parse_overrides_yaml_scalars():
    assert parse_overrides(["a.b=3", "c=true", "d=0.5", "e=hello", "f="]) == {
        "a.b": 3, "c": True, "d": 0.5, "e": "hello", "f": ""}


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", ".a=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides([bad])


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_unknown_key_in_file_names_file_key_and_allowed(tmp_path):
    p = write(tmp_path, "grpo:\n  group_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = one_line(e)
    assert str(p) in msg and "'grpo.group_sise'" in msg and "group_size" in msg


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, "nmae: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = one_line(e)
    assert "'nmae'" in msg and "allowed:" in msg and "name" in msg


def test_unknown_key_on_command_line_names_override():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["grpo.groupsize=8"])
    msg = one_line(e)
    assert "command-line override 'grpo.groupsize=8'" in msg and "'grpo.groupsize'" in msg


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("grpo.group_size=abc", "grpo.group_size", "integer"),
        ("grpo.group_size=1", "grpo.group_size", "greater than or equal to 2"),
        ("rollout.top_p=1.5", "rollout.top_p", "less than or equal to 1"),
        ("pretrain.zero_stage=5", "pretrain.zero_stage", "0, 1, 2 or 3"),
        ("grpo.advantage_scale=mean", "grpo.advantage_scale", "'std' or 'none'"),
        ("tracking.wandb_mode=loud", "tracking.wandb_mode", "'offline'"),
        ("pretrain.lr=-1", "pretrain.lr", "greater than 0"),
        ("pretrain.fp8=maybe", "pretrain.fp8", "bool"),
    ],
)
def test_bad_values_name_key_and_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = one_line(e)
    assert f"'{key}'" in msg and allowed in msg and "command-line override" in msg


def test_section_given_a_scalar(tmp_path):
    p = write(tmp_path, "grpo: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "'grpo'" in one_line(e)


def test_override_into_scalar_is_rejected(tmp_path):
    p = write(tmp_path, "name: a\n")
    with pytest.raises(ConfigError, match="'name' is a value, not a section"):
        load_config(p, ["name.x=1"])
    with pytest.raises(ConfigError) as e:  # not in the file: the type check names the key instead
        load_config(None, ["name.x=1"])
    assert "command-line override 'name.x=1'" in one_line(e) and "'name'" in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "grpo: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "not valid YAML" in one_line(e) and str(p) in str(e.value)
    p2 = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p2)


def test_unknown_model_preset_lists_known(tmp_path):
    p = write(tmp_path, "model: gigantic\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "'model.preset'" in one_line(e) and "gigantic" in str(e.value)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIG_DIR / "grpo_math.yaml", ["grpo.group_size=4", "pretrain.betas=[0.8, 0.9]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert again.pretrain.betas == (0.8, 0.9)


def test_defaults_match_dataclass_defaults():
    cfg = load_config(None)
    assert cfg.grpo == GRPOConfig()
    assert {f.name for f in dataclasses.fields(RunConfig)} >= {"model", "data", "pretrain", "grpo", "rollout", "rewards", "cluster", "tracking"}


def test_component_sections_validated_with_their_dataclasses():
    from data import DataConfig
    from model import ModelArgs
    from rl.rewards import RewardConfig

    cfg = load_config(None, ["model.dim=64", "data.seq_len=32"])
    assert isinstance(cfg.model, ModelArgs) and cfg.model.dim == 64 and cfg.model.vocab == 512  # tiny preset
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.rewards, RewardConfig)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rewards.rewards=[{name: format, wieght: 1}]"])
    assert "'rewards.rewards.0.wieght'" in one_line(e) and "allowed: name, weight, options" in str(e.value)
    with pytest.raises(ConfigError, match=r"key 'model': n_limited_groups \(9\) must not exceed n_expert_groups"):
        load_config(None, ["model.n_limited_groups=9"])


@pytest.mark.parametrize("override, key", [("grpo.lr=.inf", "grpo.lr"), ("pretrain.lr=.nan", "pretrain.lr"),
                                           ('rewards.rewards=[{"name": "format", "weight": .nan}]', "rewards.rewards.0.weight")])
def test_non_finite_numbers_are_refused(override, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        load_config(None, [override])


def test_non_utf8_config_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="bad.yaml is not UTF-8"):
        load_config(bad)


def test_rewards_shorthands_mean_the_full_form(tmp_path):
    full = load_config(CONFIG_DIR / "rewards_example.yaml").rewards
    assert [(s.name, s.weight) for s in full.rewards] == [("math_accuracy", 1.0), ("format", 0.1)]
    for text in ("rewards: [{name: math_accuracy}, {name: format, weight: 0.1}]\n", "rewards: {math_accuracy: 1.0, format: 0.1}\n"):
        (tmp_path / "r.yaml").write_text(text)
        got = load_config(tmp_path / "r.yaml").rewards
        assert [(s.name, s.weight) for s in got.rewards] == [("math_accuracy", 1.0), ("format", 0.1)]


def test_sputnik_config_lists_every_key_with_its_default_and_description():
    import subprocess
    import sys

    from orchestrator.config_doc import describe

    rows = describe(load_config(None, ["grpo.group_size=16"]))
    by_key = {r["key"]: r for r in rows}
    g = by_key["grpo.group_size"]
    assert (g["value"], g["default"], g["type"], g["range"]) == (16, 8, "int", ">= 2")
    assert by_key["grpo.aggregation"]["range"] == "token | sequence | constant"
    assert all(r["description"] for r in rows), [r["key"] for r in rows if not r["description"]]

    cfg = load_config(None)  # every leaf field of the sections, independently of describe()
    want = set()
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        want |= {f"{f.name}.{x.name}" for x in dataclasses.fields(sub)} if dataclasses.is_dataclass(sub) else {f.name}
    assert set(by_key) == want
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "config", "rollout.top_p=0.9"], capture_output=True, text=True, timeout=120,
                       cwd=CONFIG_DIR.parent)
    assert r.returncode == 0 and any(l.split()[:2] == ["rollout.top_p", "0.9"] for l in r.stdout.splitlines())
