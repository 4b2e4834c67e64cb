"""rl/rollouts.py: which reward decides a task kind, and advantages over typed records equal the
group formula with the configured groups left out. (That the verdict is the training reward's is
tested through the reward workers, tests/orchestrator/test_orch_rollout.py.)"""

import pytest
import torch

from rl.grpo import group_advantages
from rl.rollouts import ScoredRollout, accuracy_reward, reasons, rollout_advantages, varied_groups


def rec(group, reward, truncated=False):
    return ScoredRollout(id=str(group), group=group, reward=reward, rewards={}, errors={}, correct=reward >= 1, length=3,
                         truncated=truncated, version=0, reasons=False)


def test_accuracy_reward_by_task_kind():
    assert accuracy_reward({"kind": "math"}) == "math_accuracy" and accuracy_reward({}) == "math_accuracy"
    assert accuracy_reward({"kind": "code"}) == "code_tests"
    with pytest.raises(ValueError, match="unknown kind"):
        accuracy_reward({"id": "z", "kind": "poetry"})


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
