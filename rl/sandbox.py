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

Test: `pytest tests/rl/test_sandbox_attacks.py tests/rl/test_sandbox_humaneval.py tests/rl/test_reward_gaming.py tests/rl/test_io_tests.py`.
Benchmark: `python benchmarks/sandbox_isolation.py`.
"""

from __future__ import annotations

import ast
import builtins
import functools
import io
import json
import math
import os
import pickle
import resource
import signal
import struct
import sys
import time
import types
from dataclasses import dataclass

if __name__ != "__main__":  # the children run this module as __main__ and start faster without these
    import logging
    import secrets
    import selectors
    import shutil
    import subprocess
    import tempfile

    log = logging.getLogger(__name__)

_KEEP = 64 * 1024  # bytes of stdout / stderr kept in the result
_DRAIN = 4 * 1024 * 1024  # bytes read from a stream before its pipe is closed on the writer
_MAX_MESSAGE = 64 * 1024 * 1024  # largest message between harness and program
_UID_BASE, _UID_RANGE = 1_700_000_000, 1 << 24  # per-run uid, so RLIMIT_NPROC is per run
_TMPFS = "size=64m,nr_inodes=16384,mode=755"
_JAIL_DIRS = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32")
_JAIL_FILES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/etc/ld.so.cache")
_PIDS = 64  # tasks (processes and threads) in one run's cgroup
_SECCOMP_ARCH = {  # audit arch, syscall numbers (fork and vfork exist on x86_64 only)
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435}),
}
_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset})


@dataclass
class TestResult:
    """What `run_tests` found; `passed` is decided by the trusted harness, never by the program."""

    __test__ = False  # not a pytest test class

    passed: bool
    status: str  # passed | failed | error | timeout | killed
    duration_s: float
    stdout: str  # the program's, truncated to _KEEP bytes
    stderr: str
    isolation: str  # "full: ..." or "reduced: ..."
    detail: str = ""  # one line: why it failed
    tests_passed: int = 0  # checks that held (asserts, unittest tests)
    tests_total: int = 0  # checks executed, at least the number of asserts written in the tests
    memory_peak_mb: float | None = None  # the program's whole process tree, where a cgroup measured it


class IsolationError(RuntimeError):
    """Full isolation is not available on this node and reduced isolation was not allowed."""


@dataclass(frozen=True)
class _Mode:
    name: str
    prefix: tuple[str, ...]  # command that wraps the program process
    jail: bool  # chroot + unprivileged uid (needs root)
    isolation: str


_MODES = (
    _Mode("jail", ("unshare", "--mount", "--uts", "--ipc", "--net", "--pid", "--fork", "--kill-child"), True,
          "full: network, pid, mount and IPC namespaces; read-only minimal root; unprivileged uid"),
    _Mode("userns", ("unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"), False,
          "reduced: network and pid namespaces only (not root: same uid, file system visible)"),
    _Mode("none", (), False, "reduced: no network namespace (unshare not permitted): same uid, file system and network visible"),
)


@dataclass(frozen=True)
class _Setup:
    """What this process can do, probed once: the strongest mode, the bound on the program's process
    tree, and for anything short of full isolation, what the node lacks."""

    mode: _Mode
    bound: object  # _Cgroups | "seccomp" | None
    lacks: str = ""  # what the node lacks for full isolation

    @property
    def full(self) -> bool:
        return self.mode.jail and self.bound is not None

    @property
    def isolation(self) -> str:
        tree = {None: "no bound on the memory of the process tree",
                "seccomp": "no fork (seccomp), so memory_mb bounds the process tree"}.get(self.bound, f"process tree held to memory_mb by a cgroup ({getattr(self.bound, 'version', '')})")
        text = f"{self.mode.isolation}; {tree}"
        return text if self.full else "reduced: " + text.split(": ", 1)[1]


def run_tests(program: str, tests: str, *, timeout_s: float = 10, memory_mb: int = 1024, entry_point: str | None = None,
              isolation: str = "full") -> TestResult:
    """Run `program`, then `tests` (Python with asserts or unittest) against it; see the module docstring.

    With `entry_point`, tests that define `check(candidate)` without calling it (HumanEval's
    `test` field) get `check(<entry_point>)` appended. `isolation="full"` (the default) raises
    IsolationError where this node cannot isolate fully; "reduced" accepts the best it can.
    Thread-safe; each call takes two processes.
    """
    if timeout_s <= 0 or memory_mb < 64:
        raise ValueError(f"run_tests needs timeout_s > 0 and memory_mb >= 64 (got {timeout_s}, {memory_mb})")
    if entry_point is not None and not entry_point.isidentifier():
        raise ValueError(f"entry_point {entry_point!r} is not a Python identifier")
    if isolation not in ("full", "reduced"):
        raise ValueError(f"isolation must be 'full' or 'reduced' (got {isolation!r})")
    setup = _setup()
    if isolation == "full" and not setup.full:
        raise IsolationError(f"the code sandbox needs full isolation, which this node lacks: {setup.lacks}")
    return _run(program, tests, setup.mode, timeout_s, memory_mb, entry_point, setup.bound)


def isolation() -> tuple[bool, str]:
    """(True, description) where `run_tests` isolates fully on this node, else (False, what the
    node lacks). Probed once per process (a few trivial programs)."""
    setup = _setup()
    return (True, setup.isolation) if setup.full else (False, setup.lacks or "full isolation")


@dataclass
class ProgramRun:
    """What `run_program` saw: the program's exit and its complete stdout (up to the limit)."""

    status: str  # ok (exit status 0) | error (another exit status) | timeout | killed | output_limit
    exit_code: int | None
    stdout: str  # all of it when status is not output_limit
    stderr: str  # truncated to _KEEP bytes
    duration_s: float
    isolation: str
    detail: str = ""
    memory_peak_mb: float | None = None


