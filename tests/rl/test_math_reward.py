"""Math reward: extraction from the completion only, exact numbers, stricter than math-verify on its
known false positives, safe on huge inputs, usable from threads."""

import concurrent.futures as cf
import time

import pytest

from rl.rewards.math import MathVerifier, extract_answer, math_reward


def ans(s):
    return f"<think>work</think> <answer>{s}</answer>"


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(timeout_s=5)
    yield v
    v.close()


def test_extraction_rules():
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"
    assert extract_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_answer("no tags 42") is None
    assert math_reward("The answer is 42", "42") == 0.0  # no final-answer marker
    # the answer must come from the completion: a prompt's boxed value does not count
    assert math_reward("", "42") == 0.0


KNOWN_FALSE_POSITIVES = [
    ("\\frac{1}{2^{98}}", "1/2^99"),
    ("1+1/e", "1-1/e"),
    ("\\frac{1}{2006!}", "\\frac{1}{2004!}"),
    ("x+y=2", "x+y=1"),
]


@pytest.mark.parametrize("gold, pred", KNOWN_FALSE_POSITIVES)
def test_stricter_than_math_verify(gold, pred, verifier):
    assert math_reward(ans(pred), gold, verifier=verifier) == 0.0


@pytest.mark.parametrize(
    "gold, pred",
    [("\\frac{1}{2}", "0.5"), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"), ("579", "579"), ("1000", "1,000"),
     ("4x+6y=12", "2x+3y=6"), ("(x+1)^2", "x^2+2x+1"), ("-7/8", "-0.875")],
)
def test_equivalent_answers_score_one(gold, pred, verifier):
    assert math_reward(ans(pred), gold, verifier=verifier) == 1.0


def test_wrong_answers_score_zero(verifier):
    assert math_reward(ans("578"), "579", verifier=verifier) == 0.0
    assert math_reward(ans("3.14159"), "\\pi", verifier=verifier) == 0.0


def test_percentages_configurable(verifier):
    assert math_reward(ans("50\\%"), "50", verifier=verifier) == 1.0  # default: strip the sign
    assert math_reward(ans("50%"), "0.5", verifier=verifier) == 0.0
    assert math_reward(ans("50%"), "0.5", percent="fraction", verifier=verifier) == 1.0
    assert math_reward(ans("50%"), "50", percent="either", verifier=verifier) == 1.0


def test_huge_inputs_score_zero_within_the_limit():
    v = MathVerifier(timeout_s=2)
    try:
        # a reference that is not a plain number, so every answer goes to the worker process
        for pred in ["2^{2^{2^{2^{2^{2^{2}}}}}}", "(" * 3000 + "\\sqrt{2}" + ")" * 3000, "9" * 5000]:
            t = time.time()
            assert math_reward(ans(pred), "\\sqrt{2}", verifier=v) == 0.0
            assert time.time() - t < 2 + 3  # the limit, plus a worker restart
        assert math_reward(ans("\\sqrt{8}"), "2\\sqrt{2}", verifier=v) == 1.0  # still healthy afterwards
    finally:
        v.close()


def test_safe_from_threads(verifier):
    with cf.ThreadPoolExecutor(4) as pool:
        # i*sqrt(2) against sqrt(2 i^2): not plain numbers, so every call goes through the worker process
        got = list(pool.map(lambda i: math_reward(ans(f"\\sqrt{{{2 * i * i}}}"), f"{i}\\sqrt{{2}}", verifier=verifier), range(1, 9)))
    assert got == [1.0] * 8
