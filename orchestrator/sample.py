"""`sputnik sample`: rejection sampling, as DeepSeek-R1 builds its second SFT set (issue 22).

A teacher (`sample.teacher`: a run or HF directory) generates `sample.samples` completions for each
of `sample.prompts` train-split tasks (`sample.tasks`, the task sets of `grpo.tasks`) on the rollout
samplers; the reward workers score them with the task's verifier (the accuracy reward GRPO trains
on, second opinion included). A completion is accepted when the verifier says correct and it
ended by itself (not cut by rollout.max_new_tokens). Per prompt, `sample.keep` chooses among the
accepted: `all` (up to `sample.max_per_prompt`), `shortest` (one), or `distinct` texts (up to
`sample.max_per_prompt`, shortest first).

Writes, in the run directory: `samples.jsonl`, an SFT table (data/sft.py) with one row per kept
completion (id, task_id, prompt, completion, split, teacher, reward, length in tokens; the split is
"heldout" for `sample.sft_heldout_percent` % of the prompts, by task id, for SFT's held-out loss:
every prompt is a train-split task of `sample.tasks`);
`rejected.jsonl`, every prompt with no accepted completion (id, prompt, samples, best reward);
`summary.json` (prompts, samples, accepted fraction, prompts kept and rejected, seconds).
With `grpo.runtime=one_process` the sampler and the reward worker run in the command's process,
without Ray (orchestrator/one_process.py).

Test: `pytest tests/orchestrator/test_orch_sample.py`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from orchestrator.config import RunConfig
from orchestrator.rundir import create_run_dir


def select_completions(tasks: list[dict], group: int, texts: list[str], records: list, *, keep: str, max_per_prompt: int,
                       teacher: str, heldout_percent: int = 0) -> tuple[list[dict], list[dict]]:
    """(kept rows, rejected prompts). `texts` and `records` (rl.rollouts.ScoredRollout) hold `group`
    consecutive completions per task, in task order. A kept row's split is "heldout" for
    `heldout_percent` % of the tasks (by a hash of the task id: SFT's held-out loss), else "train"."""
    from data.tasks import split_of

    if len(texts) != len(tasks) * group or len(records) != len(texts):
        raise ValueError(f"{len(tasks)} tasks x {group} completions, got {len(texts)} texts and {len(records)} scores")
    kept, rejected = [], []
    for i, task in enumerate(tasks):
        span = range(i * group, (i + 1) * group)
        ok = [j for j in span if records[j].correct and not records[j].truncated]
        if not ok:
            rejected.append({"id": task["id"], "prompt": task["prompt"], "samples": group,
                             "best_reward": max(records[j].reward for j in span)})
            continue
        if keep == "shortest":
            chosen = [min(ok, key=lambda j: (records[j].length, j))]
        elif keep == "distinct":
            seen, chosen = set(), []
            for j in sorted(ok, key=lambda j: (records[j].length, j)):
                if texts[j] not in seen:
                    seen.add(texts[j])
                    chosen.append(j)
            chosen = chosen[:max_per_prompt]
        else:
            chosen = ok[:max_per_prompt]
        for n, j in enumerate(chosen):
            kept.append({"id": f"{task['id']}#{n}", "task_id": task["id"], "prompt": task["prompt"], "completion": texts[j],
                         "split": split_of(task["id"], heldout_percent), "teacher": teacher, "reward": records[j].reward, "length": records[j].length})
    return kept, rejected


def sample_tasks(cfg: RunConfig) -> list[dict]:
    """The first `sample.prompts` train-split tasks of `sample.tasks`."""
    from orchestrator.grpo.inputs import load_tasks

    s = cfg.sample
    g = dataclasses.replace(cfg.grpo, tasks=s.tasks, train_size=s.prompts)
    train, _ = load_tasks(dataclasses.replace(cfg, grpo=g), key="sample.tasks")
    return train[: s.prompts]


def execute(cfg: RunConfig, out: str | Path | None) -> Path:
    """Rejection-sample into `out` (or a new run directory); returns the run directory."""
    from orchestrator.checkpoints import resolve_model_source
    from orchestrator.evaluate import CheckpointEvaluator, check_prompt_lengths
    from orchestrator.grpo.rollout import completions_of, records_of
    from orchestrator.ray_local import init_ray
    from orchestrator.tracking import Tracker

    s = cfg.sample
    if cfg.grpo.runtime == "one_process":  # the sampler and the reward worker in this process, no Ray
        from orchestrator.one_process import check_one_process

        check_one_process(cfg)
    hf, tok_path = resolve_model_source(s.teacher, s.tokenizer, "sample")
    tasks = sample_tasks(cfg)
    check_prompt_lengths(cfg, tasks, hf, tok_path)
    temperature = cfg.rollout.temperature if s.temperature is None else s.temperature
    run_dir = create_run_dir(cfg, out).resolve()
    print(f"sample: run directory {run_dir}; {len(tasks)} prompts x {s.samples} completions from {hf} at temperature {temperature}",
          flush=True)
    if cfg.grpo.runtime == "ray":
        init_ray(cfg.cluster)
    t0 = time.perf_counter()
    kept, rejected, n_samples, n_accepted = [], [], 0, 0
    with Tracker(run_dir, cfg.tracking, name=cfg.name, job_type="sample") as tracker, CheckpointEvaluator(cfg, hf, tok_path, "sample") as ev:
        for r, lo in enumerate(range(0, len(tasks), s.batch_prompts)):
            batch = tasks[lo : lo + s.batch_prompts]
            gen, score = ev.rollouts.launch(batch, seed_key=(2, r), group_size=s.samples, temperature=temperature, first_group=lo)
            gen, score = ev.rollouts.results(gen, score)
            texts, records = completions_of(ev.rollouts.ray.get(gen)), records_of(score)  # Ray's get, or the one-process runtime's
            k, rej = select_completions(batch, s.samples, texts, records, keep=s.keep, max_per_prompt=s.max_per_prompt, teacher=str(hf),
                                        heldout_percent=s.sft_heldout_percent)
            kept += k
            rejected += rej
            n_samples += len(records)
            n_accepted += sum(x.correct and not x.truncated for x in records)
            dt = time.perf_counter() - t0
            done = lo + len(batch)
            tracker.log({"sample/accepted_frac": n_accepted / n_samples, "sample/prompts_kept_frac": 1 - len(rejected) / done,
                         "sample/samples_per_s": n_samples / dt}, step=r + 1)
            print(f"sample: {done}/{len(tasks)} prompts, {n_accepted}/{n_samples} completions accepted, {len(rejected)} prompts "
                  f"without one, {n_samples / dt:.1f} samples/s, eta {dt / done * (len(tasks) - done):.0f}s", flush=True)
        seconds = time.perf_counter() - t0
        figures = {"prompts": len(tasks), "samples": n_samples, "accepted_frac": n_accepted / max(n_samples, 1),
                   "rows_kept": len(kept), "prompts_kept": len(tasks) - len(rejected), "prompts_rejected": len(rejected),
                   "seconds": seconds, "teacher": str(hf), "tokenizer": str(tok_path), "keep": s.keep,
                   "table": str(run_dir / "samples.jsonl")}
        write_jsonl(run_dir / "samples.jsonl", kept)
        write_jsonl(run_dir / "rejected.jsonl", rejected)
        tracker.summary(figures)
    print(f"sample: kept {len(kept)} completions of {figures['prompts_kept']} prompts in {run_dir / 'samples.jsonl'}; "
          f"{len(rejected)} prompts had none accepted (listed in {run_dir / 'rejected.jsonl'}); {seconds:.1f} s", flush=True)
    return run_dir


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(cfg: RunConfig, cli_args) -> int:
    execute(cfg, cli_args.out)
    return 0
