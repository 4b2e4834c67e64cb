"""Code sandbox throughput on CPU: HumanEval canonical solutions scored per second by `run_tests`
with 1 worker vs 2 workers (a thread pool, as the RewardEvaluator runs it), in one run.

Each run starts two fresh processes (the program in its namespaces and jail, and the test harness),
so the figure is mostly process start-up; it scales with cores, not threads.
Run: `python benchmarks/rewards_code.py [--n 164] [--workers 2]`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import time

from data.tasks import load_humaneval
from rl.sandbox import run_tests


def score_all(rows: list[dict], workers: int) -> tuple[float, int]:
    """(seconds, number passed) for all rows on `workers` threads."""
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda r: run_tests(r["prompt"] + r["answer"], r["tests"], entry_point=r["entry_point"], timeout_s=30), rows))
    return time.perf_counter() - t, sum(r.passed for r in results)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=164)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    rows = load_humaneval().to_pylist()[: a.n]
    probe = run_tests("x = 1", "assert x == 1")  # isolation probe outside the timings
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; isolation: {probe.isolation}")
    t1, ok1 = score_all(rows, 1)
    tn, okn = score_all(rows, a.workers)
    assert ok1 == okn == len(rows), (ok1, okn)
    print(f"HumanEval canonical ({len(rows)}): 1 worker {len(rows) / t1:6.1f}/s   {a.workers} workers {len(rows) / tn:6.1f}/s   ratio {t1 / tn:.2f}x")


if __name__ == "__main__":
    main()
