"""`sputnik eval`: per-task Parquet results, unbiased pass@k, and greedy pass@1 equal to an
independent in-process evaluation of the same checkpoint."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]


def sputnik(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_eval_refuses_k_above_n(tmp_path, policy_dir):
    root, _ = policy_dir
    r = sputnik("eval", f"eval.checkpoint={root / 'hf'}", "eval.samples_per_task=2", "eval.k=[1,4]", "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "eval.k" in r.stderr


@pytest.mark.ray
def test_eval_writes_pass_at_k(tmp_path, policy_dir):
    root, _ = policy_dir
    common = [f"eval.checkpoint={root / 'hf'}", f"grpo.tokenizer={root / 'tokenizer.json'}", "grpo.heldout_size=6",
              "rollout.max_new_tokens=16", "tracking.wandb_mode=disabled", "cluster.num_cpus=2"]
    r = sputnik("eval", *common, "eval.samples_per_task=4", "eval.k=[1,2,4]", "--out", str(tmp_path / "e"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = pq.read_table(tmp_path / "e" / "results.parquet").to_pylist()
    assert len(rows) == 6 and all(row["n"] == 4 and 0 <= row["correct"] <= 4 for row in rows)
    for row in rows:  # the unbiased estimator, from the counts
        for k in (1, 2, 4):
            want = 1.0 if 4 - row["correct"] < k else 1 - math.comb(4 - row["correct"], k) / math.comb(4, k)
            assert abs(row[f"pass@{k}"] - want) < 1e-12
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert abs(summary["pass@1"] - sum(r["correct"] for r in rows) / 24) < 1e-12
    assert "pass@4" in (tmp_path / "e" / "summary.md").read_text()


@pytest.mark.ray
def test_greedy_eval_matches_in_process_generation(tmp_path, policy_dir):
    from data.tasks import generate_arithmetic
    from data.tokenizer import load_tokenizer
    from model.hf import from_hf_pretrained
    from orchestrator.demo import heldout_accuracy

    root, _ = policy_dir
    r = sputnik("eval", f"eval.checkpoint={root / 'hf'}", f"grpo.tokenizer={root / 'tokenizer.json'}", "grpo.heldout_size=6",
                "rollout.max_new_tokens=16", "tracking.wandb_mode=disabled", "cluster.num_cpus=2", "--out", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = pq.read_table(tmp_path / "g" / "results.parquet").to_pylist()
    tasks = generate_arithmetic(6, seed=1, split="heldout")
    tok = load_tokenizer(root / "tokenizer.json")
    ref = heldout_accuracy(from_hf_pretrained(root / "hf").eval(), tok, tasks, template="r1", max_new_tokens=16)
    assert [row["prompt"] for row in rows] == tasks.column("prompt").to_pylist()
    assert [row["completion"] for row in rows][: len(ref["samples"])] == [s["completion"] for s in ref["samples"]]
