"""The reward worker in-process: its verdict on a completion is the training reward's, from the
configured rewards when the task kind's accuracy reward is among them, else from an evaluator of
its own (a code task in an arithmetic run's held-out evaluation)."""

import pytest

from orchestrator.grpo.rollout import RewardWorker, RolloutChunk
from rl.rewards import RewardConfig

MATH = ["2+3</think> <answer>5</answer>",
        "</think> <answer>4</answer> no, <answer>5</answer>",  # the reward reads the last answer
        "</think> <answer>5.0</answer>", "</think> <answer>6</answer>", "no answer at all"]
CODE = {"id": "c", "kind": "code", "prompt": "write f(x) returning 2x", "tests": "assert f(2) == 4\nassert f(5) == 10\n",
        "entry_point": "f", "answer": ""}


def chunk(tasks, texts):
    return RolloutChunk(tasks=tasks, groups=list(range(len(tasks))), prompt_ids=[[1]] * len(tasks),
                        completion_ids=[[2, 3]] * len(tasks), completions=texts, truncated=[False] * len(tasks),
                        versions=[0] * len(tasks), seconds=0.0, tokens=2 * len(tasks))


@pytest.fixture(scope="module")
def worker():
    w = RewardWorker(RewardConfig(), max_len=64)  # math_accuracy + format: the arithmetic default
    yield w
    w.close()


def test_math_verdict_is_the_training_reward(worker):
    from rl.rewards.math import math_reward

    task = {"id": "t", "kind": "math", "prompt": "What is 2 + 3?", "answer": "5"}
    got = worker.score(chunk([task] * len(MATH), MATH)).records
    assert [r.correct for r in got] == [math_reward(c, "5", prompt=task["prompt"]) >= 1.0 for c in MATH]
    assert [r.correct for r in got] == [r.rewards["math_accuracy"] >= 1.0 for r in got]


def test_code_verdict_runs_the_tests_in_a_math_run(worker):
    texts = ["</think> <answer>\ndef f(x):\n    return 2 * x\n</answer>", "</think> <answer>\ndef f(x):\n    return 4\n</answer>"]
    got = worker.score(chunk([CODE, CODE], texts)).records
    assert [r.correct for r in got] == [True, False]
    assert all("code_tests" not in r.rewards for r in got)  # the run's own rewards are unchanged


def test_sampler_expert_parallel_is_checked_before_ray(policy_dir):
    from orchestrator.config import ConfigError, load_config
    from orchestrator.grpo.inputs import validate

    root, _ = policy_dir
    for over, message in [(["rollout.num_samplers=3", "rollout.expert_parallel=2"], "must divide rollout.num_samplers"),
                          (["rollout.num_samplers=3", "rollout.expert_parallel=3"], "n_routed_experts 8"),
                          (["rollout.num_samplers=2", "rollout.expert_parallel=2", "rollout.exact=true"], "rollout.exact")]:
        with pytest.raises(ConfigError, match=message):
            validate(load_config(None, [f"grpo.init={root / 'hf'}", f"grpo.tokenizer={root / 'tokenizer.json'}",
                                        "tracking.wandb_mode=disabled", *over]))
