"""`sputnik demo`: the whole pipeline on this machine.

1. Build (or reuse) the tokenizer and the synthetic corpus (arithmetic and programming tasks, a
   share with worked reasoning), and pretrain the tiny MoE with 2 DeepSpeed workers on Ray Train
   (`<run>/pretrain/`).
2. Measure the pretrained model on held-out tasks with the held-out evaluator (orchestrator/
   evaluate.py, the one GRPO and `sputnik eval` use): pass@1 of the sampled policy
   (`grpo.heldout_samples` samples per task; the headline figure, as GRPO optimises the sampled
   policy), greedy accuracy, and how often and how well it reasons or answers directly.
3. GRPO on the arithmetic train split (`<run>/grpo/`), then the same measurements.
4. With `demo.code_steps` > 0, a second GRPO stage on synthetic programming tasks scored by
   running their tests in the sandbox (`<run>/grpo-code/`), then the same measurements.
5. With `demo.distill_steps` > 0, distillation into a smaller student beside the same student
   trained by GRPO directly for as long (orchestrator/demo_distill.py).
6. `report.md` with plots (orchestrator/report.py) and `summary.json`.

Test: `pytest tests/orchestrator/test_orch_demo.py`.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from orchestrator.config import RunConfig
from orchestrator.rundir import create_run_dir


def heldout_tasks(cfg: RunConfig) -> dict[str, list[dict]]:
    """The held-out task sets: arithmetic (the GRPO stage's held-out split) and, with the code stage, programs."""
    from data.tasks import generate_arithmetic, generate_code_tasks

    d = cfg.data
    tasks = {"arithmetic": generate_arithmetic(cfg.grpo.heldout_size, seed=cfg.seed + 1, families=tuple(d.task_families or d.families), digits=d.digits,
                                               heldout_percent=d.heldout_percent, split="heldout").to_pylist()}
    if cfg.demo.code_steps > 0:
        tasks["code"] = generate_code_tasks(cfg.demo.code_heldout_size, seed=cfg.seed + 1, digits=d.digits,
                                            heldout_percent=d.heldout_percent, split="heldout").to_pylist()
    return tasks


def measure(cfg: RunConfig, run_dir: Path, tasks: dict[str, list[dict]], stage: str) -> dict:
    """Held-out results of the model of a finished run (its HF export and tokenizer), per task set."""
    from orchestrator.evaluate import CheckpointEvaluator, write_rows
    from orchestrator.grpo.inputs import resolve_init

    ecfg = copy.deepcopy(cfg)
    ecfg.grpo.init, ecfg.grpo.tokenizer = str(run_dir), None
    hf_dir, tok_path = resolve_init(ecfg)
    out = {}
    with CheckpointEvaluator(ecfg, hf_dir, tok_path) as ev:
        for name, rows in tasks.items():
            out[name] = ev.evaluate(rows, samples=cfg.grpo.heldout_samples)
            write_rows(run_dir / "heldout-demo.jsonl", out[name], stage=stage, tasks=name)
            _say(stage, name, out[name])
    return out


def grpo_stage(cfg: RunConfig, init: Path, out: Path, **overrides) -> tuple[Path, dict]:
    """A GRPO run from `init`; its held-out results before and after (the same evaluator as `measure`)."""
    from orchestrator import grpo

    gcfg = copy.deepcopy(cfg)
    gcfg.grpo.init = str(init)
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(getattr(gcfg, section), field, value)
    return grpo.execute(gcfg, out)


def run(cfg: RunConfig, cli_args) -> int:
    """The stages. A GRPO stage measures its own task set before and after (the held-out split of
    its tasks is the demo's); the demo measures only the other task set at each point."""
    from orchestrator import pretrain
    from rl.rewards import RewardSpec

    t0 = time.time()
    code_stage = cfg.demo.code_steps > 0
    n = 3 + code_stage + (cfg.demo.distill_steps > 0)
    top = create_run_dir(cfg, cli_args.out).resolve()
    print(f"demo: run directory {top}", flush=True)
    print(f"demo: 1/{n} corpus and pretraining (tiny MoE, 2 DeepSpeed workers on Ray Train)", flush=True)
    pre_dir = pretrain.execute(cfg, top / "pretrain")
    times = {"pretrain": time.time() - t0, "grpo_arithmetic": 0.0, "grpo_code": 0.0}
    tasks = heldout_tasks(cfg)
    code_tasks = {k: v for k, v in tasks.items() if k == "code"}
    points: dict[str, dict] = {"pretrained": measure(cfg, pre_dir, code_tasks, "pretrained") if code_tasks else {}}

    print(f"demo: 2/{n} GRPO on arithmetic (rollout samplers, reward evaluators, DeepSpeed policy learner on Ray), "
          "held-out accuracy before and after", flush=True)
    t1 = time.time()
    grpo_dir, res = grpo_stage(cfg, pre_dir, top / "grpo")
    times["grpo_arithmetic"] = time.time() - t1
    points["pretrained"]["arithmetic"] = res["before"]
    points["after arithmetic GRPO"] = {"arithmetic": res["after"]}
    _say("pretrained", "arithmetic", res["before"])
    _say("after arithmetic GRPO", "arithmetic", res["after"])
    final, final_dir, code_dir = "after arithmetic GRPO", grpo_dir, None
    if code_stage:
        print(f"demo: 3/{n} GRPO on programming tasks scored in the sandbox, held-out accuracy before and after", flush=True)
        t1 = time.time()
        code_dir, res = grpo_stage(cfg, grpo_dir, top / "grpo-code", grpo__tasks="code", grpo__steps=cfg.demo.code_steps,
                                   grpo__heldout_size=cfg.demo.code_heldout_size, grpo__eval_every=max(1, cfg.demo.code_steps),
                                   rewards__rewards=[RewardSpec("code_tests", 1.0), RewardSpec("format", 0.1)])
        times["grpo_code"] = time.time() - t1
        final, final_dir = "after code GRPO", code_dir
        points["after arithmetic GRPO"]["code"] = res["before"]
        points[final] = {"code": res["after"]}
        _say("after arithmetic GRPO", "code", res["before"])
        _say(final, "code", res["after"])
        print(f"demo: {n}/{n} held-out arithmetic after GRPO on programming tasks", flush=True)
        points[final].update(measure(cfg, code_dir, {"arithmetic": tasks["arithmetic"]}, final))
    students = None
    if cfg.demo.distill_steps > 0:
        from orchestrator.demo_distill import distill_stage

        print(f"demo: {n}/{n} distillation: a {cfg.demo.student_preset} student pretrained as the teacher was, fine-tuned on the "
              f"GRPO policy's verified samples" + (", and trained by GRPO directly for as long" if cfg.demo.distill_compare else ""), flush=True)
        students, s_times, s_fig = distill_stage(cfg, top, grpo_dir, {"arithmetic": tasks["arithmetic"]}, measure, grpo_stage)
        times.update(s_times)
        students = {"points": students, "figures": s_fig}
    points = {stage: {k: p[k] for k in tasks} for stage, p in points.items()}  # the same task order at every stage
    # every held-out evaluation of the run: the GRPO stages' own (before, periodic, after) from their
    # metrics, and the demo's measurements of the other task set
    own = {(stage, name) for stage, name in (("pretrained", "code"), ("after code GRPO", "arithmetic")) if code_stage}
    times["evaluation"] = (sum(grpo_eval_seconds(d) for d in (grpo_dir, code_dir) if d)
                           + sum(points[stage][name].seconds for stage, name in own if name in points.get(stage, {})))
    if students is not None:  # the students' measurements, and the directly trained student's own evaluations
        times["evaluation"] += sum(r["arithmetic"].seconds for stage, r in students["points"].items() if stage != "student after GRPO")
        g = students["figures"].get("student_grpo_dir")
        times["evaluation"] += grpo_eval_seconds(Path(g)) if g else 0.0
    times["total"] = time.time() - t0
    summary = summarize(cfg, points, final, tasks, times, pre_dir=pre_dir, grpo_dir=grpo_dir, code_dir=code_dir, final_dir=final_dir)
    if students is not None:
        sp = students["points"]
        summary["distillation"] = {**students["figures"], "teacher_greedy": points[final]["arithmetic"].greedy,
                                   "teacher_pass@1": points[final]["arithmetic"].sampled,
                                   "heldout_greedy": {k: v["arithmetic"].greedy for k, v in sp.items()},
                                   "heldout_pass@1": {k: v["arithmetic"].sampled for k, v in sp.items()}}
    (top / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from orchestrator.report import demo_plots, write_demo_report

    plots = demo_plots(top, pre_dir, [grpo_dir] + ([code_dir] if code_dir else []), summary)
    write_demo_report(top, summary, points, final, plots)
    print(f"demo: report in {top / 'report.md'} ({summary['time_seconds']['total']:.0f} s in all)", flush=True)
    return 0


def grpo_eval_seconds(run_dir: Path) -> float:
    """Seconds a GRPO run spent on held-out evaluation (`timing/eval` in its metrics.jsonl)."""
    rows = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    return sum(r.get("timing/eval", 0.0) for r in rows)


def summarize(cfg: RunConfig, points: dict, final: str, tasks: dict, times: dict, *, pre_dir, grpo_dir, code_dir, final_dir) -> dict:
    """summary.json: the headline is pass@1 of the sampled policy (what GRPO optimises), greedy beside it."""
    pre, after = points["pretrained"], points[final]

    def per_task(p: dict, attr: str) -> dict:
        return {k: getattr(v, attr) for k, v in p.items()}

    pre_summary = json.loads((pre_dir / "summary.json").read_text())
    return {
        "heldout_accuracy_before": per_task(pre, "sampled"), "heldout_accuracy_after": per_task(after, "sampled"),
        "heldout_accuracy_by_stage": {stage: per_task(p, "sampled") for stage, p in points.items()},
        "heldout_greedy_accuracy_before": per_task(pre, "greedy"), "heldout_greedy_accuracy_after": per_task(after, "greedy"),
        "heldout_greedy_accuracy_by_stage": {stage: per_task(p, "greedy") for stage, p in points.items()},
        "heldout_samples_per_task": cfg.grpo.heldout_samples,
        "heldout_reasoning_fraction_before": per_task(pre, "reasoning_fraction"),
        "heldout_reasoning_fraction_after": per_task(after, "reasoning_fraction"),
        "heldout_accuracy_when_reasoning_before": per_task(pre, "accuracy_when_reasoning"),
        "heldout_accuracy_when_direct_before": per_task(pre, "accuracy_when_direct"),
        "heldout_tasks": {k: len(t) for k, t in tasks.items()},
        "final_policy": str(final_dir / "hf"),
        "pretrain_steps": cfg.pretrain.steps, "pretrain_final_loss": pre_summary.get("final_loss"),
        "grpo_steps": {"arithmetic": cfg.grpo.steps, **({"code": cfg.demo.code_steps} if code_dir else {})},
        "time_seconds": {k: round(v, 1) for k, v in times.items()},
        "heldout_accuracy_change_by_stage": stage_changes(points),
        "pretrain_dir": str(pre_dir), "grpo_dir": str(grpo_dir), "grpo_code_dir": str(code_dir) if code_dir else None,
    }


def stage_changes(points: dict) -> dict:
    """Per stage after the first, the change in held-out pass@1 and greedy accuracy per task against the stage before."""
    stages = list(points)
    return {cur: {k: {"pass@1": (points[cur][k].sampled or 0.0) - (points[prev][k].sampled or 0.0),
                      "greedy": points[cur][k].greedy - points[prev][k].greedy} for k in points[cur]}
            for prev, cur in zip(stages, stages[1:])}


def _say(stage: str, task: str, r) -> None:
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    print(f"demo: {stage}, {task}: pass@1 {fmt(r.sampled)} sampled ({r.samples_per_task} per task), greedy {r.greedy:.3f} on {r.tasks} "
          f"held-out tasks; sampled completions reason {r.reasoning_fraction:.0%} of the time (accuracy {fmt(r.accuracy_when_reasoning)} "
          f"when reasoning, {fmt(r.accuracy_when_direct)} when answering directly)", flush=True)
