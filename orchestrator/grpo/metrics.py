"""What a GRPO step reports: the metrics record (metrics.jsonl and W&B), the rollouts table, and
the progress line printed for `ray job logs` and terminals alike.

Test: `pytest tests/orchestrator/test_orch_grpo.py`.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

import numpy as np


def step_metrics(batch, adv: list[float | None], extra: dict, rewards, *, version: int, seconds: float) -> dict[str, Any]:
    """The step's record: rewards (total and per reward), accuracy, lengths, how many samples
    entered the loss, version lag, reward errors of this step (all workers), and the time split."""
    recs = batch.records
    r = np.array([x.reward for x in recs])
    lengths = np.array([x.length for x in recs])
    tokens = sum(c.tokens for c in batch.scored)
    errors: dict[str, int] = {}
    for chunk in batch.scored:
        for name, n in chunk.reward_errors.items():
            errors[name] = errors.get(name, 0) + n
    m: dict[str, Any] = {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "accuracy": float(np.mean([x.correct for x in recs]))}
    for spec in rewards.rewards:
        m[f"reward/{spec.name}"] = float(np.mean([x.rewards.get(spec.name, 0.0) for x in recs]))
    m.update({
        "response_length_mean": float(lengths.mean()), "response_length_max": int(lengths.max()),
        "truncated_frac": float(np.mean([x.truncated for x in recs])), "reasoning_frac": float(np.mean([x.reasons for x in recs])),
        "samples_in_loss": sum(a is not None for a in adv), "refill_rounds": batch.refill_rounds,
        "version_lag": float(np.mean([version - 1 - x.version for x in recs])),
        # a second opinion's disagreement is a verdict (the completion scored 0), not an error
        "second_opinion/disagreements": sum(x.second_opinion == "disagree" for x in recs),
        "reward_errors": sum(v for k, v in errors.items() if k != "second_opinion_disagreements"),
        **{f"reward_errors/{k}": v for k, v in errors.items() if k != "second_opinion_disagreements"},
        "time/generate": float(sum(c.gen_seconds for c in batch.scored)), "time/score": float(sum(c.seconds for c in batch.scored)),
        "time/wait_rollouts": batch.wait_s, "time/step": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
        **extra,
    })
    return m


def rollout_table(first_chunk, records, adv, rewards, step: int, n: int = 8) -> tuple[str, list[str], list[list], int]:
    """(name, columns, rows, step) of the rollouts table: the first chunk's completions, to read."""
    cols = ["step", "prompt", "completion", *(s.name for s in rewards.rewards), "advantage", "second_opinion"]
    rows = [[step, first_chunk.tasks[i]["prompt"], first_chunk.completions[i], *(records[i].rewards.get(s.name, 0.0) for s in rewards.rewards),
             adv[i], records[i].second_opinion] for i in range(min(n, len(first_chunk.completions)))]
    return "rollouts", cols, rows, step


class ProgressLine:
    """One line per logged step: step, reward, accuracy, length, tokens/s, elapsed and ETA."""

    def __init__(self, name: str, start: int, total: int):
        self.name, self.start, self.total, self.t0 = name, start, total, time.perf_counter()

    def show(self, step: int, m: dict, out: TextIO) -> None:
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(1, step - self.start) * (self.total - step)
        held = f" held-out {m['heldout/accuracy']:.3f}" if "heldout/accuracy" in m else ""
        print(f"{self.name}: step {step}/{self.total} reward {m['reward_mean']:.3f} accuracy {m['accuracy']:.3f}{held} "
              f"length {m['response_length_mean']:.1f} {m['tokens_per_s']:.0f} tok/s elapsed {_hms(elapsed)} eta {_hms(eta)}",
              file=out, flush=True)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
