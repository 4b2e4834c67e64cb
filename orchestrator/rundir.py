"""Run directories: `runs/<name>-<timestamp>/` with config.yaml, metrics.jsonl, checkpoints/, summary.json.

Test: `pytest tests/orchestrator/test_orch_cli.py`.
"""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.config import ConfigError, RunConfig, save_config


def default_run_dir(name: str, root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{name}-{stamp}"
    n = 1
    while path.exists():  # two runs started in the same second get distinct directories
        n += 1
        path = root / f"{name}-{stamp}-{n}"
    return path


def create_run_dir(cfg: RunConfig, out: str | Path | None) -> Path:
    """Make the run directory and save the resolved config in it before anything starts."""
    run_dir = Path(out) if out else default_run_dir(cfg.name)
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    except OSError as e:
        raise ConfigError(f"--out {run_dir}: the run directory cannot be written ({e.strerror or e})") from None
    return run_dir
