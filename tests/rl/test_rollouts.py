"""rl/rollouts.py: the verdict is the training reward's, and advantages over typed records equal
the group formula with the configured groups left out."""

import pytest
import torch

from rl.grpo import group_advantages
from rl.rollouts import ScoredRollout, reasons, rollout_advantages, varied_groups, verify


def rec(group, reward, truncated=False):
    return ScoredRollout(id=str(group), group=group, reward=reward, rewards={}, errors={}, correct=reward >= 1, length=3,
                         truncated=truncated, version=0, reasons=False)


@pytest.mark.parametrize("completion", [
    "2+3</think> <answer>5</answer>",
    "</think> <answer>4</answer> no, <answer>5</answer>",  # the reward reads the last answer; a first-answer rule disagreed
    "</think> <answer>5.0</answer>",
    "</think> <answer>6</answer>",
    "no answer at all",
])
def test_math_verdict_is_the_training_reward(completion):
    from rl.rewards.math import math_reward

    task = {"id": "t", "kind": "math", "answer": "5"}
    assert verify(completion, task) == (math_reward(completion, "5") >= 1.0)


def test_code_verdict_runs_the_tests():
    task = {"id": "c", "kind": "code", "tests": "assert f(2) == 4\nassert f(5) == 10\n", "entry_point": "f"}
    assert verify("</think> <answer>\ndef f(x):\n    return 2 * x\n</answer>", task)
    assert not verify("</think> <answer>\ndef f(x):\n    return 4\n</answer>", task)
    with pytest.raises(ValueError, match="unknown kind"):
        verify("x", {"id": "z", "kind": "poetry"})


def test_reasons_means_a_nonempty_think_block():
    assert reasons("2+3=5</think> <answer>5</answer>") and not reasons("  </think> <answer>5</answer>")


def test_advantages_follow_the_group_formula_and_drop_what_is_asked():
    recs = [rec(0, 1.0), rec(0, 0.0), rec(1, 1.0), rec(1, 1.0), rec(2, 0.0), rec(2, 1.0, truncated=True)]
    want = group_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
    adv, m = rollout_advantages(recs, scale="std", drop_zero_variance=False, drop_truncated=False)
    assert adv == pytest.approx(want.flatten().tolist())
    assert m == {"zero_variance_frac": pytest.approx(1 / 3), "groups": 3}
    adv, _ = rollout_advantages(recs, scale="std", drop_zero_variance=True, drop_truncated=True)
    assert adv[2] is adv[3] is adv[5] is None and adv[0] == pytest.approx(float(want[0, 0])) and adv[4] is not None
    assert varied_groups(recs) == {0, 2}
