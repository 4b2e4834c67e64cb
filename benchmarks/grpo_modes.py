"""GRPO step time and tokens/s, synchronous vs one-step-off-policy asynchronous, same config, one
run; and the weight sync through the object store vs a broadcast from learner rank 0 (synchronous).

Both modes run the real loop (Ray actors: rollout samplers, reward workers, a DeepSpeed learner)
from the same initial policy for the same number of steps. The step-time breakdown is the mean
over steps after the first (which includes actor warm-up).
Run: `python benchmarks/grpo_modes.py --init RUN_DIR [--steps 8]` (a `sputnik pretrain` run
directory), or without --init on a random tiny policy (mechanics only: lengths are random).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np


def random_policy(root: Path) -> list[str]:
    import torch

    from data.config import DataConfig
    from data.prepare import math_documents
    from data.tokenizer import train_tokenizer
    from model import Transformer
    from model.args import load_model_args
    from model.hf import save_hf_pretrained

    train_tokenizer(math_documents(DataConfig(math_docs=500)), 512, root / "tokenizer.json")
    torch.manual_seed(0)
    save_hf_pretrained(Transformer(load_model_args("tiny")), root / "hf")
    return [f"grpo.init={root / 'hf'}", f"grpo.tokenizer={root / 'tokenizer.json'}"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--samplers", type=int, default=1)
    a = ap.parse_args()
    from orchestrator.config import load_config
    from orchestrator.grpo import Driver
    from orchestrator.ray_local import init_ray
    from orchestrator.tracking import Tracker

    tmp = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    init = [f"grpo.init={a.init}"] if a.init else random_policy(tmp)
    common = [*init, f"grpo.steps={a.steps}", "grpo.prompts_per_step=16", "grpo.group_size=8", "grpo.eval_every=1000",
              "grpo.checkpoint_every=1000", "rollout.max_new_tokens=64", f"rollout.num_samplers={a.samplers}",
              "tracking.wandb_mode=disabled", "cluster.num_cpus=2"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {a.steps} steps of 16 prompts x 8 completions")
    rows = {}
    runs = {"sync": ["grpo.mode=sync", "grpo.weight_sync=object_store"], "async": ["grpo.mode=async", "grpo.weight_sync=object_store"],
            "sync+bcast": ["grpo.mode=sync", "grpo.weight_sync=collective"]}
    for mode, extra in runs.items():
        cfg = load_config(None, [*common, *extra])
        init_ray(cfg.cluster)
        run_dir = tmp / mode
        with Tracker(run_dir, cfg.tracking, name=mode) as tracker, Driver(cfg, run_dir, tracker) as driver:
            driver.heldout_rows = []  # no evaluation inside the timings
            driver.run()
        import ray

        recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
        rows[mode] = {k: float(np.mean([r[k] for r in recs])) for k in
                      ("timing/step", "timing/generate", "timing/score", "timing/wait_rollouts", "timing/learn", "timing/sync", "rollout/tokens_per_s", "rollout/version_lag")}
        ray.shutdown()
    keys = list(rows["sync"])
    print(f"{'':22s}" + "".join(f"{k:>12s}" for k in runs))
    for k in keys:
        print(f"{k:22s}" + "".join(f"{rows[m][k]:12.3f}" for m in runs))
    print(f"async / sync tokens/s: {rows['async']['rollout/tokens_per_s'] / rows['sync']['rollout/tokens_per_s']:.2f}x; "
          f"step time ratio sync/async {rows['sync']['timing/step'] / rows['async']['timing/step']:.2f}x; "
          f"weight sync time object store / broadcast {rows['sync']['timing/sync'] / rows['sync+bcast']['timing/sync']:.2f}x")


if __name__ == "__main__":
    main()
