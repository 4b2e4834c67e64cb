"""The `sputnik` command line, run as a real subprocess: help, config errors and other user errors
(exit status 2, one line), run directories."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import COMMANDS
from orchestrator.config import load_config
from orchestrator.rundir import create_run_dir, default_run_dir

REPO = Path(__file__).resolve().parents[2]


def sputnik(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_subcommands():
    r = sputnik("--help")
    assert r.returncode == 0
    for name in ("demo", "pretrain", "sft", "sample", "distill", "grpo", "eval", "export", "plan", "config"):
        assert name in r.stdout
    assert set(COMMANDS) == {"demo", "pretrain", "sft", "sample", "distill", "grpo", "eval", "export", "plan", "config"}


@pytest.mark.parametrize("name", ["demo", "pretrain", "sft", "sample", "distill", "grpo", "eval", "export", "plan", "config"])
def test_each_subcommand_has_help_with_config_and_out(name):
    r = sputnik(name, "--help")
    assert r.returncode == 0, r.stderr
    assert "--config" in r.stdout and "--out" in r.stdout and "key.sub=value" in r.stdout
    assert "sputnik config" in r.stdout  # where every key is explained


def test_unknown_key_on_command_line_exits_2_with_one_line():
    r = sputnik("grpo", "grpo.group_sizee=8")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "'grpo.group_sizee'" in lines[0] and "group_size" in lines[0]


def test_bad_value_exits_2_naming_key_and_allowed():
    r = sputnik("pretrain", "pretrain.zero_stage=7")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "'pretrain.zero_stage'" in r.stderr and "0, 1, 2 or 3" in r.stderr


def test_bad_config_file_exits_2_naming_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  temperature: hot\n")
    r = sputnik("grpo", "--config", str(bad))
    assert r.returncode == 2
    assert str(bad) in r.stderr and "'rollout.temperature'" in r.stderr


def test_export_from_a_directory_that_is_not_a_run_exits_2_with_one_line(tmp_path):
    r = sputnik("export", "--from", str(tmp_path), "--to", str(tmp_path / "hf"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"sputnik export: config error: --from {tmp_path}: not a run directory (no config.yaml)"]


def test_run_dir_holds_resolved_config(tmp_path):
    cfg = load_config(None, ["name=unit", "grpo.group_size=4"])
    run_dir = create_run_dir(cfg, tmp_path / "r")
    assert (run_dir / "checkpoints").is_dir()
    again = load_config(run_dir / "config.yaml")
    assert again.grpo.group_size == 4 and again.name == "unit"


def test_default_run_dir_is_unique(tmp_path):
    a = default_run_dir("x", tmp_path)
    a.mkdir()
    b = default_run_dir("x", tmp_path)
    assert a != b and a.name.startswith("x-") and b.parent == tmp_path
