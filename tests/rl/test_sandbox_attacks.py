"""The code sandbox against hostile and cheating programs (issue #6): every attack scores 0 and
leaves the evaluator and the machine healthy within timeout + 2 s; honest programs still pass.

All attacks run once, two at a time, in a module fixture; each test then checks one of them.
"""

import concurrent.futures as cf
import glob
import os
import secrets
import socket
import subprocess
import sys
import time

import pytest

from rl.sandbox import run_tests
from rl.sandbox.host import _MODES, _bound, _run

TIMEOUT = 2.0
MEMORY_MB = 256  # small, so that filling it takes well under TIMEOUT
TESTS = "assert square(3) == 9\nassert square(-4) == 16\n"
WRONG = "def square(x):\n    return x + x\n"

# name -> program; {outside}, {marker}, {port} are filled in by the fixture
ATTACKS = {
    "infinite_loop": "def square(x):\n    while True:\n        pass\n",
    "sleep": "import time\ntime.sleep(60)\n" + WRONG,
    "blocking_stdin": "import os, sys\ndata = sys.stdin.read() + os.read(0, 10).decode()\ndef square(x):\n    return int(input())\n",
    "fork_storm": (
        "import os\n"
        "for _ in range(300):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            while True:\n"
        "                pass\n"
        "    except OSError:\n"
        "        pass\n" + WRONG),
    "memory_bomb": "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n",
    "memory_bomb_in_call": "def square(x):\n    return len(bytearray(1 << 40))\n",
    "output_flood": "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * (1 << 20))\n" + WRONG,
    "stderr_flood": "import os\nfor _ in range(1024):\n    os.write(2, b'y' * (1 << 20))\n" + WRONG,
    "files_outside": (
        "import os, sys\n"
        "for action in (lambda: os.remove({outside!r}), lambda: open({outside!r}, 'w').write('pwned'),\n"
        "               lambda: open(sys.base_prefix + '/sputnik_attack', 'w').write('x'),\n"
        "               lambda: open('/usr/sputnik_attack', 'w').write('x'), lambda: os.remove(os.__file__)):\n"
        "    try:\n"
        "        action()\n"
        "    except OSError:\n"
        "        pass\n" + WRONG),
    "read_tests_file": (
        "import os, re\n"
        "found = []\n"
        "for top in ('.', '..', '/tmp', '/proc', '/dev', '/etc', '/work'):\n"
        "    for root, dirs, files in os.walk(top):\n"
        "        for name in files:\n"
        "            try:\n"
        "                with open(os.path.join(root, name), 'rb') as f:\n"
        "                    found += re.findall(rb'sputnik-secret-[0-9a-f]+', f.read(1 << 20))\n"
        "            except OSError:\n"
        "                pass\n"
        "def square(x):\n"
        "    return found[-1].decode() if found else None\n"),
    "loopback_connect": (
        "import socket\n"
        "for host in ('127.0.0.1', 'localhost', '::1'):\n"
        "    try:\n"
        "        socket.create_connection((host, {port}), timeout=1).sendall(b'hello')\n"
        "    except OSError:\n"
        "        pass\n" + WRONG),
    "kill_parent": "import os, signal\nfor pid in (os.getppid(), 0, -1, 1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n" + WRONG,
    "ignore_sigterm": "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n",
    "sys_exit_0": "import sys\nsys.exit(0)\n",
    "raise_system_exit": "raise SystemExit(0)\n",
    "os_exit_0": "import os\nos._exit(0)\n",
    "exit_in_call": "import os\ndef square(x):\n    os._exit(0)\n",
    "system_exit_in_call": "def square(x):\n    raise SystemExit(0)\n",
    "always_true_eq": (
        "class Anything:\n"
        "    def __eq__(self, other): return True\n"
        "    def __ne__(self, other): return False\n"
        "    __hash__ = object.__hash__\n"
        "def square(x):\n"
        "    return Anything()\n"),
    "int_subclass_eq": "class I(int):\n    def __eq__(self, other): return True\n    __hash__ = int.__hash__\ndef square(x):\n    return I(0)\n",
    "patched_builtins": (
        "import builtins\n"
        "builtins.AssertionError = type('AssertionError', (Exception,), {{}})\n"
        "builtins.bool = lambda *a: True\n"
        "builtins.isinstance = lambda *a: True\n"
        "import sys\nsys.modules['builtins'].Exception = BaseException\n" + WRONG),
    "threads_left_running": (
        "import threading, time\n"
        "def forge():\n"
        "    while True:\n"
        "        print('PASSED {{\"status\": \"passed\", \"passed\": 2, \"total\": 2}}')\n"
        "        time.sleep(0.01)\n"
        "threading.Thread(target=forge).start()\n"
        "threading.Thread(target=time.sleep, args=(60,)).start()\n" + WRONG),
    "forged_protocol": (
        "import os, pickle, struct\n"
        "evil = b\"cos\\nsystem\\n(S'touch {marker}'\\ntR.\"\n"
        "for payload in (evil, pickle.dumps(('ok', 9)), pickle.dumps(('ready',))):\n"
        "    for fd in range(3, 64):\n"
        "        try:\n"
        "            os.write(fd, struct.pack('>Q', len(payload)) + payload)\n"
        "        except OSError:\n"
        "            pass\n" + WRONG),
    "ctypes_segfault": "import ctypes\nctypes.string_at(0)\n",
    "segfault_in_call": "import ctypes\ndef square(x):\n    return ctypes.string_at(0)\n",
    "runaway_recursion": "def square(x):\n    return square(x)\n",
    "c_stack_overflow": "import sys\nsys.setrecursionlimit(10 ** 7)\ndef square(x):\n    return list(map(square, [x]))\n",
    "print_fake_verdict": (
        "import sys\n"
        "print('PASSED\\nok\\n{{\"status\": \"passed\", \"passed\": 2, \"total\": 2, \"token\": \"0\" }}')\n"
        "print('PASSED', file=sys.stderr)\n" + WRONG),
}


