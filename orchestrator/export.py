"""`sputnik export --from RUN [--step N] --to DIR`: one checkpoint of a pretraining or GRPO run as a
Hugging Face DeepseekV3 directory that `transformers.AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load without warnings: config.json with the special token ids,
generation_config.json, safetensors (sharded above 5 GB, MTP modules in `mtp*.safetensors`; see
model/hf/save.py) and the run's tokenizer files. `write_hf` is the one writer of such directories:
the pretraining and GRPO drivers' final `hf/` exports go through it too, so a run's `hf/` alone
is a complete model source.

Options (the Python API of `export_checkpoint` / `write_hf`, and the CLI flags where
orchestrator/cli.py defines them: --mtp separate|inline|none, --fp8, --max-shard-size).

The checkpoint layouts and the model config of each kind of run are in orchestrator/checkpoints.py.

Test: `pytest tests/orchestrator/test_orch_checkpoints.py tests/orchestrator/test_orch_hf_sources.py`.
"""

from __future__ import annotations

from pathlib import Path

import sys

from model import ModelArgs, Transformer
from orchestrator.checkpoints import Checkpoint, find_checkpoints, find_tokenizer, lazy_model_state, model_args
from orchestrator.config import ConfigError, RunConfig, load_config


def write_hf(model: Transformer | ModelArgs, out: Path, tokenizer: Path | None, *, template: str = "r1", state=None,
             shown_as: Path | None = None, **options) -> None:
    """`model` (or a model of shape `model` whose tensor `name` is `state(name)`, read as it is
    written: model.hf.save_hf_state) and the tokenizer at `tokenizer` (ours or a Hugging Face one)
    as an HF directory (`shown_as`: the directory messages name, default `out`); `options` go to
    model.hf.save_hf_state (mtp, fp8, dtype, max_shard_size)."""
    from data.tokenizer import load_tokenizer
    from model.hf import save_hf_state
    from model.hf.save import dict_state

    args = model if isinstance(model, ModelArgs) else model.args
    if state is None:
        state = dict_state(model.state_dict())
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    save_hf_state(args, state, out, special_ids=tok.special_ids() if tok else None, **options)
    if tok is None:
        print(f"export: no tokenizer found for {shown_as or out}; wrote the model only (AutoTokenizer will not load it)", file=sys.stderr)
    else:
        tok.save_pretrained(out, template=template, model_max_length=args.max_seq_len)


def export_checkpoint(ckpt: Checkpoint, args: ModelArgs, out: Path, *, tokenizer: Path | None = None, template: str = "r1",
                      **options) -> None:
    """Write `ckpt`'s weights, as a model of shape `args`, with `tokenizer`, to the HF directory `out`,
    one tensor read from the checkpoint's memory-mapped files at a time (the model is never whole in
    memory: the peak is one shard and one layer's experts). The files are written beside `out` and
    moved in once complete: a checkpoint that turns out not to match leaves `out` as it was."""
    import shutil

    import torch

    from model.hf.save import ShapeMismatch

    state = lazy_model_state(ckpt)
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(".load")]  # .load: per-step expert token counts
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ConfigError(f"{ckpt.path}: checkpoint does not match the model config "
                          f"({(missing or unexpected)[0]!r} {'missing' if missing else 'unexpected'})")
    out = Path(out)
    part = out.parent / f".{out.name}.partial"
    shutil.rmtree(part, ignore_errors=True)
    try:
        write_hf(args, part, tokenizer, template=template, state=lambda k, rows=None: state[k](rows), shown_as=out, **options)
    except BaseException as e:
        shutil.rmtree(part, ignore_errors=True)
        if isinstance(e, ShapeMismatch):
            raise ConfigError(f"{ckpt.path}: checkpoint does not match the model config ({e})") from None
        raise
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        old.unlink()  # a previous export's shards would not match the new index
    for f in part.iterdir():
        f.replace(out / f.name)
    part.rmdir()


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
    options = {k: getattr(cli_args, k) for k in ("mtp", "fp8", "max_shard_size") if getattr(cli_args, k, None) is not None}
    run_cfg = load_config(run_dir / "config.yaml")
    tokenizer = find_tokenizer(run_dir)
    try:
        export_checkpoint(ckpt, model_args(run_dir, ckpt), Path(cli_args.to_dir), tokenizer=tokenizer, template=run_cfg.data.template, **options)
    except ValueError as e:  # a bad option value (mtp, max_shard_size)
        raise ConfigError(str(e)) from None
    print(f"export: step {ckpt.step} of {ckpt.kind} run {run_dir} written to {cli_args.to_dir} (Hugging Face DeepseekV3 format"
          + (f", tokenizer from {tokenizer})" if tokenizer else ", no tokenizer found)"))
    return 0
