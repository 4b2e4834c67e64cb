"""What a GRPO step reports: the metrics record (metrics.jsonl and W&B), the rollouts table, and
the progress line printed for `ray job logs` and terminals alike.

Test: `pytest tests/orchestrator/test_orch_grpo.py`.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

import numpy as np


def step_metrics(batch, adv: list[float | None], extra: dict, rewards, *, version: int, seconds: float) -> dict[str, Any]:
    """The step's record, in the namespaces users know from TRL and verl: reward/ (total and per
    reward, mean and std; errors and second-opinion disagreements of this step over all workers),
    rollout/ (accuracy, lengths, truncation, reasoning, version lag mean and max, what entered the
    loss), timing/ (seconds of this step's parts). `extra` holds train/, mismatch/ and is/ (the
    sampler/learner gap and its correction, issue 20) and weight_sync/ from the learners."""
    recs = batch.records
    r = np.array([x.reward for x in recs])
    lengths = np.array([x.length for x in recs])
    tokens = sum(c.tokens for c in batch.scored)
    errors: dict[str, int] = {}
    for chunk in batch.scored:
        for name, n in chunk.reward_errors.items():
            errors[name] = errors.get(name, 0) + n
    errors.pop("second_opinion_disagreements", None)  # a verdict (scored 0), not an error: counted from the records
    m: dict[str, Any] = {"reward/mean": float(r.mean()), "reward/std": float(r.std())}
    for spec in rewards.rewards:
        values = np.array([x.rewards.get(spec.name, 0.0) for x in recs])
        m[f"reward/{short_name(spec.name)}/mean"], m[f"reward/{short_name(spec.name)}/std"] = float(values.mean()), float(values.std())
    m.update({
        "reward/errors": sum(errors.values()), **{f"reward/errors/{short_name(k)}": v for k, v in errors.items()},
        "reward/second_opinion_disagreements": sum(x.second_opinion == "disagree" for x in recs),
        "rollout/accuracy": float(np.mean([x.correct for x in recs])),
        "rollout/response_length/mean": float(lengths.mean()), "rollout/response_length/max": int(lengths.max()),
        "rollout/truncated_frac": float(np.mean([x.truncated for x in recs])), "rollout/reasoning_frac": float(np.mean([x.reasons for x in recs])),
        "rollout/samples_in_loss": sum(a is not None for a in adv), "rollout/refill_rounds": batch.refill_rounds,
        "rollout/version_lag": float(np.mean([version - 1 - x.version for x in recs])),
        "rollout/version_lag_max": int(max(version - 1 - x.version for x in recs)), "rollout/tokens_per_s": tokens / max(seconds, 1e-9),
        "timing/generate": float(sum(c.gen_seconds for c in batch.scored)), "timing/score": float(sum(c.seconds for c in batch.scored)),
        "timing/wait_rollouts": batch.wait_s, "timing/step": seconds,
        **extra,
    })
    return m


def short_name(reward: str) -> str:
    """A reward's name in metrics: a file reward `path/to/file.py:function` is `function`."""
    return reward.rpartition(":")[2] if reward.rpartition(":")[0].endswith(".py") else reward


def rollout_table(first_chunk, records, adv, rewards, step: int, n: int = 8) -> tuple[str, list[str], list[list], int]:
    """(name, columns, rows, step) of the rollouts table: the first chunk's completions, to read."""
    cols = ["step", "prompt", "completion", "reference", "reward", *(short_name(s.name) for s in rewards.rewards), "length",
            "advantage", "second_opinion"]
    rows = [[step, first_chunk.tasks[i]["prompt"], first_chunk.completions[i], first_chunk.tasks[i].get("answer"), records[i].reward,
             *(records[i].rewards.get(s.name, 0.0) for s in rewards.rewards), records[i].length, adv[i], records[i].second_opinion]
            for i in range(min(n, len(first_chunk.completions)))]
    return "rollouts", cols, rows, step


class ProgressLine:
    """One line per logged step: step, reward, accuracy, length, tokens/s, elapsed and ETA."""

    def __init__(self, name: str, start: int, total: int):
        self.name, self.start, self.total, self.t0 = name, start, total, time.perf_counter()

    def show(self, step: int, m: dict, out: TextIO) -> None:
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(1, step - self.start) * (self.total - step)
        held = f" held-out {m['eval/accuracy']:.3f}" if "eval/accuracy" in m else ""
        print(f"{self.name}: step {step}/{self.total} reward {m['reward/mean']:.3f} accuracy {m['rollout/accuracy']:.3f}{held} "
              f"length {m['rollout/response_length/mean']:.1f} {m['rollout/tokens_per_s']:.0f} tok/s elapsed {_hms(elapsed)} eta {_hms(eta)}",
              file=out, flush=True)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
