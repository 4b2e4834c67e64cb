"""Built-in rewards: `math_accuracy` (reasoning-gym's scorer for its tasks), `code_tests` (the
sandbox: Python tests or stdin/stdout cases), `format` (R1-Zero structure) and
`overlong` (DAPO soft penalty).

Each takes (completion, sample) where sample is the task row plus per-reward options from the
config.

Test: `pytest tests/rl/test_rewards_registry.py`.
"""

from __future__ import annotations

import re
from typing import Mapping

from rl.rewards.code import code_reward
from rl.rewards.math import math_reward
from rl.rewards.reasoning_gym import parse_spec as rg_spec
from rl.rewards.reasoning_gym import reasoning_gym_reward
from rl.rewards.registry import reward

# <think> is usually the end of the prompt, so the completion may start inside the think block.
_FORMAT = re.compile(r"^\s*(<think>)?(?P<think>(?:(?!<think>|</think>|<answer>|</answer>).)*)</think>\s*<answer>(?P<answer>(?:(?!<answer>|</answer>|<think>|</think>).)+)</answer>\s*$", re.S)


@reward("math_accuracy")
def math_accuracy(completion: str, sample: Mapping) -> float:
    """The math verifier (rl/rewards/math.py); reasoning-gym tasks (their `tests` name the entry)
    are judged by reasoning-gym's own scorer instead (rl/rewards/reasoning_gym.py)."""
    spec = rg_spec(str(sample.get("tests") or ""))
    if spec is not None:
        return reasoning_gym_reward(completion, sample, spec)
    return math_reward(completion, str(sample["answer"]), percent=sample.get("percent", "strip"), prompt=sample.get("prompt") or None)


@reward("format")
def format_reward(completion: str, sample: Mapping) -> float:
    """1 when the completion is exactly `[<think>]...</think> <answer>...</answer>` (nothing after).

    The opening <think> may be omitted when the prompt template ends with it (option
    `think_in_prompt`, true by default as in our "r1" template)."""
    m = _FORMAT.match(completion)
    if m is None or (m.group(1) is None and not sample.get("think_in_prompt", True)):
        return 0.0
    return 1.0 if m.group("answer").strip() else 0.0


@reward("overlong")
def overlong(completion: str, sample: Mapping) -> float:
    """DAPO soft overlong penalty: 0 up to max_len - cache_len tokens, then linear down to -1 at max_len.

    Length in tokens from sample["completion_tokens"] when the sampler provides it, else characters / 4.
    """
    max_len = int(sample.get("max_len", 1024))
    cache = int(sample.get("cache_len", max_len // 4))
    n = sample.get("completion_tokens")
    n = int(n) if n is not None else len(completion) // 4
    if n <= max_len - cache:
        return 0.0
    if n >= max_len:
        return -1.0
    return -(n - (max_len - cache)) / cache


@reward("code_tests")
def code_tests(completion: str, sample: Mapping) -> float:
    """1 when the program in the completion passes sample["tests"] in the sandbox (rl/sandbox/).

    Options: `fraction` (score the fraction of checks that held), `timeout_s`, `memory_mb`,
    `isolation` ("full" or "reduced"; the evaluator sets it from `rewards.isolation`)."""
    return code_reward(
        completion, str(sample["tests"]), entry_point=sample.get("entry_point") or None,
        fraction=bool(sample.get("fraction", False)), timeout_s=float(sample.get("timeout_s", 10)),
        memory_mb=int(sample.get("memory_mb", 1024)), isolation=str(sample.get("isolation", "full")),
        prompt=sample.get("prompt") or None)