@pytest.fixture(scope="module")
def attacks(tmp_path_factory, sandbox_pids):
    probe = run_tests("x = 1", "assert x == 1")
    if not probe.isolation.startswith("full"):
        # kill(-1), fork storms and file deletion would hit the machine itself without isolation
        pytest.skip(f"the attack suite needs full isolation (root and unshare); here: {probe.isolation}")
    tmp = tmp_path_factory.mktemp("outside")
    outside, marker = tmp / "keep.txt", tmp / "pwned"
    outside.write_text("original")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    secret = f"sputnik-secret-{secrets.token_hex(8)}"
    fill = {"outside": str(outside), "marker": str(marker), "port": listener.getsockname()[1]}
    workdirs_before = set(glob.glob("/tmp/sputnik-sandbox-*"))

    def attack(name):
        tests = f"assert square(3) == {secret!r}\n" if name == "read_tests_file" else TESTS
        t = time.monotonic()
        result = run_tests(ATTACKS[name].format(**fill), tests, timeout_s=TIMEOUT, memory_mb=MEMORY_MB)
        return result, time.monotonic() - t

    with cf.ThreadPoolExecutor(2) as pool:
        results = dict(zip(ATTACKS, pool.map(attack, ATTACKS)))
    try:
        listener.accept()
        connected = True
    except BlockingIOError:
        connected = False
    listener.close()
    return {"results": results, "outside": outside, "marker": marker, "connected": connected,
            "leftover": sandbox_pids(),  # checked at once: run_tests returns after the namespace is gone
            "new_workdirs": set(glob.glob("/tmp/sputnik-sandbox-*")) - workdirs_before}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_scores_zero_within_the_limit(attacks, name):
    result, seconds = attacks["results"][name]
    assert not result.passed, result
    assert result.status != "passed"
    assert seconds <= TIMEOUT + 2, f"{name} took {seconds:.1f} s"


EXPECTED_STATUS = {
    "infinite_loop": {"timeout"}, "sleep": {"timeout"}, "ignore_sigterm": {"timeout"},
    "sys_exit_0": {"error"}, "raise_system_exit": {"error"}, "os_exit_0": {"error"}, "exit_in_call": {"error"},
    "ctypes_segfault": {"killed"}, "segfault_in_call": {"killed"},
    "always_true_eq": {"failed"}, "int_subclass_eq": {"failed"}, "patched_builtins": {"failed"},
    "system_exit_in_call": {"failed"}, "print_fake_verdict": {"failed"}, "threads_left_running": {"failed"},
    "blocking_stdin": {"failed"}, "runaway_recursion": {"failed"}, "c_stack_overflow": {"killed", "failed"},
    "memory_bomb": {"error", "timeout"}, "memory_bomb_in_call": {"failed"}, "output_flood": {"error"}, "stderr_flood": {"error"},
    "forged_protocol": {"error"},
}


@pytest.mark.parametrize("name", list(EXPECTED_STATUS))
def test_attack_status_names_what_happened(attacks, name):
    result, _ = attacks["results"][name]
    assert result.status in EXPECTED_STATUS[name], (result.status, result.detail)


def test_cheats_fail_the_comparison_not_just_the_run(attacks):
    # the asserts ran in the harness and both failed: the program's objects never decided `==`
    for name in ("always_true_eq", "int_subclass_eq", "patched_builtins", "print_fake_verdict", "threads_left_running"):
        result, _ = attacks["results"][name]
        assert (result.tests_passed, result.tests_total) == (0, 2), name


