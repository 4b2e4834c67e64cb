"""Checkpoints of a pretraining run, and `sputnik export`: ZeRO shards -> one HF DeepseekV3 directory.

A checkpoint directory (under RUN_DIR/checkpoints/train/checkpoint_*) counts only when it is
complete: `meta.json` (written last by rank 0), every rank's `rank{r}.pt`, and DeepSpeed's tag
folder with its model states. Anything else, such as a save interrupted by a crash, is ignored.

Test: `pytest tests/orchestrator/test_orch_pretrain.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model import ModelArgs, Transformer
from orchestrator.config import ConfigError, RunConfig


def is_complete(path: Path) -> bool:
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return False
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        return False
    tag = path / meta.get("tag", "ds")
    ranks_ok = all((path / f"rank{r}.pt").is_file() for r in range(meta.get("world_size", 1)))
    return ranks_ok and tag.is_dir() and any(tag.glob("*model_states.pt"))


def find_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, path)."""
    found = []
    for meta in Path(run_dir).glob("checkpoints/**/meta.json"):
        path = meta.parent
        if is_complete(path):
            found.append((json.loads(meta.read_text())["step"], path))
    return sorted(found)


def load_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The full model state dict (fp32 master weights, buffers) gathered from all ZeRO shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = json.loads((path / "meta.json").read_text()).get("tag", "ds")
    sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    # the engine wrapped the Transformer in LossModule: drop the "model." prefix
    return {k.removeprefix("model."): v for k, v in sd.items()}


def export_checkpoint(path: Path, args: ModelArgs, out: Path) -> None:
    from model.hf import save_hf_pretrained

    sd = load_checkpoint_state(path)
    model = Transformer(args)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(".load")]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model config ({(missing or unexpected)[0]!r} {'missing' if missing else 'unexpected'})")
    save_hf_pretrained(model, out)


def run(cfg: RunConfig, cli_args) -> int:
    """`sputnik export --from RUN_DIR [--step N] --to DIR`."""
    from orchestrator.config import load_config

    run_dir = Path(cli_args.from_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--from {run_dir}: not a run directory (no config.yaml)")
    run_cfg = load_config(run_dir / "config.yaml")
    ckpts = find_checkpoints(run_dir)
    if not ckpts:
        raise ConfigError(f"--from {run_dir}: the run has no complete checkpoint")
    if cli_args.step is None:
        step, path = ckpts[-1]
    else:
        match = [c for c in ckpts if c[0] == cli_args.step]
        if not match:
            raise ConfigError(f"--step {cli_args.step}: no complete checkpoint at that step in {run_dir} (have: {', '.join(str(s) for s, _ in ckpts)})")
        step, path = match[0]
    export_checkpoint(path, run_cfg.model, Path(cli_args.to_dir))
    print(f"export: step {step} of {run_dir} written to {cli_args.to_dir} (Hugging Face DeepseekV3 format)")
    return 0
