"""The held-out evaluator, and `sputnik eval`.

One evaluator serves the demo, GRPO's periodic held-out evaluation and `sputnik eval`: the tasks
go through the rollout samplers and reward workers (orchestrator/grpo/rollout.py), and a
completion is correct when its task kind's accuracy reward (`rl.rollouts.accuracy_reward`: the
same reward training uses, second opinion included) scores it 1. It reports greedy accuracy and,
with n samples per task at the rollout temperature, the unbiased pass@k (Chen et al. 2021), plus
how often the policy reasons and how accurate it is when it does and when it answers directly.

`sputnik eval`: `eval.checkpoint` is a `sputnik pretrain` or `sputnik grpo` run directory (its HF
export and tokenizer), or an HF DeepseekV3 directory with its tokenizer inside (any Hugging Face
tokenizer: prompts use its chat template; `grpo.tokenizer` overrides). `eval.tasks` is
"arithmetic" or "code" (the held-out split of the generator, `grpo.heldout_size` tasks) or a task
table (jsonl/parquet). Writes `results.parquet` (one row per task), `summary.md` and `summary.json`.

Test: `pytest tests/orchestrator/test_orch_eval.py`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from orchestrator.config import ConfigError, RunConfig
from orchestrator.rundir import create_run_dir

# seeds of the held-out samples: the same in every caller, so the same checkpoint scores the same
GREEDY_KEY, SAMPLED_KEY = (0, 10**6), (0, 10**6 + 1)


@dataclasses.dataclass
class HeldoutResult:
    tasks: int
    samples_per_task: int  # sampled completions per task (0: greedy only)
    greedy: float  # accuracy of the greedy completions
    pass_at: dict[int, float]  # unbiased pass@k of the sampled completions
    reasoning_fraction: float  # completions that reason (sampled ones; greedy when none)
    accuracy_when_reasoning: float | None
    accuracy_when_direct: float | None
    length_mean: float
    rows: list[dict]  # one per task: id, prompt, greedy_correct, greedy_completion, n, correct, pass@k
    seconds: float = 0.0  # wall time of the evaluation

    @property
    def sampled(self) -> float | None:
        """pass@1 of the sampled policy (None when there were no samples)."""
        return self.pass_at.get(1)

    def metrics(self, prefix: str = "eval/") -> dict:
        """eval/accuracy (greedy), eval/pass@k (sampled), eval/reasoning_frac, eval/response_length, timing/eval."""
        m = {f"{prefix}accuracy": self.greedy, f"{prefix}reasoning_frac": self.reasoning_fraction, f"{prefix}response_length": self.length_mean,
             f"timing/{prefix.strip('/')}": self.seconds}
        m.update({f"{prefix}pass@{k}": v for k, v in self.pass_at.items()})
        return m


def heldout(rollouts, tasks: list[dict], *, samples: int, temperature: float, ks: list[int] | tuple[int, ...] = (1,),
            weights=None, version: int = 0) -> HeldoutResult:
    """Greedy and (with `samples` > 0) sampled completions of every task, scored by the verifier."""
    from rl.grpo import pass_at_k

    from orchestrator.grpo.rollout import completions_of, records_of

    ray, t0 = rollouts.ray, time.perf_counter()
    kw = dict(weights=weights, version=version)
    g_gen, g_score = rollouts.launch(tasks, seed_key=GREEDY_KEY, group_size=1, temperature=0.0, **kw)
    s_gen, s_score = rollouts.launch(tasks, seed_key=SAMPLED_KEY, group_size=samples, temperature=temperature, **kw) if samples else ([], [])
    greedy, sampled = records_of(ray.get(g_score)), records_of(ray.get(s_score))
    texts = completions_of(ray.get(g_gen))
    rows = []
    for i, task in enumerate(tasks):
        row = {"id": task["id"], "prompt": task["prompt"], "greedy_correct": greedy[i].correct, "greedy_completion": texts[i]}
        if samples:
            c = sum(r.correct for r in sampled[i * samples : (i + 1) * samples])
            row.update({"n": samples, "correct": c, **{f"pass@{k}": pass_at_k(samples, c, k) for k in ks}})
        rows.append(row)
    judged = sampled or greedy
    reasoned = [r for r in judged if r.reasons]
    direct = [r for r in judged if not r.reasons]
    return HeldoutResult(
        tasks=len(tasks), samples_per_task=samples, greedy=float(np.mean([r.correct for r in greedy])) if greedy else 0.0,
        pass_at={k: float(np.mean([row[f"pass@{k}"] for row in rows])) for k in ks} if samples and rows else {},
        reasoning_fraction=len(reasoned) / max(1, len(judged)),
        accuracy_when_reasoning=float(np.mean([r.correct for r in reasoned])) if reasoned else None,
        accuracy_when_direct=float(np.mean([r.correct for r in direct])) if direct else None,
        length_mean=float(np.mean([r.length for r in judged])) if judged else 0.0, rows=rows, seconds=time.perf_counter() - t0)


def write_rows(path: Path, result: HeldoutResult, **extra) -> None:
    """Append the per-task rows (with `extra` columns such as the step) to a JSONL file."""
    with open(path, "a") as f:
        for row in result.rows:
            f.write(json.dumps({**extra, **row}) + "\n")


class CheckpointEvaluator:
    """Samplers and reward workers for one checkpoint, without learners (`sputnik eval`, the demo)."""

    def __init__(self, cfg: RunConfig, hf_dir: Path, tok_path: Path):
        import ray

        from orchestrator.grpo.inputs import reward_config
        from orchestrator.grpo.rollout import Rollouts
        from orchestrator.placement import RolePlacement, cluster_gpus, roles_for

        self.cfg = cfg
        self.placement = RolePlacement(ray, roles_for(cfg, "eval", cluster_gpus(ray)), autoscaling=cfg.cluster.autoscaling,
                                       timeout_s=cfg.cluster.placement_timeout_s)
        try:
            self.rollouts = Rollouts(ray, self.placement, hf_dir=hf_dir, tok_path=tok_path, template=cfg.data.template,
                                     rewards=reward_config(cfg), rollout_cfg=cfg.rollout, num_evaluators=cfg.grpo.num_evaluators, seed=cfg.seed)
        except BaseException:
            self.placement.close()
            raise

    def evaluate(self, tasks: list[dict], *, samples: int, ks=(1,)) -> HeldoutResult:
        return heldout(self.rollouts, tasks, samples=samples, temperature=self.cfg.rollout.temperature, ks=ks)

    def close(self) -> None:
        self.rollouts.close()
        self.placement.close()

    def __enter__(self) -> "CheckpointEvaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run(cfg: RunConfig, cli_args) -> int:
    """`sputnik eval`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.grpo.inputs import load_tasks, resolve_init
    from orchestrator.ray_local import init_ray
    from orchestrator.tracking import Tracker, wandb_group

    e = cfg.eval
    if not e.checkpoint:
        raise ConfigError("key 'eval.checkpoint' is required: a run directory or an HF directory")
    n = e.samples_per_task
    if any(k > max(n, 1) for k in e.k):
        raise ConfigError(f"key 'eval.k' ({e.k}) must not exceed eval.samples_per_task ({n})")
    cfg.grpo.init, cfg.grpo.tasks = e.checkpoint, e.tasks or "arithmetic"
    hf_dir, tok_path = resolve_init(cfg)
    _, tasks = load_tasks(cfg)
    tasks = tasks[: e.limit] if e.limit else tasks
    if not tasks:
        raise ConfigError(f"key 'eval.tasks': no held-out tasks in {cfg.grpo.tasks}")
    run_dir = create_run_dir(cfg, cli_args.out)
    print(f"eval: run directory {run_dir}", flush=True)
    init_ray(cfg.cluster)
    ks = list(e.k) if n else []
    with Tracker(run_dir, cfg.tracking, name=cfg.name, job_type="eval", group=wandb_group(e.checkpoint)) as tracker, \
            CheckpointEvaluator(cfg, hf_dir, tok_path) as ev:
        res = ev.evaluate(tasks, samples=n, ks=ks)
        pq.write_table(pa.Table.from_pylist(res.rows), run_dir / "results.parquet")
        figures = {"greedy_accuracy": res.greedy, **{f"pass@{k}": v for k, v in res.pass_at.items()},
                   "tasks": res.tasks, "samples_per_task": n, "checkpoint": str(hf_dir), "task_source": cfg.grpo.tasks}
        tracker.summary(figures)
        tracker.log(res.metrics(), step=0)
    temp = cfg.rollout.temperature
    lines = [f"# Evaluation of {hf_dir}", "", f"{res.tasks} tasks from {cfg.grpo.tasks}; greedy"
             + (f", and {n} sample(s) per task at temperature {temp}." if n else "."), "", "| metric | value |", "|---|---|",
             f"| greedy accuracy | {res.greedy:.3f} |", *[f"| pass@{k} | {v:.3f} |" for k, v in res.pass_at.items()]]
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"eval: greedy {res.greedy:.3f}" + "".join(f", pass@{k} {v:.3f}" for k, v in res.pass_at.items())
          + f" on {res.tasks} tasks; results in {run_dir / 'results.parquet'}", flush=True)
    return 0