def run_program(program: str, stdin: str = "", *, timeout_s: float = 10, memory_mb: int = 1024, output_limit: int = 1 << 20,
                isolation: str = "full") -> ProgramRun:
    """Run `program` as a script (`__name__ == "__main__"`) with `stdin` as its standard input, in the
    same jail, limits and process-tree bound as `run_tests`' program process; return its exit and
    its stdout. One process, no harness: the caller (trusted) judges the output, so nothing the
    program does decides a verdict. More than `output_limit` bytes of stdout end the run
    (status output_limit: the pipe is closed, the program killed). Thread-safe."""
    if timeout_s <= 0 or memory_mb < 64 or output_limit < 1:
        raise ValueError(f"run_program needs timeout_s > 0, memory_mb >= 64 and output_limit >= 1 (got {timeout_s}, {memory_mb}, {output_limit})")
    if isolation not in ("full", "reduced"):
        raise ValueError(f"isolation must be 'full' or 'reduced' (got {isolation!r})")
    setup = _setup()
    if isolation == "full" and not setup.full:
        raise IsolationError(f"the code sandbox needs full isolation, which this node lacks: {setup.lacks}")
    return _run_program(program, stdin, setup.mode, timeout_s, memory_mb, output_limit, setup.bound)


def _run_program(program: str, stdin: str, mode: _Mode, timeout_s: float, memory_mb: int, output_limit: int, bound=None) -> ProgramRun:
    import threading

    start = time.monotonic()
    deadline = start + timeout_s
    limits = {"cpu_s": math.ceil(timeout_s) + 1, "memory_mb": memory_mb}
    uid = _UID_BASE + secrets.randbelow(_UID_RANGE) if mode.jail else None
    work = tempfile.mkdtemp(prefix="sputnik-sandbox-")
    cgroups: list[str] = []
    procs: list[subprocess.Popen] = []
    child_fds: list[int] = []
    streams: list[_Stream] = []
    feeder = None
    try:
        if isinstance(bound, _Cgroups):
            cgroups += bound.create(memory_mb)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        child_fds += [out_w, err_w]
        out = _Stream(open(out_r, "rb", buffering=0), keep=output_limit + 1, drain=output_limit + 1)
        err = _Stream(open(err_r, "rb", buffering=0))
        streams += [out, err]
        cfg = {"role": "stdio", "jail": mode.jail, "uid": uid, "limits": limits, "fds": [out_w, err_w], "cgroups": cgroups,
               "no_fork": bound == "seccomp"}
        procs.append(subprocess.Popen(
            [*mode.prefix, sys.executable, "-I", "-S", "-c", _child_bootstrap(), json.dumps(cfg)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(out_w, err_w), cwd="/" if mode.jail else work, env=_env(work),
            start_new_session=True))
        prog = procs[0]
        while child_fds:
            os.close(child_fds.pop())
        startup = _Stream(prog.stdout)
        streams.append(startup)
        source = program.encode("utf-8", "surrogatepass")
        # a thread writes stdin: a program that never reads its input must not block us
        feeder = threading.Thread(target=_feed, args=(prog, struct.pack(">Q", len(source)) + source + stdin.encode("utf-8", "surrogatepass")), daemon=True)
        feeder.start()
        closed = _collect(streams, out, deadline)  # until the program closes its stdout (exit, or output_limit)
        try:
            prog.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        rc = prog.poll()
        if mode.prefix:
            _end_namespace(prog)
        _kill(procs)
        for s in streams:
            s.drain()
        peak_mb, ooms = _Cgroups.usage(cgroups)
        if out.seen > output_limit:
            status, detail = "output_limit", f"the program wrote more than {output_limit} bytes to stdout"
        elif not closed or rc is None:
            status, detail = "timeout", f"the program did not finish within {timeout_s:g} s"
        elif rc < 0:
            status, detail = "killed", f"killed by {signal.Signals(-rc).name}"
        elif rc:
            status, detail = "error", f"exit status {rc}: {_last_line(_text(err.data) or _text(startup.data))}"
        else:
            status, detail = "ok", ""
        if ooms and status != "ok":
            detail += f" (the program's processes hit memory_mb = {memory_mb} {ooms} time(s))"
        return ProgramRun(status=status, exit_code=rc, stdout=_text(out.data[:output_limit]), stderr=_text(err.data, err.seen),
                          duration_s=time.monotonic() - start, isolation=_Setup(mode, bound).isolation, detail=detail,
                          memory_peak_mb=peak_mb)
    finally:
        _kill(procs)
        if feeder is not None:  # the program is dead: a blocked write ends with EPIPE
            feeder.join(timeout=2)
        for p in procs:
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:  # a broken pipe's buffered bytes
                    pass
        for s in streams:
            s.file.close()
        for fd in child_fds:
            os.close(fd)
        _Cgroups.remove(cgroups)
        shutil.rmtree(work, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def _setup() -> _Setup:
    """The strongest isolation that works here, probed once per process with a trivial program."""
    lacks = []
    for mode in _MODES:
        if mode.jail and os.geteuid() != 0:
            lacks.append(f"root (the evaluator runs as uid {os.geteuid()}; the jail needs root to mount, chroot and change uid)")
            continue
        if mode.prefix and shutil.which(mode.prefix[0]) is None:
            if mode.jail:
                lacks.append("the `unshare` command (util-linux)")
            continue
        bound = _bound(mode)
        probe = _run("x = 1", "assert x == 1", mode, 30, 256, None, bound)
        if probe.passed:
            if mode.jail and bound is None:
                lacks.append("a bound on the program's process tree (no writable memory cgroup, and seccomp is not supported on this CPU)")
            setup = _Setup(mode, bound, "; ".join(lacks))
            if not setup.full:
                log.warning("code sandbox isolation is %s (lacks: %s)", setup.isolation, setup.lacks)
            return setup
        if mode.jail:
            lacks.append(f"a working jail ({probe.status}: {probe.detail or probe.stderr[-200:]})".replace("\n", " "))
        log.info("code sandbox: mode %s does not work here (%s: %s)", mode.name, probe.status, probe.detail or probe.stderr[-300:])
    raise RuntimeError(f"the code sandbox cannot run even unisolated: {probe.status}: {probe.detail or probe.stderr[-300:]}")


def _bound(mode: _Mode):
    """How the program's whole process tree is held to memory_mb: a cgroup (needs root), else a
    seccomp filter that forbids fork so the tree is one process, else nothing."""
    if mode.jail:
        cgroups = _Cgroups.find()
        if cgroups is not None:
            return cgroups
    return "seccomp" if os.uname().machine in _SECCOMP_ARCH else None


# --- the parent ---------------------------------------------------------------------------------


def _env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def _child_bootstrap() -> str:
    """`python -c` code that runs this module as __main__ from its cached bytecode (faster than
    running the file as a script, which recompiles it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return f"import runpy, sys; sys.path.insert(0, {root!r}); runpy.run_module({__name__!r}, run_name='__main__', alter_sys=True)"


def _run(program: str, tests: str, mode: _Mode, timeout_s: float, memory_mb: int, entry_point: str | None, bound=None) -> TestResult:
    start = time.monotonic()
    deadline = start + timeout_s
    token = secrets.token_hex(16)
    limits = {"cpu_s": math.ceil(timeout_s) + 1, "memory_mb": memory_mb}
    uid = _UID_BASE + secrets.randbelow(_UID_RANGE) if mode.jail else None
    work = tempfile.mkdtemp(prefix="sputnik-sandbox-")
    cgroups: list[str] = []
    procs: list[subprocess.Popen] = []
    child_fds: list[int] = []
    streams: list[_Stream] = []
    try:
        if isinstance(bound, _Cgroups):
            cgroups += bound.create(memory_mb)
        prog_dir, harness_dir = os.path.join(work, "program"), os.path.join(work, "harness")
        os.mkdir(prog_dir)
        os.mkdir(harness_dir)
        req_r, req_w = os.pipe()  # harness -> program
        resp_r, resp_w = os.pipe()  # program -> harness
        verdict_r, verdict_w = os.pipe()  # harness -> us
        out_r, out_w = os.pipe()  # the program's own stdout and stderr (not unshare's)
        err_r, err_w = os.pipe()
        child_fds += [req_r, req_w, resp_r, resp_w, verdict_w, out_w, err_w]
        out, err, verdict = (_Stream(open(fd, "rb", buffering=0)) for fd in (out_r, err_r, verdict_r))
        streams += [out, err, verdict]
        me = [sys.executable, "-I", "-S", "-c", _child_bootstrap()]
        prog_cfg = {"role": "program", "jail": mode.jail, "uid": uid, "limits": limits, "fds": [req_r, resp_w, out_w, err_w],
                    "cgroups": cgroups, "no_fork": bound == "seccomp"}
        procs.append(subprocess.Popen(
            [*mode.prefix, *me, json.dumps(prog_cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=(req_r, resp_w, out_w, err_w), cwd="/" if mode.jail else prog_dir, env=_env(prog_dir), start_new_session=True))
        harness_cfg = {"role": "harness", "limits": limits, "fds": [resp_r, req_w, verdict_w], "protect": not mode.jail}
        procs.append(subprocess.Popen(
            [*me, json.dumps(harness_cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=(resp_r, req_w, verdict_w), cwd=harness_dir, env=_env(harness_dir), start_new_session=True))
        prog, harness = procs
        while child_fds:  # only the children hold these now, so EOF means a child is gone
            os.close(child_fds.pop())
        startup, harness_out = _Stream(prog.stdout), _Stream(harness.stdout)  # unshare's and the bootstrap's messages
        streams += [startup, harness_out]
        _feed(prog, program.encode("utf-8", "surrogatepass"))
        _feed(harness, json.dumps({"tests": tests, "entry_point": entry_point, "token": token}).encode())
        timed_out = not _collect(streams, verdict, deadline)
        report = _parse_verdict(bytes(verdict.data), token)
        if not timed_out and report is not None and report["status"] == "lost":
            try:  # let the program's own end (a signal or an exit) show in its status
                prog.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        prog_rc = prog.poll()  # before we kill it: None while it runs
        if mode.prefix:
            _end_namespace(prog)
        _kill(procs)
        for s in streams:
            s.drain()
        status, detail = _status(timed_out, report, prog_rc, _text(startup.data), _text(harness_out.data), timeout_s)
        peak_mb, ooms = _Cgroups.usage(cgroups)
        if ooms and status != "passed":
            detail += f" (the program's processes hit memory_mb = {memory_mb} {ooms} time(s))"
        return TestResult(
            passed=status == "passed", status=status, duration_s=time.monotonic() - start,
            stdout=_text(out.data, out.seen), stderr=_text(err.data, err.seen), isolation=_Setup(mode, bound).isolation,
            detail=detail, tests_passed=report.get("passed", 0) if report else 0, tests_total=report.get("total", 0) if report else 0,
            memory_peak_mb=peak_mb)
    finally:
        _kill(procs)
        for p in procs:
            for f in (p.stdin, p.stdout):
                f.close()
        for s in streams:
            s.file.close()
        for fd in child_fds:
            os.close(fd)
        _Cgroups.remove(cgroups)
        shutil.rmtree(work, ignore_errors=True)


class _Stream:
    """A pipe from a child: keeps the first _KEEP bytes; the pipe is closed after _DRAIN bytes, so a
    program printing without end gets EPIPE instead of costing the parent CPU."""

    def __init__(self, file, keep: int = _KEEP, drain: int = _DRAIN):
        self.file, self.data, self.seen, self.keep, self.limit = file, bytearray(), 0, keep, drain

    def read(self) -> bool:
        """Read once; False at EOF or when drained (the caller then closes the pipe)."""
        chunk = os.read(self.file.fileno(), 65536)
        self.seen += len(chunk)
        self.data += chunk[: max(0, self.keep - len(self.data))]
        return bool(chunk) and self.seen < self.limit

    def drain(self) -> None:
        """Read what is left without blocking (the writers are dead, or escaped and ignored)."""
        if self.file.closed:
            return
        os.set_blocking(self.file.fileno(), False)
        try:
            while self.read():
                pass
        except BlockingIOError:
            pass
        self.file.close()


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    """Write a child's stdin and close it; the child reads it first thing, or has died."""
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except BrokenPipeError:
        pass


def _collect(streams: list[_Stream], verdict: _Stream, deadline: float) -> bool:
    """Read every stream until the verdict pipe closes (True) or the deadline passes (False)."""
    with selectors.DefaultSelector() as sel:
        for s in streams:
            sel.register(s.file, selectors.EVENT_READ, s)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in sel.select(timeout=remaining):
                s = key.data
                if not s.read():
                    sel.unregister(s.file)
                    s.file.close()
                    if s is verdict:
                        return True


def _end_namespace(unshare: subprocess.Popen) -> None:
    """SIGKILL the pid namespace's init (unshare's child) first: the kernel kills everything else in
    the namespace before init's exit completes, and unshare reaps init — nothing is left, not even a
    zombie. (Killing unshare first would orphan the dying init to the host's init.)"""
    try:
        with open(f"/proc/{unshare.pid}/task/{unshare.pid}/children") as f:
            children = [int(pid) for pid in f.read().split()]
    except (OSError, ValueError):  # already gone, or a kernel without the children file
        return
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        unshare.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each child's process group (the program's pid namespace dies with its init)."""
    for p in procs:
        if p.returncode is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            log.warning("sandbox process %d survived SIGKILL for 2 s", p.pid)


class _Cgroups:
    """Per-run cgroups that hold the program's whole process tree to memory_mb and _PIDS tasks
    (issue #17: rlimits are per process, so a program that forks could hold processes x memory_mb).

    cgroup v2: a child of the nearest cgroup (ours or an ancestor) that delegates the memory and pids
    controllers to its children; v1: children of our memory and pids cgroups. The program process
    joins them itself (it writes "0" to cgroup.procs before it chroots), so everything it starts is
    inside. Needs root; cgroups left by a dead evaluator are removed on the next probe."""

    def __init__(self, version: str, memory_dir: str, pids_dir: str | None):
        self.version, self.memory_dir, self.pids_dir = version, memory_dir, pids_dir

    @staticmethod
    def find() -> _Cgroups | None:
        if os.geteuid() != 0:
            return None
        try:
            with open("/proc/self/cgroup") as f:
                own = {c: path for _, ctls, path in (line.rstrip("\n").split(":", 2) for line in f) for c in ctls.split(",")}
            with open("/proc/self/mountinfo") as f:
                mounts = [line.split() for line in f]
        except OSError:
            return None
        v1, v2 = {}, None
        for m in mounts:
            fstype = m[m.index("-") + 1]
            if fstype == "cgroup2" and v2 is None:
                v2 = (m[3], m[4])  # (root inside the hierarchy, mount point)
            elif fstype == "cgroup":
                for ctl in m[-1].split(","):
                    v1.setdefault(ctl, (m[3], m[4]))

        def located(root_mount, path):
            root, mount = root_mount
            rel = path[len(root):] if root != "/" and path.startswith(root) else path
            return os.path.normpath(mount + "/" + rel.lstrip("/"))

        found = None
        if "memory" in v1 and "memory" in own:
            pids = located(v1["pids"], own["pids"]) if "pids" in v1 and "pids" in own else None
            found = _Cgroups("v1", located(v1["memory"], own["memory"]), pids)
        elif v2 is not None and "" in own:
            d, top = located(v2, own[""]), v2[1]
            while True:  # the nearest cgroup whose children get the memory and pids controllers
                try:
                    with open(os.path.join(d, "cgroup.subtree_control")) as f:
                        if {"memory", "pids"} <= set(f.read().split()):
                            found = _Cgroups("v2", d, None)
                            break
                except OSError:
                    pass
                if os.path.normpath(d) == os.path.normpath(top):
                    break
                d = os.path.dirname(d)
        if found is None:
            return None
        found._sweep()
        try:
            found.remove(found.create(64))
        except OSError as e:
            log.info("code sandbox: cannot use cgroups under %s (%s)", found.memory_dir, e)
            return None
        return found

    def create(self, memory_mb: int) -> list[str]:
        """Make this run's cgroups; returns their directories (the program joins each)."""
        name = f"sputnik-sandbox-{os.getpid()}-{secrets.token_hex(6)}"
        limit = str(memory_mb << 20)
        made: list[str] = []
        try:
            d = os.path.join(self.memory_dir, name)
            os.mkdir(d)
            made.append(d)
            if self.version == "v2":
                _write(d, "memory.max", limit)
                _write(d, "memory.swap.max", "0", missing_ok=True)
                _write(d, "pids.max", str(_PIDS))
            else:
                _write(d, "memory.limit_in_bytes", limit)
                _write(d, "memory.memsw.limit_in_bytes", limit, missing_ok=True)
                if self.pids_dir is not None:
                    d = os.path.join(self.pids_dir, name)
                    os.mkdir(d)
                    made.append(d)
                    _write(d, "pids.max", str(_PIDS))
        except OSError:
            _Cgroups.remove(made)
            raise
        return made

    @staticmethod
    def usage(dirs: list[str]) -> tuple[float | None, int]:
        """(peak memory in MiB of the run's process tree, times it hit the limit), where known."""
        for d in dirs:
            for peak_file, events in (("memory.peak", "memory.events"), ("memory.max_usage_in_bytes", "memory.oom_control")):
                try:
                    with open(os.path.join(d, peak_file)) as f:
                        peak = int(f.read()) / (1 << 20)
                    with open(os.path.join(d, events)) as f:
                        ooms = dict(line.split() for line in f if line.strip()).get("oom_kill", "0")
                    return peak, int(ooms)
                except (OSError, ValueError):
                    continue
        return None, 0

    @staticmethod
    def remove(dirs: list[str]) -> None:
        """Kill whatever is left in the cgroups and remove them (rmdir waits for the exits)."""
        deadline = time.monotonic() + 5
        for d in dirs:
            while True:
                try:
                    if os.path.exists(os.path.join(d, "cgroup.kill")):  # v2, Linux 5.14+
                        _write(d, "cgroup.kill", "1")
                    with open(os.path.join(d, "cgroup.procs")) as f:
                        for pid in f.read().split():
                            try:
                                os.kill(int(pid), signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:  # EBUSY while the killed processes finish exiting
                    if time.monotonic() > deadline:
                        log.warning("code sandbox: could not remove cgroup %s (%s); the next probe retries", d, e)
                        break
                    time.sleep(0.01)

    def _sweep(self) -> None:
        """Remove cgroups that an evaluator which has since died left behind."""
        for base in filter(None, (self.memory_dir, self.pids_dir)):
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for name in names:
                parts = name.split("-")
                if len(parts) != 4 or parts[:2] != ["sputnik", "sandbox"] or not parts[2].isdigit():
                    continue
                try:
                    os.kill(int(parts[2]), 0)
                except ProcessLookupError:
                    _Cgroups.remove([os.path.join(base, name)])
                except PermissionError:
                    pass


def _write(directory: str, name: str, value: str, *, missing_ok: bool = False) -> None:
    try:
        with open(os.path.join(directory, name), "w") as f:
            f.write(value)
    except FileNotFoundError:
        if not missing_ok:
            raise


def _parse_verdict(data: bytes, token: str) -> dict | None:
    try:
        report = json.loads(data)
    except ValueError:
        return None
    if not isinstance(report, dict) or report.get("token") != token:
        return None
    return report


def _status(timed_out: bool, report: dict | None, prog_rc: int | None, startup: str, harness_out: str, timeout_s: float) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"no verdict within {timeout_s:g} s"
    if report is None:
        return "killed", "the test harness died: " + _last_line(harness_out)
    if report["status"] == "lost":
        if prog_rc is not None and prog_rc < 0:
            return "killed", f"{report['detail']} (killed by {signal.Signals(-prog_rc).name})"
        if prog_rc:  # the bootstrap or unshare failed, before the program ran
            return "error", f"{report['detail']} (exit status {prog_rc}: {_last_line(startup)})"
        return "error", report["detail"] + (" (exit status 0)" if prog_rc == 0 else "")
    return report["status"], report["detail"]


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"


def _text(data: bytes | bytearray, seen: int | None = None) -> str:
    text = bytes(data).decode("utf-8", "replace")
    if seen is not None and seen > len(data):
        text += f"\n[... {seen - len(data)} more bytes not kept]"
    return text


# --- both children: framing and limits ----------------------------------------------------------


class _ProtocolError(Exception):
    """A message that breaks the framing (too long)."""


class _Channel:
    """Length-prefixed pickles over a pair of pipes."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd, self.write_fd = read_fd, write_fd

    def send(self, message, persistent_id=None) -> None:
        self.write(self.frame(message, persistent_id))

    @staticmethod
    def frame(message, persistent_id=None) -> bytes:
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
        if persistent_id is not None:
            pickler.persistent_id = persistent_id
        pickler.dump(message)
        return struct.pack(">Q", buf.tell()) + buf.getvalue()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.write_fd, view):]

    def recv(self, unpickler=pickle.Unpickler, persistent_load=None):
        (size,) = struct.unpack(">Q", self._read(8))
        if size > _MAX_MESSAGE:
            raise _ProtocolError(f"message of {size} bytes")
        loader = unpickler(io.BytesIO(self._read(size)))
        if persistent_load is not None:
            loader.persistent_load = persistent_load
        return loader.load()

    def _read(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            chunk = os.read(self.read_fd, min(left, 1 << 20))
            if not chunk:
                raise EOFError("the other side closed the pipe")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)


def _set_limits(limits: dict, *, nproc: int | None) -> None:
    mem = limits["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if nproc is not None:  # counts every process of the uid, so only with a uid of our own
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


# --- the program process (untrusted once the program runs) ---------------------------------------


def _enter_jail(uid: int) -> None:
    """As root in fresh mount/pid/net namespaces: chroot into a tmpfs holding read-only binds of the
    system libraries and the Python install, with /tmp/work (owned by `uid`) as working directory."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ms_rdonly, ms_nosuid, ms_nodev, ms_remount, ms_bind, ms_rec = 1, 2, 4, 32, 4096, 16384

    def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        enc = (lambda s: s.encode() if s is not None else None)
        if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
            raise OSError(ctypes.get_errno(), f"mount {source} on {target}: {os.strerror(ctypes.get_errno())}")

    def bind(path: str, target: str, extra: int) -> None:
        mount(path, target, None, ms_bind | ms_rec)
        mount(None, target, None, ms_bind | ms_remount | ms_rdonly | extra)

    root = "/tmp"  # any directory: the mount namespace is private (unshare's default propagation)
    mount("tmpfs", root, "tmpfs", ms_nosuid | ms_nodev, _TMPFS)
    prefix = os.path.realpath(sys.base_prefix)
    dirs = [d for d in _JAIL_DIRS if os.path.lexists(d)]
    if not any(prefix == os.path.realpath(d) or prefix.startswith(os.path.realpath(d) + "/") for d in dirs):
        dirs.append(sys.base_prefix)
    for d in dirs:
        if os.path.islink(d):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(d), root + d)
            continue
        os.makedirs(root + d, exist_ok=True)
        bind(os.path.realpath(d), root + d, ms_nosuid | ms_nodev)
    for f in _JAIL_FILES:
        if os.path.exists(f):
            os.makedirs(os.path.dirname(root + f), exist_ok=True)
            open(root + f, "wb").close()
            bind(f, root + f, ms_nosuid)
    os.makedirs(root + "/tmp/work")
    os.chmod(root + "/tmp", 0o1777)
    os.chown(root + "/tmp/work", uid, uid)
    os.chroot(root)
    os.chdir("/tmp/work")
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no privileges regained through exec


def _forbid_fork() -> None:
    """A seccomp filter: fork, vfork and clone without CLONE_THREAD fail with EAGAIN (threads still
    start; clone3, whose flags a filter cannot read, fails with ENOSYS and libc falls back to clone),
    so the program's tree is this one process and RLIMIT_AS bounds all of its memory."""
    import ctypes

    arch, nr = _SECCOMP_ARCH[os.uname().machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    allow, errno = 0x7FFF0000, 0x00050000
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, errno | 38),  # another ABI (i386, x32): ENOSYS
            (ld, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, errno | 38)]
    for name in ("fork", "vfork"):
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, errno | 11)]  # EAGAIN, as at a process limit
    prog += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, errno | 38),
             (jeq, 0, 3, nr["clone"]), (ld, 0, 0, 16), (jset, 1, 0, 0x00010000), (ret, 0, 0, errno | 11),  # CLONE_THREAD
             (ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*(Filter(*f) for f in prog))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(Program(len(prog), filters)), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")  # PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP


