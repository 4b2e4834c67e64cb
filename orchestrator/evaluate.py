"""`sputnik eval`: score a checkpoint on a task table with the GRPO samplers and reward workers.

`eval.checkpoint` is a `sputnik pretrain` or `sputnik grpo` run directory (its HF export and
tokenizer), or an HF DeepseekV3 directory (then set `grpo.tokenizer`). `eval.tasks` is
"arithmetic" (the held-out split of the generator, `grpo.heldout_size` tasks) or a task table
(jsonl/parquet, GSM8K or MATH style). With `eval.samples_per_task` n > 1 the samples are drawn at
`rollout.temperature` and pass@k is the unbiased estimator; with n = 1 decoding is greedy.
Writes `results.parquet` (one row per task: n, correct, pass@k, first completion),
`summary.md` and `summary.json` in the run directory.

Test: `pytest tests/orchestrator/test_orch_eval.py`.
"""

from __future__ import annotations


import numpy as np

from orchestrator.config import ConfigError, RunConfig
from orchestrator.rundir import create_run_dir


def run(cfg: RunConfig, cli_args) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.grpo import Driver, resolve_init
    from orchestrator.ray_local import init_ray
    from orchestrator.tracking import Tracker
    from rl.grpo import pass_at_k

    e = cfg.eval
    if not e.checkpoint:
        raise ConfigError("key 'eval.checkpoint' is required: a run directory or an HF directory")
    if any(k > e.samples_per_task for k in e.k):
        raise ConfigError(f"key 'eval.k' ({e.k}) must not exceed eval.samples_per_task ({e.samples_per_task})")
    cfg.grpo.init = e.checkpoint
    cfg.grpo.tasks = e.tasks or "arithmetic"
    resolve_init(cfg)
    run_dir = create_run_dir(cfg, cli_args.out)
    print(f"eval: run directory {run_dir}", flush=True)
    init_ray(cfg.cluster)
    with Tracker(run_dir, cfg.tracking, name=cfg.name, job_type="eval") as tracker, Driver(cfg, run_dir, tracker, learners=False) as driver:
        tasks = driver.heldout_rows[: e.limit] if e.limit else driver.heldout_rows
        if not tasks:
            raise ConfigError(f"key 'eval.tasks': no held-out tasks in {cfg.grpo.tasks}")
        n = e.samples_per_task
        temperature = 0.0 if n == 1 else cfg.rollout.temperature
        gen, score = driver.launch(tasks, step=0, round_=0, group_size=n, temperature=temperature)
        results = driver.ray.get(score)
        texts = [t for chunk in driver.ray.get(gen) for t in chunk["completion"]]
        records = [rec for res in results for rec in res["records"]]
        acc_name = driver.acc_name
        rows = []
        for i, task in enumerate(tasks):
            recs = records[i * n : (i + 1) * n]
            correct = sum(1 for r in recs if (r["rewards"].get(acc_name, 0.0) if acc_name else r["reward"]) >= 1.0)
            row = {"id": task["id"], "prompt": task["prompt"], "n": n, "correct": correct, "completion": texts[i * n]}
            for k in e.k:
                row[f"pass@{k}"] = pass_at_k(n, correct, k)
            rows.append(row)
        pq.write_table(pa.Table.from_pylist(rows), run_dir / "results.parquet")
        figures = {f"pass@{k}": float(np.mean([r[f"pass@{k}"] for r in rows])) for k in e.k}
        figures.update({"tasks": len(rows), "samples_per_task": n, "checkpoint": str(driver.hf_dir), "task_source": cfg.grpo.tasks})
        tracker.summary(figures)
        tracker.log({k: v for k, v in figures.items() if k.startswith("pass@")}, step=0)
    lines = [f"# Evaluation of {driver.hf_dir}", "", f"{len(rows)} tasks from {cfg.grpo.tasks}, {n} sample(s) per task"
             f" ({'greedy' if n == 1 else f'temperature {temperature}'}).", "", "| metric | value |", "|---|---|"]
    lines += [f"| pass@{k} | {figures[f'pass@{k}']:.3f} |" for k in e.k]
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("eval: " + ", ".join(f"pass@{k} {figures[f'pass@{k}']:.3f}" for k in e.k) + f" on {len(rows)} tasks; results in {run_dir / 'results.parquet'}", flush=True)
    return 0
