"""Pretraining throughput on CPU: 1 vs 2 DeepSpeed ZeRO-2 workers on Ray Train, same global batch.

Runs `sputnik pretrain` twice (real Ray, real DeepSpeed, gloo) and reports the median tokens/s
over the steps after warm-up, read from each run's metrics.jsonl.
Run: `python benchmarks/pretrain_workers.py [--steps 40]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, workers: int, steps: int, global_batch: int) -> float:
    args = [sys.executable, "-m", "orchestrator.cli", "pretrain", "--out", str(out), f"pretrain.workers={workers}",
            f"pretrain.micro_batch_size={global_batch // workers}", f"pretrain.steps={steps}", "pretrain.zero_stage=2",
            f"pretrain.checkpoint_every={steps}", "tracking.wandb_mode=disabled", "data.math_docs=20000"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["perf/tokens_per_s"] for r in rows[steps // 4 :])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--global-batch", type=int, default=32)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        one = run(Path(d) / "w1", 1, a.steps, a.global_batch)
        two = run(Path(d) / "w2", 2, a.steps, a.global_batch)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; tiny preset, ZeRO-2, global batch {a.global_batch} x 128 tokens, {a.steps} steps")
    print(f"1 worker : {one:8.0f} tokens/s")
    print(f"2 workers: {two:8.0f} tokens/s")
    print(f"ratio 2/1: {two / one:.2f}x")


if __name__ == "__main__":
    main()
