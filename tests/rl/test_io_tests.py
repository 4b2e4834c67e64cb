"""stdin/stdout programs in the sandbox (issue #25): comparison modes, per-case limits, the code
reward on stdio tasks, and attacks on this mode — a program that prints the expected output read
from the harness's files, one that looks for the harness to read it from there, output flooding.
Real sandbox processes throughout."""

import concurrent.futures as cf
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from rl.io_tests import parse_spec, run_io_tests, same_output, spec_problem
from rl.rewards.code import code_reward
from rl.sandbox import run_program
from rl.sandbox.host import _MODES, _bound, _run_program

ADD = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"


def spec(cases, **kw):
    return {"verifier": "stdio", "cases": [{"input": i, "output": o} for i, o in cases], **kw}


@pytest.mark.parametrize("got, want, compare, same", [
    ("3\n", "3\n", "exact", True),
    ("3", "3\n", "exact", True),  # one trailing newline is optional
    ("3\r\n", "3\n", "exact", True),
    ("3 \n", "3\n", "exact", False),
    ("1 2\n", "1  2", "exact", False),
    ("1 2\n", "1  2", "whitespace", True),
    ("1\n2\n", "1 2", "whitespace", True),
    ("1", "1 2", "whitespace", False),  # a prefix is not a match
    ("1 2 3", "1 2", "whitespace", False),  # nor is more
    ("", "1", "whitespace", False),
    ("", "", "exact", True),
    ("0.3333333 yes", "0.33333333 yes", "float", True),
    ("0.334 yes", "0.333 yes", "float", False),
    ("1e6", "1000000.0", "float", True),
    ("nan", "nan", "float", False),
    ("0.3 YES", "0.3 yes", "float", False),
    ("0.3", "0.3 0.4", "float", False),
])
def test_comparison_modes(got, want, compare, same):
    assert same_output(got, want, compare, 1e-6) is same


def test_spec_problems_name_what_is_wrong():
    assert spec_problem(spec([("1 2", "3")])) is None
    assert "no \"cases\"" in spec_problem({"verifier": "stdio", "cases": []})
    assert "case 1" in spec_problem({"verifier": "stdio", "cases": [{"input": "", "output": ""}, {"input": 1, "output": "x"}]})
    assert "compare" in spec_problem(spec([("", "1")], compare="fuzzy"))
    assert "timeout_s" in spec_problem(spec([("", "1")], timeout_s=0))
    assert "prints nothing passes" in spec_problem(spec([("1", ""), ("2", " \n")]))
    assert parse_spec(json.dumps(spec([("1", "1")]))) is not None and parse_spec("assert f(1) == 1") is None


def test_correct_wrong_and_crashing_programs():
    s = spec([("1 2\n", "3\n"), ("-5 5\n", "0\n"), ("100 23", "123")])
    ok = run_io_tests(ADD, s, timeout_s=5, memory_mb=256)
    assert ok.passed and ok.cases_passed == ok.cases_total == 3
    wrong = run_io_tests(ADD.replace("a + b", "a - b"), s, timeout_s=5, memory_mb=256)
    assert not wrong.passed and wrong.status == "failed" and wrong.cases_passed == 0 and "case 0" in wrong.detail
    # right output, then a crash: a runtime error is a failed case, whatever was printed
    crash = run_io_tests(ADD + "raise SystemExit(1)\n", s, timeout_s=5, memory_mb=256)
    assert not crash.passed and crash.status == "error"
    assert code_reward(f"<answer>\n```python\n{ADD}```\n</answer>", json.dumps(s)) == 1.0
    half = ADD.replace("print(a + b)", "print(a + b if a > 0 else 7)")
    assert code_reward(half, json.dumps(s)) == 0.0
    assert code_reward(half, json.dumps(s), fraction=True) == pytest.approx(1 / 3)  # first case passed, second failed


def test_per_case_time_and_memory_limits():
    t = time.monotonic()
    slow = run_io_tests("while True:\n    pass\n", spec([("", "1")], timeout_s=1), memory_mb=256)
    assert slow.status == "timeout" and time.monotonic() - t < 4
    hog = run_io_tests("x = bytearray(400 << 20)\nprint(1)\n", spec([("", "1\n")], memory_mb=128), timeout_s=5)
    assert not hog.passed and hog.status in ("error", "killed")
    assert run_io_tests("x = bytearray(50 << 20)\nprint(1)\n", spec([("", "1\n")], memory_mb=256), timeout_s=5).passed


def test_same_isolation_as_function_tests():
    r = run_program("import os\nprint(os.getuid(), os.path.exists('/proc'), os.path.exists('/work'))", timeout_s=5, memory_mb=256)
    uid, proc, work = r.stdout.split()
    assert r.status == "ok" and r.isolation.startswith("full:") and int(uid) != 0 and proc == work == "False"


def test_a_program_that_ignores_its_input_is_not_blocked():
    r = run_program("print('hi')", "x" * (4 << 20), timeout_s=5, memory_mb=256)  # more than a pipe holds, never read
    assert r.status == "ok" and r.stdout == "hi\n"


# --- attacks --------------------------------------------------------------------------------------

