"""A scored rollout as a typed record, the verifier's verdict on it, and GRPO advantages over records.

`ScoredRollout` is what a reward worker returns for one completion and what the GRPO driver, the
held-out evaluator and the metrics read: small (no token ids), typed, one per completion.
`accuracy_reward(sample)` names the reward whose full score means "solved" for the task's kind
(`math_accuracy` for math, `code_tests` for code): the reward workers take the verdict from it, so a
held-out accuracy and a training accuracy can never disagree about the same completion.

Test: `pytest tests/rl/test_rollouts.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch

from rl.grpo import group_advantages, zero_variance_groups

# the reward whose full score means "solved", per task kind
ACCURACY_REWARD = {"math": "math_accuracy", "code": "code_tests"}


@dataclasses.dataclass
class ScoredRollout:
    """One completion of one task, scored."""

    id: str  # the task's id
    group: int  # index of its prompt in the step (the GRPO group)
    reward: float  # weighted total of the configured rewards
    rewards: dict[str, float]  # each configured reward's value
    errors: dict[str, str]  # reward name -> error message, for rewards that failed (scored 0)
    correct: bool  # the task's accuracy reward (see `accuracy_reward`) scored it 1
    length: int  # completion tokens
    truncated: bool  # stopped by the token budget, not by a stop token
    version: int  # policy version that sampled it
    reasons: bool  # a non-empty think block before </think>
    second_opinion: str | None = None  # code tasks: "agree" / "disagree" when a full score was re-checked


def accuracy_reward(sample: Mapping) -> str:
    """The name of the reward that decides whether `sample`'s task is solved."""
    kind = sample.get("kind") or "math"
    if kind not in ACCURACY_REWARD:
        raise ValueError(f"task {sample.get('id')!r}: unknown kind {kind!r} (known: {', '.join(ACCURACY_REWARD)})")
    return ACCURACY_REWARD[kind]


def reasons(completion: str) -> bool:
    """Whether the completion reasons: a non-empty think block (the template's prompt opens it)."""
    return len(completion.split("</think>")[0].strip()) > 0


def group_rewards(records: Sequence[ScoredRollout]) -> tuple[list[list[int]], torch.Tensor]:
    """(indices of each group's records, in order of first appearance; rewards [N, G])."""
    groups: dict[int, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(rec.group, []).append(i)
    idx = list(groups.values())
    return idx, torch.tensor([[records[i].reward for i in g] for g in idx], dtype=torch.float64)


def rollout_advantages(records: Sequence[ScoredRollout], *, scale: str, drop_zero_variance: bool,
                       drop_truncated: bool) -> tuple[list[float | None], dict]:
    """Group advantages per record, None where the record leaves the loss: groups with all-equal
    rewards (DAPO dynamic sampling) and truncated completions (overlong filtering), when asked."""
    idx, rewards_NG = group_rewards(records)
    adv_NG = group_advantages(rewards_NG, scale=scale)
    zero_N = zero_variance_groups(rewards_NG)
    out: list[float | None] = [None] * len(records)
    for row, members in enumerate(idx):
        for col, i in enumerate(members):
            dropped = (drop_zero_variance and bool(zero_N[row])) or (drop_truncated and records[i].truncated)
            out[i] = None if dropped else float(adv_NG[row, col])
    return out, {"zero_variance_frac": float(zero_N.float().mean()), "groups": len(idx)}


def varied_groups(records: Sequence[ScoredRollout]) -> set[int]:
    """Groups whose rewards are not all equal (the ones dynamic sampling keeps)."""
    idx, rewards_NG = group_rewards(records)
    zero_N = zero_variance_groups(rewards_NG)
    return {records[members[0]].group for members, z in zip(idx, zero_N.tolist()) if not z}
