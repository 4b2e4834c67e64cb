"""Reward registry and evaluator: built-ins, live reload of a researcher's file, failures score 0."""

import time

import pytest

from rl.evaluator import RewardEvaluator
from rl.rewards import RewardConfig, RewardSpec
from rl.rewards.builtin import format_reward, overlong
from rl.rewards.registry import RewardSet, registered


def test_builtins_registered():
    assert {"math_accuracy", "format", "overlong"} <= set(registered())
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardSet([("nope", 1.0, {})])


@pytest.mark.parametrize(
    "completion, expected",
    [
        (" 1+2=3</think> <answer>3</answer>", 1.0),
        ("<think> 1+2=3</think> <answer>3</answer>", 1.0),
        ("</think> <answer>3</answer>", 1.0),
        (" 1+2=3</think> <answer>3</answer> trailing", 0.0),
        (" no close <answer>3</answer>", 0.0),
        (" x</think> <answer></answer>", 0.0),
        (" x</think> <answer>1</answer><answer>2</answer>", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion, {}) == expected


def test_format_reward_requires_open_tag_when_prompt_does_not_supply_it():
    assert format_reward(" x</think> <answer>1</answer>", {"think_in_prompt": False}) == 0.0
    assert format_reward("<think> x</think> <answer>1</answer>", {"think_in_prompt": False}) == 1.0


def test_overlong_penalty_formula():
    s = {"max_len": 100, "cache_len": 20}
    assert overlong("", {**s, "completion_tokens": 80}) == 0.0
    assert overlong("", {**s, "completion_tokens": 90}) == pytest.approx(-0.5)
    assert overlong("", {**s, "completion_tokens": 100}) == -1.0
    assert overlong("x" * 360, s) == pytest.approx(-0.5)  # character fallback: 90 "tokens"


def write(path, body):
    path.write_text(body)
    # make the change visible even within the same second
    t = time.time() + 1
    import os

    os.utime(path, (t, t))


def test_live_reload_and_failures_score_zero(tmp_path):
    f = tmp_path / "my_reward.py"
    write(f, "def score(completion, sample):\n    return 1.0 if 'yes' in completion else 0.0\n")
    cfg = RewardConfig(rewards=[RewardSpec(f"{f}:score", 2.0), RewardSpec("format", 1.0)])
    ev = RewardEvaluator(cfg)
    samples = [{"completion": "yes</think> <answer>1</answer>", "answer": "1"}, {"completion": "no", "answer": "1"}]
    out = ev.score(samples)
    assert [o["reward"] for o in out] == [3.0, 0.0]
    assert out[0]["rewards"] == {f"{f}:score": 1.0, "format": 1.0}
    # edit the file during the run: the next call uses the new function
    write(f, "def score(completion, sample):\n    return 0.25\n")
    assert [o["rewards"][f"{f}:score"] for o in ev.score(samples)] == [0.25, 0.25]
    # a function that raises, returns a non-number, or a file that does not import: 0, counted
    write(f, "def score(completion, sample):\n    raise RuntimeError('boom')\n")
    out = ev.score(samples)
    assert out[0]["rewards"][f"{f}:score"] == 0.0 and "boom" in out[0]["errors"][f"{f}:score"]
    write(f, "def score(completion, sample):\n    return 'high'\n")
    assert ev.score(samples)[0]["rewards"][f"{f}:score"] == 0.0
    write(f, "def score(completion, sample)\n    return 1\n")  # syntax error
    out = ev.score(samples)
    assert out[0]["rewards"][f"{f}:score"] == 0.0 and "SyntaxError" in out[0]["errors"][f"{f}:score"]
    assert ev.error_counts()[f"{f}:score"] >= 5
    write(f, "def score(completion, sample):\n    return float('nan')\n")
    assert ev.score(samples)[0]["rewards"][f"{f}:score"] == 0.0
    ev.close()


def test_evaluator_scores_math_concurrently_with_timings():
    ev = RewardEvaluator(RewardConfig(max_workers=2))
    samples = [{"completion": f" {a}+{a}</think> <answer>{2 * a}</answer>", "answer": str(2 * a)} for a in range(8)]
    samples.append({"completion": " x</think> <answer>5</answer>", "answer": "4"})
    out = ev.score(samples)
    assert [o["reward"] for o in out] == [1.1] * 8 + [0.1]
    assert all(o["seconds"] >= 0 for o in out)
    ev.close()


def test_slow_reward_times_out(tmp_path):
    # the call is killed with its worker process (a hung reward is in tests/rl/test_reward_gaming.py)
    f = tmp_path / "slow.py"
    write(f, "import time\ndef score(c, s):\n    time.sleep(5)\n    return 1.0\n")
    ev = RewardEvaluator(RewardConfig(rewards=[RewardSpec(f"{f}:score")], timeout_s=0.5, max_workers=2))
    t = time.time()
    out = ev.score([{"completion": "a"}, {"completion": "b"}])
    assert time.time() - t < 2 and [o["reward"] for o in out] == [0.0, 0.0] and ev.timeouts == 2
    assert all("timed out" in o["errors"][f"{f}:score"] for o in out)
    ev.close()


def test_error_counts_per_call_and_lifetime(tmp_path):
    f = tmp_path / "flaky.py"
    write(f, "def score(completion, sample):\n    if completion == 'bad':\n        raise ValueError('no')\n    return 1.0\n")
    ev = RewardEvaluator(RewardConfig(rewards=[RewardSpec(f"{f}:score")], max_workers=2))
    try:
        assert ev.error_counts_since_last_call() == {}
        ev.score([{"completion": "bad"}, {"completion": "ok"}, {"completion": "bad"}])
        assert ev.error_counts_since_last_call() == {f"{f}:score": 2}
        ev.score([{"completion": "bad"}])
        assert ev.error_counts_since_last_call() == {f"{f}:score": 1}
        assert ev.error_counts_since_last_call() == {}
        assert ev.error_counts() == {f"{f}:score": 3}  # the lifetime total
    finally:
        ev.close()
