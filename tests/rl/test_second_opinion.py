"""The second opinion on full-reward code completions (issue #17): HumanEval/32, /38 and /50 pass
their own tests with a constant or an identity encoder, and a lookup table of the tests' cases
passes any task; the RewardEvaluator catches each, scores it 0 and counts it per call. Honest
programs that differ from the reference, and the canonical solutions, still score 1.
"""

import pytest

from data.tasks import generate_code_tasks, load_humaneval
from rl.evaluator import RewardEvaluator
from rl.rewards import RewardConfig, RewardSpec
from rl.rewards.second_opinion import differential_inputs, literal_calls, second_suite
from rl.sandbox import isolation, run_tests

CHEATS = {  # pass the task's own tests today
    "HumanEval/32": "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 0.0\n",
    "HumanEval/38": "def encode_cyclic(s):\n    return s\n\ndef decode_cyclic(s):\n    return s\n",
    "HumanEval/50": "def encode_shift(s):\n    return s\n\ndef decode_shift(s):\n    return s\n",
    "HumanEval/13": "def greatest_common_divisor(a, b):\n    return {(3, 7): 1, (10, 15): 5, (49, 14): 7, (144, 60): 12}[(a, b)]\n",
    "HumanEval/23": "def strlen(string):\n    if string not in ('', 'x', 'asdasnakj'):\n        while True:\n            pass\n    return len(string)\n",
}

HONEST = {  # correct, and written differently from the canonical solutions
    "HumanEval/0": "def has_close_elements(numbers, threshold):\n    s = sorted(numbers)\n    return any(b - a < threshold for a, b in zip(s, s[1:]))\n",
    "HumanEval/2": "def truncate_number(number):\n    return number % 1.0\n",
    "HumanEval/13": "import math\n\ndef greatest_common_divisor(a, b):\n    return math.gcd(a, b)\n",
    "HumanEval/23": "def strlen(string):\n    return sum(1 for _ in string)\n",
    "HumanEval/38": ("def encode_cyclic(s):\n    groups = [s[(3 * i):min((3 * i + 3), len(s))] for i in range((len(s) + 2) // 3)]\n"
                     "    return ''.join((g[1:] + g[0]) if len(g) == 3 else g for g in groups)\n\n"
                     "def decode_cyclic(s):\n    return encode_cyclic(encode_cyclic(s))\n"),
    "HumanEval/50": ("def encode_shift(s):\n    return ''.join(chr(((ord(ch) + 5 - ord('a')) % 26) + ord('a')) for ch in s)\n\n"
                     "def decode_shift(s):\n    return ''.join(chr((ord(c) - 97 + 21) % 26 + 97) for c in s)\n"),
    "HumanEval/32": ("def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n"
                     "def find_zero(xs):\n    lo, hi = -1.0, 1.0\n    while poly(xs, lo) * poly(xs, hi) > 0:\n        lo, hi = lo * 2, hi * 2\n"
                     "    for _ in range(200):\n        mid = (lo + hi) / 2\n        if poly(xs, lo) * poly(xs, mid) <= 0:\n            hi = mid\n"
                     "        else:\n            lo = mid\n    return lo\n"),
    "HumanEval/55": "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
}


@pytest.fixture(scope="module")
def tasks():
    if not isolation()[0]:
        pytest.skip(f"needs the sandbox's full isolation; here it lacks {isolation()[1]}")
    return {t["id"]: t for t in load_humaneval().to_pylist()}


@pytest.fixture(scope="module")
def evaluator():
    ev = RewardEvaluator(RewardConfig(rewards=[RewardSpec("code_tests", options={"timeout_s": 3})], max_workers=2, timeout_s=60))
    yield ev
    ev.close()


def completion(program):
    return f"</think> <answer>\n```python\n{program}```</answer>"


def test_weak_tests_are_fooled_but_the_second_opinion_is_not(tasks, evaluator):
    for task_id, program in CHEATS.items():
        task = tasks[task_id]
        first = run_tests(program, task["tests"], entry_point=task["entry_point"], timeout_s=10)
        assert first.passed, (task_id, first)  # the task's own tests cannot tell
    evaluator.error_counts_since_last_call()
    out = evaluator.score([{**tasks[k], "completion": completion(p)} for k, p in CHEATS.items()])
    assert [o["reward"] for o in out] == [0.0] * len(CHEATS), out
    assert [o["second_opinion"] for o in out] == ["disagree"] * len(CHEATS)
    assert "timeout" in out[-1]["second_opinion_detail"]  # hanging on unseen inputs is no way out
    assert evaluator.error_counts_since_last_call() == {"second_opinion_disagreements": len(CHEATS)}