def _confine(cfg: dict) -> str:
    """Everything between the bootstrap and the untrusted code: cgroups, jail, rlimits, uid, seccomp,
    and the program's stdout/stderr pipes as fds 1 and 2. Returns the working directory."""
    for cgroup in cfg["cgroups"]:  # first, so that everything the program starts is inside
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write("0")
    home = "/tmp/work"
    if cfg["jail"]:
        _enter_jail(cfg["uid"])
    else:
        home = os.getcwd()
    _set_limits(cfg["limits"], nproc=32 if cfg["uid"] is not None else None)
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    if cfg["no_fork"]:
        _forbid_fork()
    os.environ.update(HOME=home, TMPDIR=home)
    os.umask(0o077)
    *_, out_fd, err_fd = cfg["fds"]
    for fd, target in ((out_fd, 1), (err_fd, 2)):  # from here on, output is the program's
        os.dup2(fd, target)
        os.close(fd)
    return home


def _program_main(cfg: dict) -> None:
    source = sys.stdin.buffer.read()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)  # the program reads EOF, never the parent
    os.close(null)
    home = _confine(cfg)
    read_fd, write_fd, _, _ = cfg["fds"]
    channel = _Channel(read_fd, write_fd)
    with open("solution.py", "wb") as f:
        f.write(source)
    module = types.ModuleType("solution")
    module.__file__ = os.path.join(home, "solution.py")
    sys.modules["solution"] = module
    try:
        exec(compile(source, "solution.py", "exec"), module.__dict__)
    except BaseException as e:  # noqa: BLE001  (SystemExit too: the program did not load)
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        channel.send(("error", f"the program did not load: {type(e).__name__}: {e}"[:500]))
        os._exit(1)
    channel.send(("ready",))
    _serve(channel, module.__dict__)


