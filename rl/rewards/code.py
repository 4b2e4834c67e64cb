"""Verifiable code reward: run the completion's program against the task's tests in the sandbox.

The program is taken from the completion only: the last <answer>...</answer> (a ```python fence
inside it is unwrapped), else the last ```python fenced block, else the text after the last
</think> (the whole completion when there is none). The reward is 1.0 when every test passes and
0.0 otherwise, or with `fraction=True` the fraction of executed checks that held (0 on timeout,
crash, a program that does not load, or tests that run no check). The verdict comes from
rl/sandbox.py, never from the program. The RewardEvaluator adds a second opinion on full rewards
(rl/rewards/second_opinion.py).

Test: `pytest tests/rl/test_code_reward.py`.
"""

from __future__ import annotations

import re

from rl.sandbox import run_tests

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_FENCE = re.compile(r"```(?:python3?|py)[ \t]*\n(.*?)```", re.S)


def extract_program(completion: str) -> str:
    """The program in a completion (see the module docstring); may be empty."""
    answers = _ANSWER.findall(completion)
    if answers:
        fenced = _FENCE.findall(answers[-1])
        return fenced[-1] if fenced else answers[-1].strip("\n")
    fenced = _FENCE.findall(completion)
    if fenced:
        return fenced[-1]
    return completion.rsplit("</think>", 1)[-1]


def code_reward(completion: str, tests: str, *, entry_point: str | None = None, fraction: bool = False,
                timeout_s: float = 10, memory_mb: int = 1024, isolation: str = "full") -> float:
    """1.0 when the completion's program passes every test, else 0.0 (or the fraction passed).

    Raises IsolationError where the sandbox cannot isolate fully, unless isolation="reduced"."""
    program = extract_program(completion)
    if not program.strip():
        return 0.0
    result = run_tests(program, tests, timeout_s=timeout_s, memory_mb=memory_mb, entry_point=entry_point, isolation=isolation)
    if result.passed:
        return 1.0
    if fraction and result.status == "failed" and result.tests_total:
        return result.tests_passed / result.tests_total
    return 0.0
