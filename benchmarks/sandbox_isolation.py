"""The price of issue #17's sandbox changes: HumanEval canonical solutions scored per second by the
code sandbox, before and after the per-run bound on the process tree and with the second opinion,
all measured in one run on `--workers` threads (as the RewardEvaluator runs them).

Variants (ratios are against the first, measured in the same run):
  jail, no tree bound     what run_tests did before issue #17 (namespaces, chroot, uid, rlimits)
  jail + cgroup           the default where a memory cgroup is writable (per-run memory + pids cgroup)
  jail + seccomp no-fork  the default elsewhere (fork refused, so rlimits bound the tree)
  + second opinion        the default scorer: each full-reward completion runs a second suite (its
                          per-task reference check is cached, as over a GRPO group; also timed alone)

Needs root (the jail). Run: `python benchmarks/sandbox_isolation.py [--n 164] [--workers 2]`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import time

from data.tasks import load_humaneval
from rl.rewards.second_opinion import SecondOpinion
from rl.sandbox import isolation
from rl.sandbox.cgroups import _Cgroups
from rl.sandbox.host import _MODES, _run

TIMEOUT_S, MEMORY_MB = 30, 1024


def timed(rows: list[dict], workers: int, score) -> tuple[float, int]:
    """(seconds, number passed) for all rows on `workers` threads."""
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:
        ok = sum(pool.map(score, rows))
    return time.perf_counter() - t, ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=164)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    full, what = isolation()
    assert full, f"this benchmark needs the sandbox's full isolation; this node lacks {what}"
    rows = load_humaneval().to_pylist()[: a.n]
    jail, cgroups = _MODES[0], _Cgroups.find()

    def first(bound):
        return lambda r: _run(r["prompt"] + r["answer"], r["tests"], jail, TIMEOUT_S, MEMORY_MB, r["entry_point"], bound).passed

    opinion = SecondOpinion(timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    default = cgroups if cgroups is not None else "seccomp"

    def with_second_opinion(r):
        program = f"```python\n{r['prompt'] + r['answer']}```"
        return first(default)(r) and opinion.check(program, r).verdict != "disagree"

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; {len(rows)} HumanEval "
          f"canonical solutions, {a.workers} workers; cgroups: {cgroups.version + ' at ' + cgroups.memory_dir if cgroups else 'none'}")
    timed(rows[:4], a.workers, first(None))  # warm the page cache and the bytecode
    t_suites, _ = timed(rows, a.workers, lambda r: opinion._suite(r) is not None)  # once per task
    variants = [("jail, no tree bound (before)", first(None))]
    if cgroups is not None:
        variants.append(("jail + cgroup", first(cgroups)))
    variants += [("jail + seccomp no-fork", first("seccomp")), (f"default ({'cgroup' if cgroups else 'seccomp'}) + second opinion", with_second_opinion)]
    base = None
    print("| variant | programs/s | ratio |\n|---|---|---|")
    for name, score in variants:
        seconds, ok = timed(rows, a.workers, score)
        assert ok == len(rows), (name, ok)
        rate = len(rows) / seconds
        base = base or rate
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x |")
    print(f"second-opinion suite check, once per task (cached over a GRPO group): {len(rows) / t_suites:.2f} tasks/s")


if __name__ == "__main__":
    main()
