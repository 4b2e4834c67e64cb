"""The demo's distillation stage (`demo.distill_steps` > 0; issue 22), after GRPO:

1. The student (`demo.student_preset`, `micro` by default: dense, a third of tiny's parameters)
   pretrained exactly as the teacher was (the same corpus, `pretrain:` section), `<run>/student-pretrain/`.
2. Distillation: the GRPO policy rejection-samples `demo.distill_prompts` train-split tasks
   (`<run>/distill-sample/`), and the pretrained student is fine-tuned on what the verifier
   accepted (`<run>/distill/`, `demo.distill_steps` steps at `demo.distill_lr`).
3. DeepSeek-R1's comparison at our scale (`demo.distill_compare`): the same pretrained student
   trained by GRPO directly on the same tasks for the wall-clock time step 2 took
   (`grpo.max_seconds`; `<run>/student-grpo/`).
Each student is measured on the demo's held-out tasks by the demo's evaluator.

Test: `pytest tests/orchestrator/test_orch_demo.py`.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from orchestrator.config import RunConfig


def distill_stage(cfg: RunConfig, top: Path, teacher: Path, tasks: dict[str, list[dict]], measure, grpo_stage) -> tuple[dict, dict, dict]:
    """(held-out results per point, seconds per part, figures). `measure(cfg, run_dir, tasks, stage)`
    and `grpo_stage(cfg, init, out, **overrides)` are the demo's."""
    from model.args import load_model_args
    from orchestrator import pretrain, sample, sft

    d = cfg.demo
    scfg = copy.deepcopy(cfg)
    scfg.model, scfg.name = load_model_args(d.student_preset), f"{cfg.name}-student"
    points, times = {}, {}
    t0 = time.time()
    student = pretrain.execute(scfg, top / "student-pretrain")
    times["student_pretrain"] = time.time() - t0
    points["student pretrained"] = measure(scfg, student, tasks, "student pretrained")

    t0 = time.time()
    c = copy.deepcopy(scfg)
    c.sample.teacher, c.sample.tokenizer, c.sample.tasks = str(teacher), None, "arithmetic"
    c.sample.prompts, c.sample.samples, c.sample.max_per_prompt, c.sample.keep = d.distill_prompts, d.distill_samples, d.distill_samples, "distinct"
    sample_dir = sample.execute(c, top / "distill-sample")
    c.sft.init, c.sft.tokenizer, c.sft.data = str(student), None, str(sample_dir / "samples.jsonl")
    c.sft.steps, c.sft.lr, c.sft.warmup_steps = d.distill_steps, d.distill_lr, min(10, d.distill_steps // 10)
    c.sft.micro_batch_size, c.sft.zero_stage, c.sft.checkpoint_every = 16, 1, d.distill_steps
    c.sft.eval_every = max(1, d.distill_steps // 4)
    distilled = sft.execute(c, top / "distill")
    times["distill"] = time.time() - t0
    points["distilled student"] = measure(scfg, distilled, tasks, "distilled student")
    sampled = json.loads((sample_dir / "summary.json").read_text())
    figures = {"student_preset": d.student_preset, "student_parameters": _parameters(scfg.model),
               "teacher_parameters": _parameters(cfg.model), "samples_kept": sampled["rows_kept"],
               "samples_accepted_frac": sampled["accepted_frac"], "distill_steps": d.distill_steps,
               "distill_seconds": times["distill"], "student_pretrain_dir": str(student), "distill_dir": str(distilled)}
    if d.distill_compare:
        t0 = time.time()
        g_dir, res = grpo_stage(scfg, student, top / "student-grpo", grpo__steps=1000, grpo__eval_every=1000,
                                grpo__checkpoint_every=1000, grpo__max_seconds=times["distill"])
        times["student_grpo"] = time.time() - t0
        points["student after GRPO"] = {"arithmetic": res["after"]}
        steps = [json.loads(line)["step"] for line in (g_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        figures.update({"student_grpo_steps": max(steps), "student_grpo_dir": str(g_dir)})
    return points, times, figures


def _parameters(args) -> int:
    from model import Transformer

    import torch

    with torch.device("meta"):
        return Transformer(args).num_parameters(activated=True)
