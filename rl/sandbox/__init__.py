"""The code sandbox: `run_tests(program, tests)` runs an untrusted program against trusted tests.

The verdict never comes from the untrusted side. Each call starts two fresh processes:

* the *program* process executes the untrusted program, then only answers requests — "look up this
  name", "call this object with these arguments", "get this attribute". It never sees the tests.
* the *harness* process (our code and the dataset's tests: trusted) executes the tests. A name the
  tests use but do not define (the entry point, a helper like HumanEval's `poly`) resolves to a
  proxy whose calls go to the program process over a pipe. Replies are decoded by a pickle loader
  that builds plain data only (None, bool, int, float, complex, str, bytes, bytearray, list, tuple,
  dict, set, frozenset); any other object stays in the program process and arrives as an opaque
  handle equal only to itself. So every `==`, `assert` and `except` of the tests runs in the
  harness, on trusted types: an always-true __eq__, patched builtins or AssertionError, sys.exit /
  os._exit, threads left running or "PASSED" printed early all act inside the program process and
  cannot reach the comparison. An exception the program raises reaches the tests as the built-in
  type of that name, except StopIteration / StopAsyncIteration (and anything named so), which
  arrive as RemoteError: inside `all(map(f, xs))` they would end the iteration and pass it. Only a
  remote iterator's `next` may say "exhausted". Asserts are rewritten so that each executed one is
  counted and a failing one does not stop the tests; unittest tests count one check each, whatever
  the runner or `exit=` (`tests_passed / tests_total`). No executed check, no pass: empty or
  comment-only tests, check() never called, unittest that found no test — all "error".
* the harness writes its verdict to a pipe only it holds, with a random per-run token it read from
  its stdin; the parent accepts nothing else. The program process cannot reach that pipe, the
  harness or the tests: as root it runs in new network, pid, mount, IPC and UTS namespaces,
  chrooted into a minimal read-only root (/usr, the Python install, /dev/null and /dev/*random;
  no /proc, /sys or /dev/shm) with a private 64 MiB tmpfs as /tmp holding its working directory,
  as a random unprivileged uid without capabilities. It sees no repository, dataset, host /tmp,
  socket or other process. (The token matters in the reduced modes below, where the program shares
  the evaluator's uid and could open the harness's pipe through /proc.)

Both processes get their own session, a stripped environment, `python -I -S` (the standard library
only) and rlimits on CPU time, address space (`memory_mb`), file size, open files, core dumps and —
for the program's own uid, the only case where the kernel enforces it — processes. rlimits are per
process, so the program's whole process tree is bounded too (issue #17): by a per-run memory +
pids cgroup (v2, or v1's memory and pids hierarchies) where root can create one, else by a seccomp
filter that refuses fork (threads still start), so the tree is one process and RLIMIT_AS holds. The parent
enforces the wall-clock limit: it SIGKILLs the program's pid-namespace init (the kernel then ends
everything in the namespace, whatever sessions it made) and both process groups. stdout and stderr
are read with a cap; a pipe is closed after `_DRAIN` bytes, so a flood ends in EPIPE.

Statuses: passed (every assert that ran held and nothing raised); failed (an assert failed, or the
tests raised — including an exception the program raised in a call); error (the program did not
load — syntax error, exception, exit —, exited during the tests, broke the protocol, the tests do
not compile, or none of their asserts ran); timeout; killed (the program or harness died of a
signal: segfault, CPU limit).

Threat model. Defended, with root, `unshare` and a tree bound (the "full" isolation): anything the
program can do from inside its process as Python or native code — cheating the comparison, reading
tests or answers from disk, the network (loopback too), fork storms, exhausting memory (across all
its processes), CPU, output or disk, signalling the evaluator. Not defended: kernel exploits (no
syscall filter beyond fork in the seccomp fallback) and CPU contention within the time limit.
Without them the isolation is "reduced": with user namespaces the program keeps the evaluator's
uid and sees the file system; without `unshare` it also has the network and could signal the
evaluator. Reduced isolation is never chosen silently: `run_tests` raises IsolationError, naming
what the node lacks, unless called with `isolation="reduced"` (the `rewards.isolation` config key);
`isolation()` says what this node gives. There, the harness at least makes itself non-dumpable. Semantics to know: the program gets copies of
the arguments (in-place mutation is invisible to the tests); a value that is not plain data (numpy
scalar, custom class) reaches the tests as a handle and fails `==`; a helper the tests take from
the program (HumanEval/32's `poly`) is the program's to define.

`run_program(program, stdin)` runs a program as a script (stdin/stdout tasks, rl/io_tests.py): one
program process in the same jail, limits and tree bound, its stdin fed by a thread (a program that
never reads it cannot block us), its complete stdout returned up to `output_limit` bytes (more ends
the run). There is no harness: the trusted caller compares the output, which the program never sees.

Files. The children run program.py and harness.py (which imports program.py's framing) by their
bare names, never this package's __init__ or the host side: the standard library only, for a fast
start and because `python -I -S` sees nothing else.
  host.py     the evaluator's side: run_tests, run_program, isolation(), the modes and the probe,
              starting and ending the children, reading their pipes, the status.
  cgroups.py  the per-run memory + pids cgroups that bound the program's process tree.
  program.py  the program process: jail, rlimits, seccomp fork ban, running the program and
              answering the harness; the framing and rlimits both children share.
  harness.py  the harness process: proxies to the program, the plain-data unpickler, assert
              counting, the verdict.

Test: `pytest tests/rl/test_sandbox_attacks.py tests/rl/test_sandbox_humaneval.py tests/rl/test_reward_gaming.py tests/rl/test_io_tests.py`.
Benchmark: `python benchmarks/sandbox_isolation.py`.
"""

from rl.sandbox.harness import RemoteError
from rl.sandbox.host import IsolationError, ProgramRun, TestResult, isolation, run_program, run_tests

__all__ = ["IsolationError", "ProgramRun", "RemoteError", "TestResult", "isolation", "run_program", "run_tests"]
