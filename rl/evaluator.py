"""RewardEvaluator: scores a batch of completions concurrently (a plain class; orchestrator/
wraps it as a Ray actor).

`score(samples)` takes dicts with at least `completion` plus the task row (`answer`, `tests`,
...), checks the reward files for changes once (live reload), and scores the samples on a bounded
thread pool with a per-sample time limit. Each result holds the weighted total, the value of each
reward, errors and the time taken; a reward that fails or times out scores 0 and never raises.

Test: `pytest tests/rl/test_evaluator.py`.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Any

from rl.rewards import RewardConfig
from rl.rewards.registry import RewardSet


class RewardEvaluator:
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.rewards = RewardSet([(s.name, s.weight, dict(s.options)) for s in cfg.rewards])
        self.pool = cf.ThreadPoolExecutor(cfg.max_workers, thread_name_prefix="reward")
        self.timeouts = 0

    def _one(self, sample: dict) -> dict:
        t = time.perf_counter()
        total, parts, errors = self.rewards.score(str(sample["completion"]), sample)
        return {"reward": total, "rewards": parts, "errors": errors, "seconds": time.perf_counter() - t}

    def score(self, samples: list[dict[str, Any]]) -> list[dict]:
        self.rewards.refresh()  # edited reward files take effect from this call on
        futures = [self.pool.submit(self._one, s) for s in samples]
        # each sample may use timeout_s; the pool runs max_workers of them at a time
        waves = -(-len(samples) // self.cfg.max_workers)
        deadline = time.monotonic() + self.cfg.timeout_s * max(1, waves)
        out = []
        for f in futures:
            try:
                out.append(f.result(timeout=max(0.0, deadline - time.monotonic()) + 0.05))
            except cf.TimeoutError:
                self.timeouts += 1
                out.append({"reward": 0.0, "rewards": {s.name: 0.0 for s in self.cfg.rewards}, "errors": {"*": "timed out"}, "seconds": self.cfg.timeout_s})
        return out

    def error_counts(self) -> dict[str, int]:
        return dict(self.rewards.errors)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