def test_honest_programs_that_differ_from_the_reference_agree(tasks, evaluator):
    out = evaluator.score([{**tasks[k], "completion": completion(p)} for k, p in HONEST.items()])
    assert [(k, o["reward"], o["second_opinion"]) for k, o in zip(HONEST, out)] == [(k, 1.0, "agree") for k in HONEST], out
    assert evaluator.error_counts_since_last_call() == {}


def test_synthetic_code_tasks(evaluator):
    rows = generate_code_tasks(4, seed=5).to_pylist()
    honest = [completion(f"def {r['entry_point']}(x):\n    return x + {int(r['prompt'].split(' plus ')[1]) + int(r['prompt'].split(' plus ')[2].rstrip('.'))}\n")
              for r in rows]
    out = evaluator.score([{**r, "completion": c} for r, c in zip(rows, honest)])
    assert [(o["reward"], o["second_opinion"]) for o in out] == [(1.0, "agree")] * 4, out


def test_no_reference_no_second_opinion(tasks, evaluator):
    task = {**tasks["HumanEval/38"], "answer": ""}
    out = evaluator.score([{**task, "completion": completion(CHEATS["HumanEval/38"])}])
    assert out[0]["reward"] == 1.0 and out[0]["second_opinion"] is None


def test_suite_is_deterministic_and_uses_the_tests_inputs(tasks):
    task = tasks["HumanEval/13"]
    calls = literal_calls(task["tests"], task["entry_point"])
    assert (3, 7) in calls and len(calls) == 4
    inputs = differential_inputs(calls, seed=1, n=8)
    assert inputs and all(len(a) == 2 and all(isinstance(x, int) and x > 0 for x in a) and a not in calls for a in inputs)
    assert second_suite(task) == second_suite(task)
    suite = second_suite(tasks["HumanEval/32"])
    assert suite.index("def poly(") < suite.index("def check(")  # the tests' poly is the reference's


@pytest.mark.slow
def test_humaneval_all_164_canonical_agree(tasks):
    ev = RewardEvaluator(RewardConfig(rewards=[RewardSpec("code_tests", options={"timeout_s": 20})], max_workers=2, timeout_s=120))
    try:
        rows = list(tasks.values())
        out = ev.score([{**t, "completion": completion(t["prompt"] + t["answer"])} for t in rows])
    finally:
        ev.close()
    bad = [(t["id"], o["reward"], o["second_opinion"], o["second_opinion_detail"], o["errors"]) for t, o in zip(rows, out)
           if o["reward"] != 1.0 or o["second_opinion"] == "disagree"]
    assert not bad, bad
    with_opinion = sum(o["second_opinion"] == "agree" for o in out)
    assert with_opinion >= 160, with_opinion  # every task with a usable reference got a second opinion


def test_the_same_program_is_judged_once_per_suite(tasks):
    """Completions whose programs are identical (only the think text differs) reuse the verdict;
    a different program, or the same program on another task, is run."""
    from rl.rewards.second_opinion import SecondOpinion

    so = SecondOpinion(timeout_s=3)
    cheat, honest = CHEATS["HumanEval/38"], HONEST["HumanEval/38"]
    first = so.check("I think</think> <answer>\n" + cheat + "</answer>", tasks["HumanEval/38"])
    again = so.check("other words</think> <answer>\n" + cheat + "</answer>", tasks["HumanEval/38"])
    assert (first.verdict, first.cached) == ("disagree", False) and (again.verdict, again.cached) == ("disagree", True)
    good = so.check(completion(honest), tasks["HumanEval/38"])
    assert (good.verdict, good.cached) == ("agree", False)
    assert so.check(completion(honest), tasks["HumanEval/38"]).cached
    other_task = so.check(completion(HONEST["HumanEval/50"]), tasks["HumanEval/50"])
    assert (other_task.verdict, other_task.cached) == ("agree", False)