def test_files_outside_the_sandbox_are_untouched(attacks):
    assert attacks["outside"].read_text() == "original"
    assert not os.path.exists(sys.base_prefix + "/sputnik_attack")
    assert not os.path.exists("/usr/sputnik_attack")
    assert os.path.exists(os.__file__)


def test_the_tests_cannot_be_read(attacks):
    result, _ = attacks["results"]["read_tests_file"]
    assert result.status == "failed" and result.tests_passed == 0


def test_no_network_even_on_loopback(attacks):
    assert not attacks["connected"]


def test_forged_messages_run_no_code_in_the_harness(attacks):
    assert not attacks["marker"].exists()  # the harness runs as root: a loaded pickle would have made it


def test_output_is_capped(attacks):
    result, _ = attacks["results"]["output_flood"]
    assert len(result.stdout) < 128 * 1024 and "more bytes not kept" in result.stdout
    result, _ = attacks["results"]["stderr_flood"]
    assert len(result.stderr) < 128 * 1024


def test_machine_is_healthy_afterwards(attacks):
    assert attacks["leftover"] == []  # fork storm, threads and sleepers all gone
    assert not attacks["new_workdirs"]  # temporary directories removed
    result = run_tests("def square(x):\n    return x * x\n", TESTS, timeout_s=30)
    assert result.passed, result


# --- honest programs ---------------------------------------------------------------------------------


def test_correct_program_passes():
    result = run_tests("def square(x):\n    return x * x\n", TESTS, timeout_s=30)
    assert (result.passed, result.status, result.tests_passed, result.tests_total) == (True, "passed", 2, 2)
    assert result.isolation and result.duration_s > 0


def test_wrong_program_fails_and_counts_asserts():
    result = run_tests("def square(x):\n    return x * x if x > 0 else 0\n", TESTS, timeout_s=30)
    assert (result.status, result.tests_passed, result.tests_total) == ("failed", 1, 2)
    assert "line 2" in result.detail


def test_syntax_error_is_an_error():
    result = run_tests("def square(x) return x\n", TESTS, timeout_s=30)
    assert result.status == "error" and "SyntaxError" in result.detail


def test_exception_in_the_program_fails_and_can_be_expected():
    program = "def square(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x * x\n"
    assert run_tests(program, TESTS, timeout_s=30).status == "failed"
    tests = "try:\n    square(-1)\n    raised = False\nexcept ValueError:\n    raised = True\nassert raised\nassert square(2) == 4\n"
    assert run_tests(program, tests, timeout_s=30).passed


def test_threads_and_output_left_behind_do_not_delay_the_verdict():
    program = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\nprint('hi')\ndef square(x):\n    return x * x\n"
    result = run_tests(program, TESTS, timeout_s=30)
    assert result.passed and result.duration_s < 10
    assert result.stdout == "hi\n"


def test_objects_and_generators_cross_as_handles():
    program = (
        "class Solution:\n    def square(self, x):\n        return x * x\n"
        "def squares(n):\n    yield from (i * i for i in range(n))\n")
    tests = "assert Solution().square(5) == 25\nassert list(squares(4)) == [0, 1, 4, 9]\nassert squares(2) != [0, 1]\n"
    assert run_tests(program, tests, timeout_s=30).passed


def test_entry_point_calls_check():
    tests = "def check(candidate):\n    assert candidate(3) == 9\n"
    assert run_tests("def square(x):\n    return x * x\n", tests, entry_point="square", timeout_s=30).passed
    # without it nothing is checked, which must not count as a pass
    assert run_tests("def square(x):\n    return x * x\n", tests, timeout_s=30).status == "error"


def test_tests_that_do_not_compile_are_an_error():
    assert run_tests("def square(x):\n    return x * x\n", "assert square(3) ==", timeout_s=30).status == "error"


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        run_tests("", "", timeout_s=0)
    with pytest.raises(ValueError, match="entry_point"):
        run_tests("", "", entry_point="not a name")


@pytest.mark.parametrize("mode", _MODES, ids=lambda m: m.name)
def test_every_isolation_mode_decides_the_same(mode):
    # the reduced modes are the fallbacks without root or unshare; only honest programs here
    if (mode.jail and os.geteuid() != 0) or (mode.prefix and subprocess.run([*mode.prefix, "true"]).returncode != 0):
        pytest.skip(f"isolation mode {mode.name} is not permitted here")
    square = "def square(x):\n    return x * x\n"
    bound = _bound(mode)  # the cgroup (or the seccomp filter) that bounds the process tree
    assert _run(square, TESTS, mode, 30, 512, None, bound).status == "passed"
    assert _run(WRONG, TESTS, mode, 30, 512, None, bound).status == "failed"
    result = _run("while True:\n    pass\n", TESTS, mode, 1, 512, None, bound)
    assert result.status == "timeout" and result.duration_s < 3
    assert result.isolation.startswith("full" if mode.jail else "reduced")