FIND_SECRET = r'''
import os, re, sys
found = []
def look(path):
    try:
        with open(path, 'rb') as f:
            found.extend(re.findall(rb'sputnik-expected-[0-9a-f]+', f.read(1 << 20)))
    except (OSError, ValueError):
        pass
for top in ('.', '..', '/tmp', '/work', '/proc', '/dev', '/etc'):
    for root, dirs, files in os.walk(top):
        for name in files:
            look(os.path.join(root, name))
for name in os.listdir('/'):
    look('/' + name)
for path in {paths!r}:
    look(path)
print(found[0].decode() if found else 'nothing')
'''

DETECT_HARNESS = r'''
import os, re, sys
found = []
def scan(data):
    found.extend(re.findall(rb'sputnik-expected-[0-9a-f]+', data))
scan(repr(dict(os.environ)).encode() + repr(sys.argv).encode())
for pid in ('self', '1', str(os.getppid())):  # the parent, init, ourselves: cmdline, environ, memory
    for what in ('cmdline', 'environ', 'mem'):
        try:
            with open(f'/proc/{pid}/{what}', 'rb') as f:
                scan(f.read(1 << 20))
        except (OSError, ValueError):
            pass
for fd in range(3, 64):  # descriptors inherited from the harness
    try:
        scan(os.read(fd, 1 << 16))
    except OSError:
        pass
judged = not sys.stdin.isatty() or os.getppid() != 1
print(found[0].decode() if found else ('judged' if judged else 'free'))
'''


@pytest.fixture(scope="module")
def secret_files(tmp_path_factory):
    """The expected output, on the host where a harness would keep it: a task file in a temporary
    directory and one in the repository."""
    secret = f"sputnik-expected-{secrets.token_hex(8)}"
    s = spec([("", secret + "\n")])
    host = tmp_path_factory.mktemp("harness") / "tasks.jsonl"
    host.write_text(json.dumps({"tests": json.dumps(s)}) + "\n")
    repo = Path(__file__).resolve().parents[2] / f".sputnik-attack-{secrets.token_hex(4)}.json"
    repo.write_text(json.dumps(s))
    yield secret, s, [str(host), str(repo)]
    repo.unlink()


def test_attacks_on_stdio_tests_fail(secret_files):
    secret, s, paths = secret_files
    attacks = {"read_harness_files": FIND_SECRET.replace("{paths!r}", repr(paths)), "detect_harness": DETECT_HARNESS}
    with cf.ThreadPoolExecutor(2) as pool:
        results = dict(zip(attacks, pool.map(lambda p: run_io_tests(p, s, timeout_s=8, memory_mb=256), attacks.values())))
    for name, r in results.items():
        assert not r.passed and r.status == "failed", (name, r)  # the program ran to the end and printed its best guess
        assert "got 'nothing" in r.detail or "got 'judged" in r.detail, (name, r.detail)  # it found no expected output
    honest = FIND_SECRET.replace("{paths!r}", repr(paths)).replace("print(found", f"print({secret!r}) or (found")
    assert run_io_tests(honest, s, timeout_s=8, memory_mb=256).passed  # the same program, when it knows the answer


def test_output_flooding_ends_the_case_quickly():
    flood = "import sys\nwhile True:\n    sys.stdout.write('3\\n' * 65536)\n"
    t = time.monotonic()
    r = run_io_tests(flood, spec([("1 2", "3")]), timeout_s=10, memory_mb=256)
    assert r.status == "output_limit" and time.monotonic() - t < 5
    ran = run_program(flood, timeout_s=10, memory_mb=256, output_limit=1000)
    assert ran.status == "output_limit" and len(ran.stdout) == 1000
    # a flood that starts with the right answer is still wrong (no prefix match)
    assert not run_io_tests("print(3)\nprint('x' * 10)\n", spec([("1 2", "3")]), timeout_s=5, memory_mb=256).passed


@pytest.mark.parametrize("mode", _MODES, ids=lambda m: m.name)
def test_every_isolation_mode_runs_programs_the_same(mode):
    """The reduced modes (no root, or no unshare) are the fallbacks; honest programs only here."""
    if (mode.jail and os.geteuid() != 0) or (mode.prefix and subprocess.run([*mode.prefix, "true"]).returncode != 0):
        pytest.skip(f"isolation mode {mode.name} is not permitted here")
    bound = _bound(mode)
    ok = _run_program(ADD, "20 22\n", mode, 30, 512, 1 << 16, bound)
    assert (ok.status, ok.stdout, ok.exit_code) == ("ok", "42\n", 0)
    assert ok.isolation.startswith("full" if mode.jail else "reduced")
    assert _run_program("import sys\nsys.exit(4)\n", "", mode, 30, 512, 1 << 16, bound).exit_code == 4
    slow = _run_program("while True:\n    pass\n", "", mode, 1, 512, 1 << 16, bound)
    assert slow.status == "timeout" and slow.duration_s < 3


def _children() -> set[int]:
    me, out = str(os.getpid()), set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    out.add(int(pid))
        except (OSError, IndexError):
            pass
    return out


def test_processes_a_program_leaves_behind_die_with_it():
    """A program that answers, then leaves a forked child holding its stdout: the child dies with the
    program's pid namespace, the verdict comes at once, and nothing outlives the run."""
    before = _children()
    prog = "import os, time\nprint(3, flush=True)\nif os.fork() == 0:\n    time.sleep(60)\n"
    t = time.monotonic()
    r = run_io_tests(prog, spec([("1 2", "3")]), timeout_s=10, memory_mb=256)
    assert r.passed and time.monotonic() - t < 5, r
    deadline = time.monotonic() + 5
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _children() - before