def _stdio_main(cfg: dict) -> None:
    """`run_program`'s child: the source arrives length-prefixed on stdin; what follows on stdin is
    the program's input. The program runs as __main__; its exit status is the process's."""
    (size,) = struct.unpack(">Q", _read_exactly(0, 8))
    source = _read_exactly(0, size)
    _confine(cfg)
    with open("solution.py", "wb") as f:
        f.write(source)
    code = 0
    try:
        exec(compile(source, "solution.py", "exec"), {"__name__": "__main__", "__file__": os.path.abspath("solution.py")})
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  (a runtime error: the traceback goes to the program's stderr)
        import traceback

        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: what was written is what counts
            pass
    os._exit(code & 0xFF)


def _read_exactly(fd: int, n: int) -> bytes:
    parts, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            os._exit(3)  # the parent went away
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _serve(channel: _Channel, namespace: dict) -> None:
    """Answer the harness: values of plain types go by value, anything else as a handle (its index)."""
    handles: list = []

    def persistent_id(obj):
        if type(obj) in _PLAIN:
            return None
        handles.append(obj)
        return len(handles) - 1

    ops = {"lookup": namespace.__getitem__, "call": lambda f, a, k: f(*a, **k), "getattr": getattr,
           "len": len, "iter": iter, "next": next, "getitem": lambda obj, key: obj[key]}
    while True:
        try:
            op, *params = channel.recv(persistent_load=handles.__getitem__)
        except EOFError:
            os._exit(0)
        try:
            reply = ("ok", ops[op](*params))
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            channel.send(reply, persistent_id)
        except BaseException as e:  # noqa: BLE001  (SystemExit from a call is the program's answer)
            if op == "next" and isinstance(e, StopIteration):  # the one place where it means "exhausted"
                channel.send(("stop",))
            else:
                channel.send(("raise", type(e).__name__, str(e)[:1000]))


# --- the harness process (trusted: runs the tests) -----------------------------------------------


class _ChannelLost(BaseException):
    """The program process died or broke the protocol; a BaseException so tests' `except Exception`
    cannot swallow it (a bare `except:` can, hence the sticky `_Program.lost`)."""


class RemoteError(Exception):
    """An exception raised in the program that is not a built-in exception type."""


class _Plain(pickle.Unpickler):
    """Builds plain data only: no class outside this list can be loaded, so nothing from the program
    process runs code in the harness."""

    _ALLOWED = {("builtins", "complex"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


class _Program:
    """The harness's side of the pipe to the program process."""

    def __init__(self, channel: _Channel):
        self.channel, self.lost, self.busy = channel, "", False

    def hello(self) -> str | None:
        """None when the program loaded, else why not."""
        try:
            msg = self.channel.recv(_Plain, persistent_load=self._remote)
        except Exception:  # a dead program or a malformed message
            self.lost = "the program process ended while loading"
            return self.lost
        if msg == ("ready",):
            return None
        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "error" and isinstance(msg[1], str):
            return msg[1][:500]
        return "the program process broke the protocol while loading"

    def request(self, op: str, *params):
        if self.lost:
            raise _ChannelLost(self.lost)
        if self.busy:  # only a forged reply could ask for this (a handle called while unpickling)
            self.lost = "the program process sent a malformed reply"
            raise _ChannelLost(self.lost)
        # arguments that cannot be sent (a lambda, ...) raise here, in the tests, before anything is written
        frame = self.channel.frame((op, *params), lambda obj: obj.handle if type(obj) is _Remote else None)
        self.busy = True
        try:
            self.channel.write(frame)
            reply = self.channel.recv(_Plain, persistent_load=self._remote)
        except Exception as e:  # a dead program or a malformed reply (any error the decoder raises)
            self.lost = f"the program process ended or broke the protocol during the tests ({type(e).__name__})"
            raise _ChannelLost(self.lost) from None
        finally:
            self.busy = False
        if type(reply) is tuple and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if reply == ("stop",) and op == "next":  # a remote iterator is exhausted; nothing else may say so
            raise StopIteration
        if type(reply) is tuple and len(reply) == 3 and reply[0] == "raise" and type(reply[1]) is str and type(reply[2]) is str:
            raise _exception(reply[1], reply[2])
        self.lost = "the program process sent a malformed reply"
        raise _ChannelLost(self.lost)

    def _remote(self, handle) -> _Remote:
        if type(handle) is not int:
            raise pickle.UnpicklingError("bad handle")
        return _Remote(self, handle)


def _exception(name: str, message: str) -> Exception:
    """The tests see a built-in exception type by name (so `except ValueError` works), except the
    ones that iteration treats as control flow: StopIteration raised by the program inside
    `all(map(f, xs))` would end the loop early and pass it (issue #17)."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, (StopIteration, StopAsyncIteration)):
        try:
            return cls(message)
        except Exception:  # a built-in that needs other arguments (UnicodeDecodeError, ...)
            pass
    return RemoteError(f"{name}: {message}")


class _Remote:
    """An object living in the program process. Calls, attributes, len, iteration and indexing go
    there; comparisons, hashing and truth stay here (identity), so the program cannot answer `==`."""

    __slots__ = ("program", "handle")

    def __init__(self, program: _Program, handle: int):
        self.program, self.handle = program, handle

    def __call__(self, *args, **kwargs):
        return self.program.request("call", self, args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # protocol probes (__setstate__, __array__, ...) are not forwarded
            raise AttributeError(name)
        return self.program.request("getattr", self, name)

    def __len__(self):
        return self.program.request("len", self)

    def __iter__(self):
        return self.program.request("iter", self)

    def __next__(self):
        return self.program.request("next", self)

    def __getitem__(self, key):
        return self.program.request("getitem", self, key)

    def __repr__(self) -> str:
        return f"<object {self.handle} of the program>"


class _TestGlobals(dict):
    """The tests' globals: a name neither defined by the tests nor a built-in is the program's."""

    def __init__(self, program: _Program, asserts: _Asserts):
        super().__init__(__name__="__tests__", _sputnik_assert=asserts)
        self.program = program

    def __missing__(self, name: str):
        if name in builtins.__dict__:
            raise KeyError(name)
        try:
            value = self.program.request("lookup", name)
        except KeyError:
            raise KeyError(name) from None
        self[name] = value
        return value


class _Asserts:
    """Counts executed checks: asserts (the rewritten tests call `_sputnik_assert(ok, line)`) and
    unittest tests (through `_count_unittest`)."""

    def __init__(self):
        self.passed = self.failed = 0
        self.first_failure = ""

    def __call__(self, ok: bool, where: int | str) -> None:
        if ok is True:
            self.passed += 1
        else:
            self.failed += 1
            self.first_failure = self.first_failure or (f"tests.py line {where}" if isinstance(where, int) else where)


def _count_unittest(checks: _Asserts) -> None:
    """Count each unittest test that ran as a check (passed, or failed with its failures, errors
    and subtests), whatever runner or `exit=` the tests use: `unittest.main(exit=False)` passing a
    program that fails every test is how tests that run nothing looked like a pass (issue #17)."""
    import unittest

    result = unittest.TestResult
    outcomes = {"addSuccess": True, "addExpectedFailure": True, "addFailure": False, "addError": False, "addUnexpectedSuccess": False}
    for name, ok in outcomes.items():
        def hook(self, test, *args, _orig=getattr(result, name), _ok=ok):
            checks(_ok, f"unittest {test}")
            return _orig(self, test, *args)
        setattr(result, name, hook)

    def add_sub_test(self, test, subtest, err, _orig=result.addSubTest):
        if err is not None:  # a passing subtest's test reports its own success
            checks(False, f"unittest {subtest}")
        return _orig(self, test, subtest, err)
    result.addSubTest = add_sub_test


class _ModuleView:
    """The tests' globals seen as a module: unittest.main() looks for TestCases in `__main__`."""

    def __init__(self, namespace: dict):
        self.__dict__ = namespace


class _RewriteAsserts(ast.NodeTransformer):
    """`assert T` -> try: ok = bool(T) / except Exception: ok = False; _sputnik_assert(ok, line).

    A failing assert does not stop the tests, so the fraction passed is known."""

    def __init__(self):
        self.count = 0

    def visit_Assert(self, node: ast.Assert):
        self.count += 1
        store, load = ast.Name("_sputnik_ok", ast.Store()), ast.Name("_sputnik_ok", ast.Load())
        check = ast.Try(
            body=[ast.Assign([store], ast.Call(ast.Name("bool", ast.Load()), [node.test], []))],
            handlers=[ast.ExceptHandler(ast.Name("Exception", ast.Load()), None, [ast.Assign([store], ast.Constant(False))])],
            orelse=[], finalbody=[])
        record = ast.Expr(ast.Call(ast.Name("_sputnik_assert", ast.Load()), [load, ast.Constant(node.lineno)], []))
        return [ast.copy_location(check, node), ast.copy_location(record, node)]


def _compile_tests(source: str, entry_point: str | None) -> tuple[types.CodeType, int]:
    """The tests compiled with asserts rewritten, and how many asserts they contain."""
    tree = ast.parse(source, "tests.py")
    defines = any(isinstance(s, ast.FunctionDef) and s.name == "check" for s in tree.body)
    calls = any(isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and isinstance(s.value.func, ast.Name)
                and s.value.func.id == "check" for s in tree.body)
    if entry_point and defines and not calls:
        tree.body.append(ast.Expr(ast.Call(ast.Name("check", ast.Load()), [ast.Name(entry_point, ast.Load())], [])))
    rewriter = _RewriteAsserts()
    tree = ast.fix_missing_locations(rewriter.visit(tree))
    return compile(tree, "tests.py", "exec"), rewriter.count


def _harness(job: dict, program: _Program) -> dict:
    try:
        code, n_asserts = _compile_tests(job["tests"], job["entry_point"])
    except (SyntaxError, ValueError) as e:
        return {"status": "error", "detail": f"the tests do not compile: {e}"}
    problem = program.hello()
    if problem is not None:
        return {"status": "lost" if program.lost else "error", "detail": problem}
    asserts = _Asserts()
    if "unittest" in job["tests"]:
        _count_unittest(asserts)
    namespace = _TestGlobals(program, asserts)
    sys.modules["__main__"], sys.argv = _ModuleView(namespace), ["tests.py"]
    error = ""
    try:
        exec(code, namespace)
    except _ChannelLost:
        pass
    except SystemExit as e:  # only the tests' own code raises it here (unittest.main); the program's arrives as RemoteError
        if e.code not in (None, 0, False) and not asserts.failed:
            error = f"the tests exited with status {e.code!r}"
    except BaseException as e:  # noqa: BLE001  (an error in the tests or raised by the program)
        import traceback

        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == "tests.py"), 0)
        error = f"the tests raised {type(e).__name__}: {str(e)[:200]} (tests.py line {line})"
    total = max(asserts.passed + asserts.failed, n_asserts)
    counts = {"passed": asserts.passed, "total": total}
    if program.lost:
        return {"status": "lost", "detail": program.lost, **counts}
    if error:
        return {"status": "failed", "detail": error, **counts}
    if asserts.failed:
        return {"status": "failed", "detail": f"{asserts.failed} check(s) failed, first at {asserts.first_failure}", **counts}
    if not asserts.passed:  # no executed check, no pass (issue #17): empty or comment-only tests, check() never called
        why = "none of the tests' asserts ran (is check() called? pass entry_point)" if n_asserts else "the tests contain no check (no assert, no unittest test)"
        return {"status": "error", "detail": why, **counts}
    return {"status": "passed", "detail": "", **counts}


def _harness_main(cfg: dict) -> None:
    job = json.loads(sys.stdin.buffer.read())
    _set_limits(cfg["limits"], nproc=None)
    if cfg["protect"]:  # reduced isolation: a program of the same uid cannot read our memory or fds through /proc
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    read_fd, write_fd, verdict_fd = cfg["fds"]
    report = _harness(job, _Program(_Channel(read_fd, write_fd)))
    report["token"] = job["token"]
    data = memoryview(json.dumps(report).encode())
    while data:
        data = data[os.write(verdict_fd, data):]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: threads or atexit hooks the tests may have left


if __name__ == "__main__":
    del sys.path[0]  # the repository, put there by _child_bootstrap: the program gets the standard library only
    _config = json.loads(sys.argv[1])
    {"program": _program_main, "harness": _harness_main, "stdio": _stdio_main}[_config["role"]](_config)
