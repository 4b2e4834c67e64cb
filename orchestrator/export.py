"""`sputnik export --from RUN [--step N] --to DIR`: one checkpoint of a pretraining or GRPO run as a
Hugging Face DeepseekV3 directory (config.json + model.safetensors) that
`transformers.DeepseekV3ForCausalLM.from_pretrained` loads.

The checkpoint layouts and the model config of each kind of run are in orchestrator/checkpoints.py.

Test: `pytest tests/orchestrator/test_orch_checkpoints.py`.
"""

from __future__ import annotations

from pathlib import Path

from model import ModelArgs, Transformer
from orchestrator.checkpoints import Checkpoint, find_checkpoints, load_model_state, model_args
from orchestrator.config import ConfigError, RunConfig


def export_checkpoint(ckpt: Checkpoint, args: ModelArgs, out: Path) -> None:
    """Write `ckpt`'s weights, as a model of shape `args`, to the HF directory `out`."""
    from model.hf import save_hf_pretrained

    model = Transformer(args)
    missing, unexpected = model.load_state_dict(load_model_state(ckpt), strict=False)
    missing = [k for k in missing if not k.endswith(".load")]  # per-step expert token counts, not weights
    if missing or unexpected:
        raise ConfigError(f"{ckpt.path}: checkpoint does not match the model config "
                          f"({(missing or unexpected)[0]!r} {'missing' if missing else 'unexpected'})")
    save_hf_pretrained(model, out)


def select(run_dir: Path, step: int | None) -> Checkpoint:
    """The checkpoint at `step` (default: the latest) of a run directory; ConfigError if there is none."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--from {run_dir}: not a run directory (no config.yaml)")
    ckpts = find_checkpoints(run_dir)
    if not ckpts:
        raise ConfigError(f"--from {run_dir}: the run has no complete checkpoint")
    if step is None:
        return ckpts[-1]
    match = [c for c in ckpts if c.step == step]
    if not match:
        have = ", ".join(str(c.step) for c in ckpts)
        raise ConfigError(f"--step {step}: no complete checkpoint at that step in {run_dir} (have: {have})")
    return match[0]


def run(cfg: RunConfig, cli_args) -> int:
    run_dir = Path(cli_args.from_dir)
    ckpt = select(run_dir, cli_args.step)
    export_checkpoint(ckpt, model_args(run_dir, ckpt), Path(cli_args.to_dir))
    print(f"export: step {ckpt.step} of {ckpt.kind} run {run_dir} written to {cli_args.to_dir} (Hugging Face DeepseekV3 format)")
    return 0
