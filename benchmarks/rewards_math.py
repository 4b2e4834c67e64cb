"""Math reward throughput on CPU: serial calls vs the RewardEvaluator's pool, in one run.

Two workloads: plain-number answers (exact rational path, no parser) and LaTeX answers that go
through math-verify in its worker process.
Run: `python benchmarks/rewards_math.py [--n 200]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from rl.evaluator import RewardEvaluator
from rl.rewards import RewardConfig, RewardSpec
from rl.rewards.math import default_verifier, math_reward


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    plain = [{"completion": f"</think> <answer>{i * 7}</answer>", "answer": str(i * 7)} for i in range(a.n)]
    # a symbolic reference goes through math-verify (a numeric one only accepts a final number)
    latex = [{"completion": f"</think> <answer>\\sqrt{{{2 * i * i}}}</answer>", "answer": f"{i}\\sqrt{{2}}"} for i in range(1, a.n + 1)]
    default_verifier().equal("1", "1")  # start the worker process outside the timings
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    ev = RewardEvaluator(RewardConfig(rewards=[RewardSpec("math_accuracy")], max_workers=2))
    ev.score(latex[:2])
    for name, samples in (("plain numbers", plain), ("LaTeX (math-verify)", latex)):
        t = time.perf_counter()
        serial = [math_reward(s["completion"], s["answer"]) for s in samples]
        t_serial = time.perf_counter() - t
        t = time.perf_counter()
        pooled = [r["reward"] for r in ev.score(samples)]
        t_pool = time.perf_counter() - t
        assert serial == pooled == [1.0] * len(samples)
        print(f"{name:22s} serial {len(samples) / t_serial:9.0f}/s   evaluator (2 threads) {len(samples) / t_pool:9.0f}/s   ratio {t_serial / t_pool:.2f}x")
    ev.close()


if __name__ == "__main__":
    main()
