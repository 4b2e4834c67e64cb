"""RewardEvaluator: scores a batch of completions concurrently (a plain class; orchestrator/
wraps it as a Ray actor).

`score(samples)` takes dicts with at least `completion` plus the task row (`answer`, `tests`,
...), checks the reward files for changes once (live reload), and scores the samples on a bounded
thread pool. Each result holds the weighted total, the value of each reward, errors, the time
taken and the second opinion's verdict; a reward that fails or times out scores 0 and never raises.

Time limits: a reward file's call is killed after `timeout_s` (rl/rewards/worker.py); the math
verifier and the code sandbox bound their own time. A sample that is still running after
`timeout_s` x (rewards + 2) per wave of `max_workers` scores 0 as "timed out" (a backstop).

Refusing to start: when `code_tests` is configured and the node cannot isolate the sandbox fully,
the constructor raises IsolationError in one line naming what the node lacks, unless the config
opts into `isolation: reduced` (issue #17).

Second opinion: a completion that scores full `code_tests` on a task with a reference solution is
re-run against a second suite (rl/rewards/second_opinion.py); on a disagreement its code reward
is 0 and its result says `second_opinion: "disagree"` with the reason.

Test: `pytest tests/rl/test_rewards_registry.py tests/rl/test_second_opinion.py tests/rl/test_code_reward.py`.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import Counter
from typing import Any

from rl import sandbox
from rl.rewards import RewardConfig
from rl.rewards.registry import RewardSet
from rl.rewards.second_opinion import SecondOpinion

CODE_REWARD = "code_tests"  # the built-in that runs the sandbox


class RewardEvaluator:
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        code = [s for s in cfg.rewards if s.name == CODE_REWARD]
        if code and cfg.isolation == "full":
            full, what = sandbox.isolation()
            if not full:
                raise sandbox.IsolationError(
                    f"the reward evaluator will not run `{CODE_REWARD}`: this node lacks {what}; run the evaluators as root "
                    f"(cluster.yaml's cpu_c7i nodes do) or set rewards.isolation=reduced to accept reduced isolation")
        specs = [(s.name, s.weight, {"isolation": cfg.isolation, **s.options} if s.name == CODE_REWARD else dict(s.options))
                 for s in cfg.rewards]
        self.rewards = RewardSet(specs, timeout_s=cfg.timeout_s, processes=cfg.max_workers)
        self.second = None
        if code and cfg.second_opinion:
            options = code[0].options
            self.second = SecondOpinion(timeout_s=float(options.get("timeout_s", 10)), memory_mb=int(options.get("memory_mb", 1024)),
                                        isolation=cfg.isolation)
        self.pool = cf.ThreadPoolExecutor(cfg.max_workers, thread_name_prefix="reward")
        self._lock = threading.Lock()
        self._late = 0  # samples that missed the backstop deadline
        self._extra: Counter = Counter()  # second-opinion disagreements and errors, lifetime
        self._reported: Counter = Counter()

    @property
    def timeouts(self) -> int:
        """Reward calls killed at their time limit, plus samples that missed the backstop."""
        return self.rewards.timeouts + self._late

    def _one(self, sample: dict) -> dict:
        t = time.perf_counter()
        completion = str(sample["completion"])
        total, parts, errors = self.rewards.score(completion, sample)
        opinion, detail = None, ""
        if self.second is not None and parts.get(CODE_REWARD, 0.0) >= 1.0 and sample.get("tests"):
            try:
                o = self.second.check(completion, sample)
                opinion, detail = (o.verdict, o.detail) if o.verdict != "none" else (None, "")
            except Exception as e:  # our failure, not the program's: the first verdict stands, counted
                errors["second_opinion"] = f"could not run: {type(e).__name__}: {e}"
                with self._lock:
                    self._extra["second_opinion"] += 1
            if opinion == "disagree":
                parts[CODE_REWARD] = 0.0
                total = sum(weight * parts[name] for name, weight, _ in self.rewards.specs)
                with self._lock:
                    self._extra["second_opinion_disagreements"] += 1
        return {"reward": total, "rewards": parts, "errors": errors, "seconds": time.perf_counter() - t,
                "second_opinion": opinion, "second_opinion_detail": detail}

    def score(self, samples: list[dict[str, Any]]) -> list[dict]:
        """Per sample: reward (weighted total), rewards (per name), errors (per name: message),
        seconds, second_opinion (None | "agree" | "disagree") and second_opinion_detail."""
        self.rewards.refresh()  # edited reward files take effect from this call on
        futures = [self.pool.submit(self._one, s) for s in samples]
        waves = -(-len(samples) // self.cfg.max_workers)
        deadline = time.monotonic() + self.cfg.timeout_s * (len(self.cfg.rewards) + 2) * max(1, waves)
        out = []
        for f in futures:
            try:
                out.append(f.result(timeout=max(0.0, deadline - time.monotonic()) + 0.05))
            except cf.TimeoutError:
                with self._lock:
                    self._late += 1
                out.append({"reward": 0.0, "rewards": {s.name: 0.0 for s in self.cfg.rewards}, "errors": {"*": "timed out"},
                            "seconds": self.cfg.timeout_s, "second_opinion": None, "second_opinion_detail": ""})
        return out

    def error_counts(self) -> dict[str, int]:
        """Errors per reward name over this evaluator's lifetime ("*": samples past the backstop,
        "second_opinion": second opinions that could not run; "second_opinion_disagreements")."""
        counts = Counter(self.rewards.errors)
        with self._lock:
            counts.update(self._extra)
            if self._late:
                counts["*"] += self._late
        return dict(counts)

    def error_counts_since_last_call(self) -> dict[str, int]:
        """Like error_counts, but only what happened since the previous call of this method (the
        per-step figures to log); names with nothing new are left out."""
        now = Counter(self.error_counts())
        with self._lock:
            new = {k: v - self._reported[k] for k, v in now.items() if v > self._reported[k]}
            self._reported = now
        return new

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.rewards.close()
