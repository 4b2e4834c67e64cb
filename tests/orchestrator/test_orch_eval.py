"""The held-out evaluator and `sputnik eval`: per-task Parquet results, unbiased pass@k, greedy
completions equal to in-process generation and verdicts equal to the training reward's, and the
same per-task results from `sputnik eval`, `sputnik grpo`'s evaluation before its first update and
the demo's measurement of the same checkpoint on the same tasks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
N_TASKS, SAMPLES = 6, 2


def sputnik(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def common(root):
    return [f"grpo.tokenizer={root / 'tokenizer.json'}", f"grpo.heldout_size={N_TASKS}", "rollout.max_new_tokens=16",
            "tracking.wandb_mode=disabled", "cluster.num_cpus=2"]


def test_eval_refuses_k_above_n(tmp_path, policy_dir):
    root, _ = policy_dir
    r = sputnik("eval", f"eval.checkpoint={root / 'hf'}", "eval.samples_per_task=2", "eval.k=[1,4]", "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "eval.k" in r.stderr


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, policy_dir):
    root, _ = policy_dir
    out = tmp_path_factory.mktemp("eval") / "e"
    r = sputnik("eval", f"eval.checkpoint={root / 'hf'}", *common(root), f"eval.samples_per_task={SAMPLES}", "eval.k=[1,2]", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.ray
def test_eval_writes_pass_at_k(eval_run):
    rows = pq.read_table(eval_run / "results.parquet").to_pylist()
    assert len(rows) == N_TASKS and all(row["n"] == SAMPLES and 0 <= row["correct"] <= SAMPLES for row in rows)
    for row in rows:  # the unbiased estimator, from the counts
        for k in (1, 2):
            want = 1.0 if SAMPLES - row["correct"] < k else 1 - math.comb(SAMPLES - row["correct"], k) / math.comb(SAMPLES, k)
            assert abs(row[f"pass@{k}"] - want) < 1e-12
    summary = json.loads((eval_run / "summary.json").read_text())
    assert abs(summary["pass@1"] - sum(r["correct"] for r in rows) / (N_TASKS * SAMPLES)) < 1e-12
    assert abs(summary["greedy_accuracy"] - sum(r["greedy_correct"] for r in rows) / N_TASKS) < 1e-12
    assert "pass@2" in (eval_run / "summary.md").read_text()


@pytest.mark.ray
def test_greedy_eval_matches_in_process_generation_and_the_reward(eval_run, policy_dir):
    from data.tasks import generate_arithmetic
    from data.templates import render_prompt
    from data.tokenizer import load_tokenizer
    from model.generate import generate
    from model.hf import from_hf_pretrained
    from rl.rewards.math import math_reward

    root, _ = policy_dir
    rows = pq.read_table(eval_run / "results.parquet").to_pylist()
    tasks = generate_arithmetic(N_TASKS, seed=1, split="heldout").to_pylist()
    tok = load_tokenizer(root / "tokenizer.json")
    prompts = [[tok.bos_id] + tok.encode(render_prompt(t["prompt"], "r1")) for t in tasks]
    outs = generate(from_hf_pretrained(root / "hf").eval(), prompts, max_new_tokens=16, temperature=0.0, top_p=1.0,
                    stop_token_ids=[tok.answer_end_id, tok.eos_id], seed=0, pad_id=tok.pad_id)
    texts = [tok.decode(o) for o in outs]
    assert [row["prompt"] for row in rows] == [t["prompt"] for t in tasks]
    assert [row["greedy_completion"] for row in rows] == texts
    assert [row["greedy_correct"] for row in rows] == [math_reward(x, t["answer"]) >= 1.0 for x, t in zip(texts, tasks)]


@pytest.mark.ray
def test_eval_grpo_and_demo_agree_on_the_same_checkpoint(eval_run, policy_dir, tmp_path):
    """One evaluator: the same checkpoint and tasks give the same per-task completions, verdicts and
    sample counts through `sputnik eval`, GRPO's evaluation before its first update, and the demo."""
    import ray

    from orchestrator.config import load_config
    from orchestrator.demo import measure
    from orchestrator.ray_local import init_ray

    root, _ = policy_dir
    r = sputnik("grpo", f"grpo.init={root / 'hf'}", *common(root), f"grpo.heldout_samples={SAMPLES}", "grpo.steps=1",
                "grpo.prompts_per_step=2", "grpo.group_size=2", "--out", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr[-3000:]
    keys = ("id", "greedy_completion", "greedy_correct", "correct")
    want = [{k: row[k] for k in keys} for row in pq.read_table(eval_run / "results.parquet").to_pylist()]
    grpo_rows = [json.loads(line) for line in (tmp_path / "g" / "heldout.jsonl").read_text().splitlines()]
    assert [{k: row[k] for k in keys} for row in grpo_rows if row["step"] == 0] == want
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["heldout_accuracy_before"] == json.loads((eval_run / "summary.json").read_text())["greedy_accuracy"]
    assert (tmp_path / "g" / "report.md").is_file() and (tmp_path / "g" / "plots" / "reward.png").is_file()

    run = tmp_path / "pretrain-like"  # a run directory as the demo sees one: summary.json names the model
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"hf_export": str(root / "hf"), "tokenizer": str(root / "tokenizer.json")}))
    cfg = load_config(None, common(root)[1:] + [f"grpo.heldout_samples={SAMPLES}"])
    from data.tasks import generate_arithmetic

    init_ray(cfg.cluster)
    try:
        res = measure(cfg, run, {"arithmetic": generate_arithmetic(N_TASKS, seed=1, split="heldout").to_pylist()}, "pretrained")
    finally:
        ray.shutdown()
    assert [{k: row[k] for k in keys} for row in res["arithmetic"].rows] == want
