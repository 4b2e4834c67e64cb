"""`sputnik distill`: rejection sampling and SFT chained, into a student that may be smaller than
its teacher (issue 22; DeepSeek-R1 §2.4: distilled students beat RL run on the small models).

1. `sample/`: `sputnik sample` of the teacher (`sample.teacher`), the `sample:` section.
2. The student: `distill.student` (a run or HF directory with a vocabulary that holds the
   teacher's tokenizer), or a fresh model of `distill.student_preset` (a dense or smaller MoE
   preset, initialised at random with `seed`, vocabulary and special ids the teacher's tokenizer's)
   written to `student-init/`.
3. `sft/`: `sputnik sft` of the student on `sample/samples.jsonl` with the teacher's tokenizer,
   the `sft:` section.
4. The student's held-out accuracy before and after, on `grpo.heldout_size` held-out tasks of
   `sample.tasks` (the evaluator of GRPO and `sputnik eval`), in summary.json and report.md.

Test: `pytest tests/orchestrator/test_orch_sample.py`.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

from orchestrator.config import ConfigError, RunConfig
from orchestrator.rundir import create_run_dir


def make_student(cfg: RunConfig, tok_path: Path, out: Path) -> Path:
    """An HF directory of a fresh `distill.student_preset` model that speaks the teacher's tokenizer."""
    import torch

    from data.tokenizer import load_tokenizer
    from model import Transformer
    from model.args import load_model_args
    from model.hf import save_hf_pretrained

    tok = load_tokenizer(tok_path)
    try:
        args = load_model_args(cfg.distill.student_preset)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"key 'distill.student_preset': {e}") from None
    if args.vocab < tok.vocab_size:
        args = load_model_args(cfg.distill.student_preset, vocab=tok.vocab_size)
    torch.manual_seed(cfg.seed)
    save_hf_pretrained(Transformer(args), out, special_ids=tok.special_ids())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_path.parent / name).is_file() and not (out / name).exists():
            shutil.copyfile(tok_path.parent / name, out / name)
    return out


def student_accuracy(cfg: RunConfig, model_dir: Path, tok_path: Path, tasks: list[dict]):
    from orchestrator.checkpoints import resolve_model_source
    from orchestrator.evaluate import CheckpointEvaluator

    hf, _ = resolve_model_source(str(model_dir), str(tok_path), "distill.student")
    with CheckpointEvaluator(cfg, hf, tok_path) as ev:
        return ev.evaluate(tasks, samples=cfg.grpo.heldout_samples)


def execute(cfg: RunConfig, out: str | Path | None) -> Path:
    from orchestrator import sample, sft
    from orchestrator.checkpoints import resolve_model_source
    from orchestrator.grpo.inputs import load_tasks
    from orchestrator.ray_local import init_ray

    d = cfg.distill
    if bool(d.student) == bool(d.student_preset):
        raise ConfigError("give the student as 'distill.student' (a run or HF directory) or 'distill.student_preset' "
                          "(a fresh model of a preset), not " + ("both" if d.student else "neither"))
    _, tok_path = resolve_model_source(cfg.sample.teacher, cfg.sample.tokenizer, "sample")
    run_dir = create_run_dir(cfg, out).resolve()
    print(f"distill: run directory {run_dir}", flush=True)
    t0 = time.time()
    student = Path(d.student) if d.student else make_student(cfg, tok_path, run_dir / "student-init")
    resolve_model_source(str(student), str(tok_path), "distill.student")
    _, heldout = load_tasks(_with_tasks(cfg))
    init_ray(cfg.cluster)
    before = student_accuracy(cfg, student, tok_path, heldout)
    print(f"distill: student before: held-out greedy {before.greedy:.3f}", flush=True)
    sample_dir = sample.execute(copy.deepcopy(cfg), run_dir / "sample")
    t_sample = time.time() - t0
    scfg = copy.deepcopy(cfg)
    scfg.sft.init, scfg.sft.tokenizer, scfg.sft.data = str(student), str(tok_path), str(sample_dir / "samples.jsonl")
    sft_dir = sft.execute(scfg, run_dir / "sft")
    after = student_accuracy(cfg, sft_dir, tok_path, heldout)
    sampled = json.loads((sample_dir / "summary.json").read_text())
    summary = {"teacher": cfg.sample.teacher, "student": str(student), "student_preset": d.student_preset,
               "heldout_tasks": len(heldout), "student_greedy_before": before.greedy, "student_greedy_after": after.greedy,
               "student_pass@1_before": before.sampled, "student_pass@1_after": after.sampled,
               "samples_kept": sampled["rows_kept"], "prompts_rejected": sampled["prompts_rejected"],
               "seconds": time.time() - t0, "sample_seconds": t_sample, "hf_export": str(sft_dir / "hf")}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "report.md").write_text(
        f"# Distillation\n\nTeacher `{cfg.sample.teacher}`, student `{student}`"
        + (f" (a fresh `{d.student_preset}`)" if d.student_preset else "") + ".\n\n"
        f"- rejection sampling: {sampled['rows_kept']} completions kept of {sampled['samples']} sampled; "
        f"{sampled['prompts_rejected']} of {sampled['prompts']} prompts had none accepted\n"
        f"- student held-out greedy accuracy on {len(heldout)} tasks: {before.greedy:.3f} before, {after.greedy:.3f} after\n"
        f"- time: {summary['seconds']:.0f} s\n")
    print(f"distill: student held-out greedy {before.greedy:.3f} -> {after.greedy:.3f}; student model in {sft_dir / 'hf'}", flush=True)
    return run_dir


def _with_tasks(cfg: RunConfig) -> RunConfig:
    c = copy.deepcopy(cfg)
    c.grpo.tasks = cfg.sample.tasks
    return c


def run(cfg: RunConfig, cli_args) -> int:
    execute(cfg, cli_args.out)
    return 0
