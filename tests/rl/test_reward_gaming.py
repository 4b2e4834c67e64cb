"""Issue #17, rewards a policy cannot game: each exploit, tried as a policy would, scores 0 through
the real reward and leaves the machine healthy (no sandbox, verifier or reward process left, no
file or cgroup left outside the run's temporary directory); the controls still score 1.

The second opinion on code rewards has its own file, tests/rl/test_second_opinion.py.
"""

import glob
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from data.tasks import generate_arithmetic
from rl.evaluator import RewardEvaluator
from rl.rewards import RewardConfig, RewardSpec
from rl.rewards.builtin import math_accuracy
from rl.rewards.code import code_reward
from rl.rewards.math import MathVerifier, math_reward
from rl.sandbox import isolation, run_tests
from rl.sandbox.cgroups import _Cgroups
from rl.sandbox.host import _MODES, _run

REPO = Path(__file__).resolve().parents[2]
SQUARE = "def square(x):\n    return x * x\n"
WRONG = "def square(x):\n    return x + x\n"
TESTS = "assert square(3) == 9\nassert square(-4) == 16\n"


def ans(s):
    return f"<think>work</think> <answer>{s}</answer>"


def fenced(code):
    return f"</think> <answer>\n```python\n{code}```</answer>"


def _children() -> set[int]:
    """Live (not zombie) processes whose parent is this test process."""
    me, out = os.getpid(), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z":
            out.add(int(pid))
    return out


def _our_cgroups() -> set[str]:
    cg = _Cgroups.find()
    dirs = [cg.memory_dir, cg.pids_dir] if cg is not None else []
    return {p for d in filter(None, dirs) for p in glob.glob(os.path.join(d, f"sputnik-sandbox-{os.getpid()}-*"))}


@pytest.fixture
def healthy(sandbox_pids):
    """Asserts after the test that nothing it started is left behind."""
    children, tmp = _children(), set(os.listdir("/tmp"))
    yield
    deadline = time.monotonic() + 5  # a killed worker may take a moment to be reaped
    while (_children() - children or sandbox_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _children() <= children, "processes left behind"
    assert sandbox_pids() == []
    assert not {n for n in set(os.listdir("/tmp")) - tmp if n.startswith("sputnik")}, "temporary directories left behind"
    assert not _our_cgroups(), "cgroups left behind"


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(timeout_s=10)
    v.equal("x", "x"), v.equal("x", "x")  # start both workers now, before `healthy` looks
    yield v
    v.close()


def full_isolation():
    if not isolation()[0]:
        pytest.skip(f"needs the sandbox's full isolation (root and unshare); here it lacks {isolation()[1]}")


# --- math: answers that restate the question ------------------------------------------------------


def test_echoing_the_question_scores_zero(healthy, verifier):
    assert math_reward(ans("34 + 65"), "99", verifier=verifier) == 0.0  # math-verify alone says 1
    for task in generate_arithmetic(5, seed=3).to_pylist():  # our own tasks: "What is a + b?"
        echo = task["prompt"].removeprefix("What is ").removesuffix("?")
        assert math_accuracy(ans(echo), task) == 0.0
        assert math_accuracy(ans(task["answer"]), task) == 1.0
    for expression in ("2^{10}", "1000 + 24", "\\frac{2048}{2}", "2 \\cdot 512", "1024 \\times 1"):
        assert math_reward(ans(expression), "1024", verifier=verifier) == 0.0, expression


def test_restating_the_prompt_scores_zero_for_expression_answers(healthy, verifier):
    prompt = "Expand $(x + 1)^2$."
    assert math_reward(ans("(x+1)^2"), "x^2+2x+1", prompt=prompt, verifier=verifier) == 0.0
    assert math_reward(ans("x^2 + 2x + 1"), "x^2+2x+1", prompt=prompt, verifier=verifier) == 1.0
    prompt = "Simplify $\\sqrt{2} \\cdot \\sqrt{4}$."
    assert math_reward(ans("\\sqrt{2}\\cdot\\sqrt{4}"), "2\\sqrt{2}", prompt=prompt, verifier=verifier) == 0.0


@pytest.mark.parametrize("gold, pred", [
    ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "0.5"), ("2\\sqrt{2}", "\\sqrt{8}"), ("(x+1)^2", "x^2+2x+1"),
    ("x^2+2x+1", "(x+1)^2"), ("1", "0.\\overline{9}"), ("1/3", "0.\\overline{3}"), ("3", "x = 3"), ("99", "99"),
    ("1500", "1.5 \\times 10^{3}"), ("90", "90^\\circ"), ("12", "12 \\text{ apples}"), ("-0.5", "\\frac{-1}{2}"),
])
def test_equivalent_final_forms_still_pass(gold, pred, verifier):
    assert math_reward(ans(pred), gold, verifier=verifier) == 1.0


def test_nested_boxes_take_the_outermost(verifier):
    assert math_reward("so \\boxed{\\frac{1}{\\boxed{2}}}", "1/2", verifier=verifier) == 1.0
    assert math_reward("so \\boxed{\\frac{1}{\\boxed{2}}}", "2", verifier=verifier) == 0.0
    assert math_reward("first \\boxed{3}, finally \\boxed{4}", "4", verifier=verifier) == 1.0


def test_math_reward_from_a_plain_script(tmp_path, healthy):
    # no `if __name__ == "__main__"`: the verifier's worker must not re-run this script
    script = tmp_path / "score.py"
    script.write_text(textwrap.dedent("""\
        from rl.rewards.math import math_reward
        print("scored", math_reward("<answer>\\\\sqrt{8}</answer>", "2\\\\sqrt{2}"), flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("scored") == 1 and "scored 1.0" in out.stdout, out.stdout + out.stderr


# --- the sandbox: exceptions, tests that run nothing, the process tree ---------------------------


STOP_TESTS = {
    "all_map": "assert all(map(square, [1, 2, 3]))\n",
    "zip_map": "for (got,) in zip(map(square, [3])):\n    assert got == 9\nassert square(2) == 4\n",
    "any_in_generator": "assert not any(square(x) != x * x for x in [1, 2])\n",
}
STOP_PROGRAMS = {
    "builtin": "def square(x):\n    raise StopIteration\n",
    "builtin_in_next": "def square(x):\n    return next(iter([]))\n",
    "named_like_it": "class StopIteration(Exception):\n    pass\ndef square(x):\n    raise StopIteration('done')\n",
}


@pytest.mark.parametrize("program", list(STOP_PROGRAMS))
@pytest.mark.parametrize("tests", list(STOP_TESTS))
def test_stop_iteration_from_the_program_is_not_control_flow(program, tests, healthy):
    full_isolation()
    result = run_tests(STOP_PROGRAMS[program], STOP_TESTS[tests], timeout_s=20)
    assert result.status == "failed" and not result.passed, result
    assert code_reward(fenced(STOP_PROGRAMS[program]), STOP_TESTS[tests], timeout_s=20) == 0.0


def test_remote_iterators_still_end_normally():
    full_isolation()
    program = "def squares(n):\n    yield from (i * i for i in range(n))\n" + SQUARE
    tests = "assert list(squares(3)) == [0, 1, 4]\nassert all(map(square, [1, 2]))\nassert [a for a, in zip(squares(2))] == [0, 1]\n"
    assert run_tests(program, tests, timeout_s=20).passed


UNITTEST = """\
import unittest

class TestSquare(unittest.TestCase):
    def test_positive(self):
        self.assertEqual(square(3), 9)

    def test_negative(self):
        self.assertEqual(square(-4), 16)

    def test_sub(self):
        for x in (1, 2):
            with self.subTest(x=x):
                self.assertEqual(square(x), x * x)
"""

NOTHING = {
    "empty": "",
    "whitespace": "\n\n   \n",
    "comments": "# assert square(3) == 9\n# nothing else\n",
    "definitions_only": "def check(candidate):\n    assert candidate(3) == 9\n",
    "unittest_exit_false": UNITTEST + "unittest.main(exit=False)\n",
    "unittest_no_tests": "import unittest\nunittest.main(exit=False)\n",
    "unittest_never_run": UNITTEST,
}


@pytest.mark.parametrize("name", list(NOTHING))
def test_tests_that_check_nothing_never_pass(name, healthy):
    full_isolation()
    program = SQUARE if name in ("unittest_never_run", "unittest_no_tests") else "x = 1\n"
    if name == "unittest_exit_false":
        program = WRONG  # the test run reports failures, and exit=False used to hide them
    result = run_tests(program, NOTHING[name], timeout_s=20)
    assert not result.passed and result.status in ("error", "failed"), result
    assert code_reward(fenced(program), NOTHING[name], timeout_s=20) == 0.0
    assert code_reward("<answer>x = 1</answer>", "") == 0.0


@pytest.mark.parametrize("runner", ["unittest.main(exit=False)\n", "unittest.main()\n",
                                    "unittest.TextTestRunner().run(unittest.defaultTestLoader.loadTestsFromTestCase(TestSquare))\n"])
def test_unittest_tests_count_as_checks(runner):
    full_isolation()
    good = run_tests(SQUARE, UNITTEST + runner, timeout_s=20)
    assert (good.status, good.tests_passed, good.tests_total) == ("passed", 3, 3), good
    bad = run_tests("def square(x):\n    return x * x if x > 0 else 0\n", UNITTEST + runner, timeout_s=20)
    assert bad.status == "failed" and bad.tests_passed == 2 and "test_negative" in bad.detail, bad


FORK_MEMORY = """\
import os, time
forked = 0
for _ in range(10):
    try:
        if os.fork() == 0:
            hold = bytearray(200 << 20)  # 10 x 200 MiB against memory_mb = 256
            time.sleep(30)
            os._exit(0)
        forked += 1
    except OSError:
        pass
time.sleep(0.5)
print("forked", forked)
""" + WRONG


def test_memory_is_bounded_for_the_whole_process_tree(healthy):
    full_isolation()
    result = run_tests(FORK_MEMORY, TESTS, timeout_s=5, memory_mb=256)
    assert not result.passed
    if "cgroup" in result.isolation:
        assert result.memory_peak_mb is not None and result.memory_peak_mb <= 256, result
    else:
        assert "seccomp" in result.isolation


def test_seccomp_bound_where_no_cgroup_is_writable(healthy):
    # the fallback: no fork at all, so RLIMIT_AS (memory_mb) bounds the tree; threads still work
    full_isolation()
    jail = _MODES[0]
    result = _run(FORK_MEMORY, TESTS, jail, 5, 256, None, "seccomp")
    assert result.status == "failed" and "forked 0" in result.stdout, result
    threads = "import threading\nt = threading.Thread(target=print, args=('hi',))\nt.start()\nt.join()\n" + SQUARE
    assert _run(threads, TESTS, jail, 20, 256, None, "seccomp").passed
    assert "seccomp" in _run(SQUARE, TESTS, jail, 20, 256, None, "seccomp").isolation


def test_fork_storm_stays_bounded(healthy):
    full_isolation()
    storm = "import os, time\nn = 0\nfor _ in range(10000):\n    try:\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        n += 1\n    except OSError:\n        break\nprint(n)\n" + SQUARE
    result = run_tests(storm, TESTS, timeout_s=10, memory_mb=256)
    assert result.passed, result  # a correct program that forks is not punished ...
    assert int(result.stdout.split()[0]) < 64  # ... but its tree is capped


# --- isolation that never degrades silently -----------------------------------------------------


def _as_unprivileged(code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a new user namespace: euid 65534, no root, no CAP_SYS_ADMIN on the host."""
    if subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot create a user namespace here")
    return subprocess.run(["unshare", "--user", sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_reward_workers_refuse_reduced_isolation_unless_opted_in(healthy):
    out = _as_unprivileged(textwrap.dedent("""\
        from rl.evaluator import RewardEvaluator
        from rl.rewards import RewardConfig, RewardSpec
        from rl.sandbox import IsolationError, run_tests
        try:
            RewardEvaluator(RewardConfig(rewards=[RewardSpec("code_tests")]))
        except IsolationError as e:
            print("REFUSED", e)
        try:
            run_tests("x = 1", "assert x == 1")
        except IsolationError as e:
            print("RUN_TESTS_REFUSED")
        RewardEvaluator(RewardConfig()).close()  # math only: no sandbox, starts anywhere
        ev = RewardEvaluator(RewardConfig(rewards=[RewardSpec("code_tests")], isolation="reduced"))
        row = {"tests": "assert f(2) == 4", "entry_point": "f", "answer": ""}
        print("REDUCED", ev.score([{"completion": "<answer>def f(x):\\n    return x * 2</answer>", **row}])[0]["reward"])
        ev.close()
    """))
    assert out.returncode == 0, out.stderr
    refused = next(line for line in out.stdout.splitlines() if line.startswith("REFUSED"))
    assert "root" in refused and "rewards.isolation=reduced" in refused  # what the node lacks, and the key
    assert "RUN_TESTS_REFUSED" in out.stdout and "REDUCED 1.0" in out.stdout


# --- a hung reward function -----------------------------------------------------------------------


def test_hung_user_reward_is_killed_and_frees_its_worker(tmp_path, healthy):
    f, pids = tmp_path / "hang.py", tmp_path / "pids"
    f.write_text(f"import os, time\ndef score(completion, sample):\n    if 'hang' in completion:\n"
                 f"        if os.fork() == 0:\n            time.sleep(600)\n"
                 f"        open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n        while True:\n            pass\n    return 1.0\n")
    ev = RewardEvaluator(RewardConfig(rewards=[RewardSpec(f"{f}:score")], timeout_s=1.0, max_workers=2))
    try:
        t = time.monotonic()
        out = ev.score([{"completion": "hang"}, {"completion": "hang"}, {"completion": "fine"}])
        assert time.monotonic() - t < 4  # two killed at 1 s, then the third on a fresh worker
        assert [o["reward"] for o in out] == [0.0, 0.0, 1.0]
        assert "timed out after 1 s" in out[0]["errors"][f"{f}:score"]
        assert ev.error_counts_since_last_call() == {f"{f}:score": 2} and ev.timeouts == 2
        for pid in map(int, pids.read_text().split()):  # the hung workers, and the children they forked, are gone
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        out = ev.score([{"completion": "fine"}] * 4)  # the pool is not starved
        assert [o["reward"] for o in out] == [1.0] * 4 and ev.error_counts_since_last_call() == {}
    finally:
        ev.close()
